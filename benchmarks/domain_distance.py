"""How far each test domain lies from the ID training data, in the frozen stand-in's features.

    python benchmarks/domain_distance.py [--images 400]

For every domain of the embedded benchmark, the Fréchet distance (as in FID, here in the CLS features
of the shipped stand-in `weights/tiny.pt`) between `--images` images of its *test* classes and as many
images of each ID domain's *training* classes (what meta-training sees); printed with the nearest ID
domain. An ID domain's own test classes against its own training classes give the floor: how far new
classes of a seen domain lie. Beside it, the same distance to the nearest family of the stand-in's
pretraining corpus (standin.py): a domain close to it is one the frozen model already knows. Nothing
here reads a method's accuracy; the images are drawn with a fixed seed, so the table is exactly
reproducible (about 10 s on one core).
"""

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import backbone  # noqa: E402  (the repository root is on the path only now)
import benchmark  # noqa: E402
import data  # noqa: E402
import standin  # noqa: E402


def sample(source: data.Source, partition: data.Partition, n: int, generator: torch.Generator) -> Tensor:
    """n images (uint8, 3 × side × side) drawn uniformly from a partition's classes and images."""
    sizes = source.class_sizes(partition)
    classes = torch.randint(len(sizes), (n,), generator=generator).tolist()
    return torch.cat([source.load(partition, c, [int(torch.randint(sizes[c], (1,), generator=generator))], 32)
                      for c in classes])


@torch.no_grad()
def features(model: torch.nn.Module, images: Tensor) -> Tensor:
    """The frozen backbone's CLS features of uint8 images, in float64 for the statistics."""
    return torch.cat([model(data.normalise(chunk.float() / 255)) for chunk in images.split(200)]).double()


def frechet(a: Tensor, b: Tensor) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½), the Fréchet distance of two Gaussians."""
    mean_a, mean_b, cov_a, cov_b = a.mean(0), b.mean(0), a.T.cov(), b.T.cov()
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def distances(images: int = 400, seed: int = 0) -> list[dict]:
    """One row per domain: split, designed distance, nearest ID domain and the Fréchet distance to it."""
    model = backbone.load_shipped("tiny").eval()
    sources = benchmark.embedded_sources(benchmark.EMBEDDED_SEED)
    generator = torch.Generator().manual_seed(seed)
    seen = {s.name: features(model, sample(s, "train", images, generator)) for s in sources if s.split == "id"}
    per_class = 20
    corpus, _ = standin.build_corpus(-(-images // per_class), per_class, 32)  # families one after the other
    size = len(corpus) // len(standin.FAMILIES)
    pretraining = {name: features(model, corpus[i * size:(i + 1) * size][:images])
                   for i, name in enumerate(standin.FAMILIES)}
    rows = []
    for source in sources:
        tested = features(model, sample(source, "test", images, generator))
        to_id = {name: frechet(tested, train) for name, train in seen.items()}
        to_corpus = {name: frechet(tested, family) for name, family in pretraining.items()}
        nearest, family = min(to_id, key=to_id.get), min(to_corpus, key=to_corpus.get)
        rows.append({"domain": source.name, "split": source.split, "distance": source.distance,
                     "nearest": nearest, "frechet": to_id[nearest], "family": family, "to_corpus": to_corpus[family]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="images per side of each comparison")
    args = parser.parse_args()
    print("| domain | split | designed | nearest ID domain (training classes) | Fréchet distance | "
          "nearest pretraining family | Fréchet distance |")
    print("| --- | --- | --- | --- | ---: | --- | ---: |")
    for row in distances(args.images):
        print(f"| {row['domain']} | {row['split'].upper()} | {row['distance'] or '-'} | {row['nearest']} | "
              f"{row['frechet']:.1f} | {row['family']} | {row['to_corpus']:.1f} |")


if __name__ == "__main__":
    main()
