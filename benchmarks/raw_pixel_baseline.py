"""Difficulty of the embedded benchmark: a prototype classifier on raw pixels, per domain, and the
picture grid of docs/benchmark.md.

Run from the repository root:  python benchmarks/raw_pixel_baseline.py [--episodes 600] [--data SPEC]
Prints a markdown table (mean accuracy and 95% CI, t_{0.975,n-1} std / sqrt(n) as tables.confidence_interval, 5-way 5-shot 15 queries on
the TEST classes, the same deterministic episodes every method is evaluated on) and writes
docs/benchmark_domains.png (4 classes x 5 instances per domain).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmark  # noqa: E402
import data  # noqa: E402
import readers  # noqa: E402
import tables  # noqa: E402


def prototype_accuracy(episode: data.Episode) -> float:
    """ProtoNet on flattened pixels: nearest class mean in Euclidean distance."""
    support, query = episode.support_images.flatten(1), episode.query_images.flatten(1)
    prototypes = torch.stack([support[episode.support_labels == c].mean(0) for c in range(episode.n_way)])
    return (torch.cdist(query, prototypes).argmin(1) == episode.query_labels).float().mean().item()


def save_grid(sources: list[data.Source], path: Path, classes: int = 4, instances: int = 5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sources), 1, figsize=(classes * instances * 0.42, len(sources) * 0.62))
    for axis, source in zip(axes, sources):
        rows = [source.load("test", c, range(instances), 32) for c in range(classes)]
        strip = torch.cat([torch.cat(list(r), 2) for r in rows], 2)  # (3, 32, classes * instances * 32)
        gaps = strip.permute(1, 2, 0).numpy().copy()
        for c in range(1, classes):
            gaps[:, c * instances * 32 - 1:c * instances * 32 + 1] = 255  # white line between classes
        axis.imshow(gaps, interpolation="nearest")
        axis.set_axis_off()
        far = f", {source.distance}" if source.distance else ""  # near or far OOD, where designed
        axis.set_title(f"{source.name} ({source.split.upper()}{far})", fontsize=8, loc="left", pad=2)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--grid", type=Path, default=Path("docs/benchmark_domains.png"))
    parser.add_argument("--data", default=None, help="another --data string (e.g. folder:PATH@ood); no grid")
    args = parser.parse_args()
    if args.data:
        sources, args.grid = readers.parse_data_spec(args.data, 32), None
    else:
        with tempfile.TemporaryDirectory() as cache:  # a fresh build, as on a new machine
            sources = benchmark.embedded_sources(benchmark.EMBEDDED_SEED, cache_dir=Path(cache))
    protocol = data.Protocol("fixed", ways=5, shots=5, queries=15)
    print("| domain | split | raw-pixel ProtoNet accuracy (%) | 95% CI |")
    print("| --- | --- | ---: | ---: |")
    for source in sources:
        episodes = data.evaluation_episodes(source, "test", protocol, args.episodes, seed=0, image_size=32)
        mean, ci = tables.confidence_interval(100 * torch.tensor([prototype_accuracy(e) for e in episodes]))
        print(f"| {source.name} | {source.split.upper()} | {mean:.1f} | {ci:.1f} |", flush=True)
    if args.grid:
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        save_grid(sources, args.grid)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
