"""Data speed: embedded-benchmark build time, episodes per second, and their scaling with workers.

Run from the repository root:
  python benchmarks/data_speed.py [--episodes 200]            # build time + the single-process table
  python benchmarks/data_speed.py --workers 1,2 --only-workers  # the worker table only
Episodes are made with one intra-op thread, as everywhere (data.one_intra_op_thread). The first
table calls data.training_episode directly. The worker table measures data.training_stream, the
path train.py takes, with 1, 2, ... worker processes on Meta-Dataset-sized episodes at 128 px
(variable way and shot, several hundred images): the embedded benchmark, and a synthetic Meta-Dataset
tree in PMF's h5 layout (benchmarks/synthetic_md.py; 128-px images read from h5, resized and
augmented). Each row times --timed episodes (or --seconds) after a warm-up of one episode per
worker (worker start-up excluded); episodes vary in size, so images/s compares rows fairly.
The image folder of the first table is written from embedded test classes as 96x96 JPEGs
(20 classes x 20 images), the size of a small real photo collection, so decoding and resizing are
part of the measurement.
"""

import argparse
import datetime
import json
import os
import resource
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
import synthetic_md  # noqa: E402  (benchmarks/, on the path as this script's folder)


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


def stream_rate(sources, protocol, size: int, workers: int, episodes: int, seconds: float) -> dict:
    """data.training_stream with `workers`: episodes 0 .. workers-1 are a warm-up (every worker has
    started), then episodes workers, workers + 1, ... are timed until `episodes` have arrived or
    `seconds` have passed. Episodes vary in size, so images per second compares rows fairly.

    The workers' CPU time (counted once they have exited) per episode they were asked for does not
    depend on other jobs: equal with 1 and N workers means the pipeline itself scales, and only free
    cores limit it. It is an upper bound: the last few prefetched episodes are made but not counted.
    """
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    with data.training_stream(sources, protocol, seed=0, image_size=size, start=0, count=10**6,
                              workers=workers) as stream:
        for _ in range(max(1, workers)):
            next(stream)
        start, n, images = time.perf_counter(), 0, 0
        while n < episodes and (n < 3 or time.perf_counter() - start < seconds):
            episode = next(stream)
            n, images = n + 1, images + episode.support_images.shape[0] + episode.query_images.shape[0]
        elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    return {"episodes_per_second": n / elapsed, "images_per_second": images / elapsed,
            "images_per_episode": images / n, "episodes": n,
            "worker_cpu_s_per_episode": cpu / (n + max(1, workers)) if workers else None}


def worker_table(named_sources: dict, counts: list[int], episodes: int, seconds: float, save) -> None:
    """One row per (source, worker count); `save(rows)` after every row, so a run cut short keeps them."""
    print("| source | protocol | image size | workers | episodes/s | images/s | images/episode | episodes timed "
          "| worker CPU s/episode | load average |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for name, chosen in named_sources.items():
        for workers in counts:
            r = stream_rate(chosen, data.Protocol("variable"), 128, workers, episodes, seconds)
            rows.append({"source": name, "image_size": 128, "workers": workers, **r, "load_average": os.getloadavg()[0]})
            print(f"| {name} | variable (Meta-Dataset) | 128 | {workers} | {r['episodes_per_second']:.2f} | "
                  f"{r['images_per_second']:.0f} | {r['images_per_episode']:.0f} | {r['episodes']} | "
                  f"{r['worker_cpu_s_per_episode'] or float('nan'):.2f} | {os.getloadavg()[0]:.1f} |", flush=True)
            save(rows)


def md_sources(root: Path, cache: Path) -> list[data.Source]:
    """The ID sources of the synthetic Meta-Dataset tree under `root`, written first if absent."""
    start = time.perf_counter()
    if not synthetic_md.is_complete(root):
        synthetic_md.write_tree(root)
    spec = ",".join(f"h5:{root / s}@id" for s in synthetic_md.ID_SOURCES)
    print(f"synthetic Meta-Dataset tree ({len(synthetic_md.ID_SOURCES)} ID sources, 40 train classes of 40 "
          f"images of 128 px each): {time.perf_counter() - start:.1f} s")
    return readers.parse_data_spec(spec, 128, cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=200, help="episodes per row of the first table")
    parser.add_argument("--workers", default="1,2", help="comma list of worker counts for the worker table")
    parser.add_argument("--timed", type=int, default=40, help="episodes timed per worker-table row ...")
    parser.add_argument("--seconds", type=float, default=120.0, help="... or at most this many seconds")
    parser.add_argument("--sources", default="md,embedded",
                        help="the worker table's sources: md (synthetic Meta-Dataset h5), embedded, or both")
    parser.add_argument("--md-root", type=Path, default=None,
                        help="where the synthetic tree is (written there if absent; default: a temporary folder)")
    parser.add_argument("--only-workers", action="store_true", help="skip the build times and the first table")
    parser.add_argument("--json", type=Path, default=None, help="write the worker table's rows here")
    args = parser.parse_args()
    # Other processes on a shared machine slow every number below; the load average says how busy it was.
    torch.set_num_threads(1)
    print(f"load average before: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    wanted = args.sources.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        named = {}
        if "md" in wanted:
            named["synthetic Meta-Dataset h5"] = md_sources(args.md_root or Path(tmp) / "md", Path(tmp))
        if "embedded" in wanted or not args.only_workers:
            start = time.perf_counter()
            embedded = benchmark.embedded_sources(benchmark.EMBEDDED_SEED, cache_dir=Path(tmp))
            print(f"embedded build ({len(embedded)} domains x 100 classes x 20 images, 32 px, cold): "
                  f"{time.perf_counter() - start:.1f} s")
            if not args.only_workers:
                single_process_table(embedded, Path(tmp), args.episodes)
            if "embedded" in wanted:
                named["embedded"] = embedded
        meta = {"cpus": os.cpu_count(), "torch": torch.__version__, "date": datetime.date.today().isoformat()}
        save = (lambda rows: args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")) \
            if args.json else (lambda rows: None)
        worker_table(named, [int(w) for w in args.workers.split(",")], args.timed, args.seconds, save)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


def single_process_table(sources, tmp: Path, episodes: int) -> None:
    start = time.perf_counter()
    benchmark.embedded_sources(benchmark.EMBEDDED_SEED, cache_dir=tmp)
    print(f"embedded load from cache (SHA-256 checked): {time.perf_counter() - start:.2f} s")
    write_folder(sources[0], tmp / "folder")
    (folder,) = readers.folder_sources(tmp / "folder", "id", seed=0)
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
            lambda i: data.training_episode(chosen, protocol, seed=0, index=i, image_size=size), episodes)
        print(f"| {name} | {label} | {size} | {per_second:.0f} | {images:.0f} |", flush=True)


if __name__ == "__main__":
    main()
