"""Data speed: embedded-benchmark build time and episodes per second (embedded and an image folder).

Run from the repository root:  python benchmarks/data_speed.py [--episodes 200]
Episodes are made with one intra-op thread, as in TrainStream's worker; the last rows measure a
TrainStream itself (the background thread, consumed as fast as it produces).
The image folder is written from embedded test classes as 96x96 JPEGs (20 classes x 20 images), the
size of a small real photo collection, so decoding and resizing are part of the measurement.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmark  # noqa: E402
import data  # noqa: E402
import readers  # noqa: E402


def rate(make_episode, n: int) -> tuple[float, float]:
    """(episodes per second, mean images per episode) over n episodes after one warm-up."""
    make_episode(0)
    start, images = time.perf_counter(), 0
    for i in range(1, n + 1):
        episode = make_episode(i)
        images += episode.support_images.shape[0] + episode.query_images.shape[0]
    return n / (time.perf_counter() - start), images / n


def write_folder(source: data.Source, root: Path) -> None:
    for c in range(len(source.class_sizes("test"))):
        images = F.interpolate(source.load("test", c, range(20), 32).float(), size=96, mode="bilinear")
        for i, image in enumerate(images.round().clamp(0, 255).byte()):
            path = root / f"class{c:02d}" / f"{i:02d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=200)
    args = parser.parse_args()
    # Other processes on a shared machine slow every number below; the load average says how busy it was.
    torch.set_num_threads(1)
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        sources = benchmark.embedded_sources(benchmark.EMBEDDED_SEED, cache_dir=Path(tmp))
        print(f"embedded build (8 domains x 100 classes x 20 images, 32 px, cold): {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        benchmark.embedded_sources(benchmark.EMBEDDED_SEED, cache_dir=Path(tmp))
        print(f"embedded load from cache (SHA-256 checked): {time.perf_counter() - start:.2f} s")
        write_folder(sources[0], Path(tmp) / "folder")
        (folder,) = readers.folder_sources(Path(tmp) / "folder", "id", seed=0)
        runs = [
            ("embedded", sources, "fixed 5-way 5-shot 15-query", data.Protocol("fixed"), 32),
            ("embedded", sources, "variable (Meta-Dataset)", data.Protocol("variable"), 32),
            ("embedded", sources, "fixed 5-way 5-shot 15-query", data.Protocol("fixed"), 128),
            ("folder (96 px JPEG)", [folder], "fixed 5-way 5-shot 15-query", data.Protocol("fixed"), 32),
            ("folder (96 px JPEG)", [folder], "variable (Meta-Dataset)", data.Protocol("variable"), 32),
        ]
        print("| source | protocol | image size | train episodes/s (augmented) | images/episode |")
        print("| --- | --- | ---: | ---: | ---: |")
        for name, chosen, label, protocol, size in runs:
            per_second, images = rate(
                lambda i: data.training_episode(chosen, protocol, seed=0, index=i, image_size=size), args.episodes)
            print(f"| {name} | {label} | {size} | {per_second:.0f} | {images:.0f} |", flush=True)
        for name, chosen in (("embedded", sources), ("folder (96 px JPEG)", [folder])):
            with data.TrainStream(chosen, data.Protocol("fixed"), seed=0, image_size=32) as stream:
                per_second, images = rate(lambda i: next(stream), args.episodes)
            print(f"| {name} via TrainStream | fixed 5-way 5-shot 15-query | 32 | {per_second:.0f} | {images:.0f} |")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
