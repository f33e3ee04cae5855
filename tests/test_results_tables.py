"""benchmarks/results_tables.py: the tables of docs/results.md, built from a results tree the test
writes (two seeds of PMF and SMAT, zero-shot and fully fine-tuned), checked against evaluate's own
paired differences."""

import json
import subprocess
import sys
from pathlib import Path

import torch

import evaluate

ROOT = Path(__file__).resolve().parents[1]
SPLITS = {"near": "id", "far": "ood"}
PROTOCOL = {"kind": "fixed", "ways": 5, "shots": 5, "queries": 15}
CANDIDATES = [0.0, 1e-5, 1e-4, 1e-3, 1e-2]


def results(seed: int, level: float, finetune: str = "none", episodes: int = 12) -> dict:
    """A results dict as evaluate.py writes it: the same episodes (episode seed 0) for every run;
    `seed` only changes the accuracies drawn around `level`."""
    g = torch.Generator().manual_seed(seed * 100 + int(level * 100))
    domains = {}
    for name, split in SPLITS.items():
        accuracies = (level + 0.2 * torch.rand(episodes, generator=g)).clamp(0, 1).tolist()
        mean, ci95 = evaluate.confidence_interval(torch.tensor(accuracies))
        domains[name] = {"split": split, "mean": mean, "ci95": ci95, "episodes": episodes, "accuracies": accuracies,
                         "router_weights": [0.5, 0.5]}
    out = {"domains": domains, "id_avg": domains["near"]["mean"], "ood_avg": domains["far"]["mean"],
           "method": "x", "finetune": finetune, "partition": "test", "seed": 0, "protocol": PROTOCOL}
    if finetune != "none":
        chosen = {name: CANDIDATES[(seed + i) % len(CANDIDATES)] for i, name in enumerate(SPLITS)}
        out["finetune_lr_search"] = {"candidates": CANDIDATES, "chosen": chosen}
        for name in SPLITS:
            domains[name]["finetune_lr"] = chosen[name]
    return out


def write_tree(root: Path) -> dict:
    """PMF and SMAT, seeds 0 and 1: results.json with Pre, best.pt (δ, log α), and fine-tuned results."""
    pre, tuned_pre = results(9, 0.5), results(9, 0.55, "full")
    made = {}
    for method, level in (("pmf", 0.6), ("smat", 0.65)):
        for seed in (0, 1):
            run = root / f"{method}-seed{seed}"
            run.mkdir(parents=True)
            zero_shot = results(seed, level) | {"baselines": {"Pre": pre}}
            if method == "smat":
                zero_shot["sparsity"] = {"per_expert": [0.9, 0.88], "task_update_density": 0.3,
                                         "binary_fraction": 0.95, "target": 0.9}
            (run / "results.json").write_text(json.dumps(zero_shot))
            model = {"delta": torch.ones(6)} | ({"log_alpha": torch.zeros(2, 6)} if method == "smat" else {})
            torch.save({"model": model}, run / "best.pt")
            tuned = results(seed, level + 0.1, "full") | {"baselines": {"Pre+full": tuned_pre}}
            (root / "finetune" / run.name).mkdir(parents=True)
            (root / "finetune" / run.name / "results-full-5w5s15q-embedded-seed0-12ep.json").write_text(json.dumps(tuned))
            made[(method, seed)], made[(method, seed, "zero-shot")] = tuned, zero_shot
            # the real-glyph check: zero-shot, and fine-tuned with a given lr (no validation classes)
            for folder, name, content in (("glyphs", "results-zeroshot-x.json", zero_shot),
                                          ("glyphs-finetune", "results-full-x.json", fixed_lr(tuned))):
                (root / folder / run.name).mkdir(parents=True)
                (root / folder / run.name / name).write_text(json.dumps(content))
    return made | {"Pre+full": tuned_pre}


def fixed_lr(tuned: dict) -> dict:
    """Fine-tuned results as `--finetune-lr 0.0001` leaves them: no search, the lr in every domain."""
    strip = lambda r: {k: v for k, v in r.items() if k != "finetune_lr_search"} | {  # noqa: E731
        "domains": {n: d | {"finetune_lr": 1e-4} for n, d in r["domains"].items()}}
    return strip(tuned) | {"baselines": {"Pre+full": strip(tuned["baselines"]["Pre+full"])}}


def test_the_fine_tuning_tables_hold_seed_means_paired_differences_gains_and_the_chosen_lrs(tmp_path):
    made = write_tree(tmp_path)

    shown = subprocess.run([sys.executable, "benchmarks/results_tables.py", str(tmp_path)], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout

    section = shown.split("#### Embedded benchmark, full fine-tuning")[1].split("####")[0]
    assert "| Pre+full | PMF+full (2 seeds) | SMAT+full (2 seeds) |" in section
    smat = evaluate.average_runs([made[("smat", 0)], made[("smat", 1)]])
    pmf = evaluate.average_runs([made[("pmf", 0)], made[("pmf", 1)]])
    assert evaluate.difference_cell(evaluate.paired_difference(smat, pmf)["ood_avg"]) in section
    assert evaluate.difference_cell(evaluate.paired_difference(smat, made["Pre+full"])["id_avg"]) in section
    gain = evaluate.paired_difference(smat, evaluate.average_runs([made[("smat", s, "zero-shot")] for s in (0, 1)]))
    assert f"| SMAT | {evaluate.difference_cell(gain['id_avg'])} | {evaluate.difference_cell(gain['ood_avg'])} |" in section
    # SMAT seed 0 chose candidates 0 and 1, seed 1 candidates 1 and 2; Pre (seed 9) 4 and 0 (see `results`)
    assert "| SMAT+full | 1 | 2 | 1 | 0 | 0 |" in section and "| Pre+full | 1 | 0 | 0 | 0 | 1 |" in section


def test_real_glyphs_fine_tuned_with_a_given_lr_get_their_table_and_say_the_lr(tmp_path):
    write_tree(tmp_path)

    shown = subprocess.run([sys.executable, "benchmarks/results_tables.py", str(tmp_path)], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout

    section = shown.split("#### Real glyphs (OOD), full fine-tuning")[1].split("####")[0]
    assert "| Pre+full | PMF+full (2 seeds) | SMAT+full (2 seeds) |" in section and "| SMAT |" in section
    assert "Fine-tuning lr given (--finetune-lr): 0.0001." in section
