"""A synthetic Meta-Dataset tree in PMF's h5 layout, and a random ViT-S/16 in DINO's key layout.

For checking the paper's path (`--profile paper`) end to end without downloading anything: the
tree has the layout `readers.h5_source` reads (DIR/dataset_spec.json and one DIR/<class>.h5 per
class, one group per image holding an `image` uint8 array) and the two hierarchies of Meta-Dataset's
variable episodes: `ilsvrc_2012` with a WordNet-like DAG, `omniglot` with alphabets (bilevel); then
`aircraft` (plain) and the test-only `traffic_sign` (OOD). Images are a class colour plus noise, so
classes differ; nothing here is a real image.

    python benchmarks/synthetic_md.py OUT_DIR [--classes 40,10,10] [--images 40] [--side 128]

writes OUT_DIR/<source>/... and OUT_DIR/dino_vits16_random.pth (each unless already complete there)
and prints the `--data` and `--backbone` flags for train.py. Tests import `write_tree` and
`write_dino_vits`.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import backbone as backbones  # noqa: E402

ID_SOURCES = ("ilsvrc_2012", "omniglot", "aircraft")
OOD_SOURCES = ("traffic_sign",)
COMPLETE = "COMPLETE"  # the tree's last file


def _images(rng: np.random.Generator, colour: np.ndarray, n: int, side: int) -> np.ndarray:
    noise = rng.integers(-40, 41, size=(n, side, side, 3), dtype=np.int16)
    return np.clip(colour.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def _dag(first: int, count: int) -> tuple[list[dict], dict[int, str]]:
    """One split's WordNet-like subgraph: a root over groups of 6 leaves (the last group takes the
    rest), so every internal node spans at least Meta-Dataset's 5 ways. Returns (nodes, class -> id)."""
    names = {first + i: f"n{first + i:08d}" for i in range(count)}
    groups = [list(range(first + s, first + min(s + 6, count))) for s in range(0, count, 6)]
    if len(groups) > 1 and len(groups[-1]) < 5:
        last = groups.pop()
        groups[-1] += last
    inner = [f"g{first:05d}_{k}" for k in range(len(groups))]
    nodes = [{"wn_id": f"root{first:05d}", "children_ids": inner}]
    nodes += [{"wn_id": g, "children_ids": [names[c] for c in group]} for g, group in zip(inner, groups)]
    nodes += [{"wn_id": names[c], "children_ids": []} for c in names]
    return nodes, names


def write_source(directory: Path, counts: tuple[int, int, int], images: int, side: int, seed: int,
                 hierarchy: str | None = None) -> None:
    """One source: `counts` = classes (train, val, test), `images` per class of side x side pixels.
    hierarchy "dag" (ImageNet-like), "bilevel" (Omniglot-like alphabets of 5 classes) or None."""
    import h5py

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    total = sum(counts)
    spec = {"name": directory.name,
            "classes_per_split": {"TRAIN": counts[0], "VALID": counts[1], "TEST": counts[2]},
            "images_per_class": {str(c): images for c in range(total)}}
    if hierarchy == "bilevel":  # alphabets of 5 classes (the last one of each split takes the rest)
        per_split = [[5] * (max(1, n // 5) - 1) + [n - 5 * (max(1, n // 5) - 1)] if n else [] for n in counts]
        spec["classes_per_superclass"] = {str(s): n for s, n in enumerate(sum(per_split, []))}
        spec["superclasses_per_split"] = {"TRAIN": len(per_split[0]), "VALID": len(per_split[1]),
                                          "TEST": len(per_split[2])}
    if hierarchy == "dag":
        starts = np.cumsum([0, *counts])
        subgraphs, names = {}, {}
        for key, k in zip(("TRAIN", "VALID", "TEST"), range(3)):
            subgraphs[key], split_names = _dag(int(starts[k]), counts[k])
            names |= split_names
        spec["split_subgraphs"] = subgraphs
        spec["class_names"] = {str(c): wn for c, wn in names.items()}
    (directory / "dataset_spec.json").write_text(json.dumps(spec))
    for c in range(total):
        pixels = _images(rng, rng.integers(0, 256, 3), images, side)
        with h5py.File(directory / f"{c}.h5", "w") as f:
            for i in range(images):
                group = f.create_group(str(i))
                group["image"], group["label"], group["id"] = pixels[i], c, i


def write_tree(root: Path, classes: tuple[int, int, int] = (40, 10, 10), images: int = 40, side: int = 128,
               seed: int = 0, id_sources: tuple[str, ...] = ID_SOURCES) -> str:
    """The ID sources (some of ID_SOURCES) and the OOD ones under `root`; returns their `--data` string."""
    hierarchies = {"ilsvrc_2012": "dag", "omniglot": "bilevel"}
    for k, name in enumerate(id_sources):
        write_source(root / name, classes, images, side, seed + k, hierarchies.get(name))
    for k, name in enumerate(OOD_SOURCES):  # test classes only, as Meta-Dataset's test-only sources
        write_source(root / name, (0, 0, sum(classes)), images, side, seed + 100 + k)
    (root / COMPLETE).write_text("written by benchmarks/synthetic_md.py\n")  # last: a cut-short tree lacks it
    return data_flag(root, id_sources)


def data_flag(root: Path, id_sources: tuple[str, ...] = ID_SOURCES) -> str:
    return ",".join([f"h5:{root / s}@id" for s in id_sources] + [f"h5:{root / s}@ood" for s in OOD_SOURCES])


def is_complete(root: Path) -> bool:
    return (root / COMPLETE).is_file()


def write_dino_vits(path: Path, seed: int = 0) -> str:
    """A randomly initialised ViT-S/16 saved under DINO's key names (as dino_deitsmall16_pretrain.pth
    holds them); returns the `--backbone` value that loads it."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(backbones.build_backbone("vit_small_patch16").state_dict(), path)
    return f"vit_small_patch16:{path}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--classes", default="40,10,10", help="classes per source: train,val,test")
    parser.add_argument("--images", type=int, default=40, help="images per class")
    parser.add_argument("--side", type=int, default=128, help="stored image side in pixels")
    args = parser.parse_args()
    classes = tuple(int(n) for n in args.classes.split(","))
    data_spec = data_flag(args.out) if is_complete(args.out) else write_tree(args.out, classes, args.images, args.side)
    weights = args.out / "dino_vits16_random.pth"
    backbone = f"vit_small_patch16:{weights}" if weights.is_file() else write_dino_vits(weights)
    print(f"--data {data_spec} --backbone {backbone}")


if __name__ == "__main__":
    main()
