"""Is an OOD effect about structure or about ink polarity? The embedded OOD domains with every image
inverted (255 − each pixel), tested on the run's own test episodes.

    python benchmarks/polarity_check.py RUN [RUN ...] [--episodes 300]

Every ID domain is light ink on a dark background; two near-OOD domains (scripts, specks) are drawn
dark on light. Inverting every OOD image swaps that: the far and stars domains become dark on light,
scripts and specks light on dark, and nothing else changes (same classes, same episodes: the
episode sampler never looks at pixels). Writes RUN/polarity-inverted-<N>ep.json: evaluate.py's
results for the run's model on the first N test episodes per OOD domain, with Pre's beside them
(`baselines.Pre`), so benchmarks/results_tables.py pairs them as it pairs train.py's own test.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli  # noqa: E402  (the repository root is on the path only now)
import data  # noqa: E402
import evaluate  # noqa: E402
import readers  # noqa: E402
import rundir  # noqa: E402


class Inverted(data.Source):
    """A source whose every image is inverted; classes, sizes and names are the wrapped source's."""

    def __init__(self, source: data.Source) -> None:
        self.source, self.name, self.split, self.distance = source, source.name, source.split, source.distance
        self.test_crop, self.crop_scale = source.test_crop, source.crop_scale

    def class_sizes(self, partition):
        return self.source.class_sizes(partition)

    def class_names(self, partition):
        return self.source.class_names(partition)

    def hierarchy(self, partition):  # the variable protocol draws hierarchical sources' classes by it
        return self.source.hierarchy(partition)

    def load(self, partition, class_index, image_indices, image_size):
        return 255 - self.source.load(partition, class_index, image_indices, image_size)


def inverted_results(run: Path, episodes: int) -> dict:
    """The run's model and Pre on the inverted OOD domains of the run's data."""
    model, cfg, _ = rundir.load_run(run)
    sources = [Inverted(s) for s in readers.parse_data_spec(cfg.data, cfg.image_size, seed=0) if s.split == "ood"]
    results = evaluate.evaluate_model(model, sources, cfg, episodes=episodes, seed=0)
    results.pop("experts", None)  # the masks are the run's; its results.json has them
    pre = evaluate.evaluate_model(evaluate.Tested(model, pre=True), sources, cfg, episodes=episodes, seed=0)
    return results | {"baselines": {"Pre": pre}, "inverted": True}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--episodes", type=int, default=300, help="test episodes per OOD domain")
    args = parser.parse_args(argv)
    try:
        if args.episodes < 2:
            raise rundir.RunError(f"--episodes {args.episodes} is too few; use >= 2")
        for run in args.runs:
            results = inverted_results(run, args.episodes)
            path = run / f"polarity-inverted-{args.episodes}ep.json"
            rundir.atomic_write_text(json.dumps(results) + "\n", path)
            print(f"{run.name}: inverted OOD avg {results['ood_avg']:.2f} (Pre {results['baselines']['Pre']['ood_avg']:.2f}); "
                  f"wrote {path}")
    except (rundir.RunError, evaluate.EvaluateError, readers.DataError, OSError) as error:
        print(f"error: {cli.one_line(str(error))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
