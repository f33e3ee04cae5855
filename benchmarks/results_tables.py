"""Markdown tables for docs/results.md from the output of benchmarks/reproduce_results.sh.

    python benchmarks/results_tables.py runs/results

Reads RUNS/<table>/<run>.json (one evaluate.py results file per run and table) and each run's
metrics.jsonl (the hard sparsity its experts reached), and prints one markdown table per table.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evaluate  # noqa: E402  (the repository root is on the path only now)

TABLES = {  # table -> runs in column order ("Pre" is the pretrained baseline stored beside the first run)
    "main": ["Pre", "pmf", "smat-s0.9"],
    "sparsity": ["smat-s0.0", "smat-s0.5", "smat-s0.7", "smat-s0.9", "smat-s0.95"],
    "experts": ["smat-e1", "smat-e4", "smat-e16"],
    "ablations": ["pmf", "smat-no-teacher", "smat-no-kl", "smat-official-masks"],
    "finetune": ["Pre+full", "pmf", "smat-s0.9"],
}


def final_sparsity(run: Path) -> str:
    """Mean hard sparsity of the experts at the last logged step, and its spread."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [line for line in lines if "sparsity_mean" in line]
    return f"{last[-1]['sparsity_mean']:.3f} ± {last[-1]['sparsity_std']:.3f}" if last else "dense"


def table(root: Path, name: str) -> str:
    results, names = [], []
    for run in TABLES[name]:
        if run.startswith("Pre"):
            first = json.loads((root / name / f"{TABLES[name][1]}.json").read_text())
            results.append(first["baselines"][run])
        else:
            results.append(json.loads((root / name / f"{run}.json").read_text()))
        names.append(run)
    text = evaluate.markdown_table(results, names)
    sparsity = ["achieved sparsity", ""] + ["-" if n.startswith("Pre") else final_sparsity(root / n) for n in names]
    first = results[0]
    episodes = next(iter(first["domains"].values()))["episodes"]
    return (f"{text}| {' | '.join(sparsity)} |\n\n{episodes} test episodes per domain, "
            f"{evaluate._describe(first['protocol'])}, seed {first['seed']}, {first['finetune']} fine-tuning.\n")


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/results")
    for name in TABLES:
        if (root / name).is_dir():
            print(f"### {name}\n\n{table(root, name)}")
