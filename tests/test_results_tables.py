"""benchmarks/results_tables.py: the tables of docs/results.md, built from a results tree the test
writes (two seeds of PMF and SMAT, zero-shot and fully fine-tuned), checked against tables.py's own
paired differences."""

import json
import subprocess
import sys
from pathlib import Path

import torch

import tables

ROOT = Path(__file__).resolve().parents[1]
SPLITS = {"near": "id", "far": "ood", "close": "ood"}
DISTANCE = {"far": "far", "close": "near"}  # the OOD domains' designed distance
PROTOCOL = {"kind": "fixed", "ways": 5, "shots": 5, "queries": 15}
CANDIDATES = [0.0, 1e-5, 1e-4, 1e-3, 1e-2]


def results(seed: int, level: float, finetune: str = "none", episodes: int = 12) -> dict:
    """A results dict as evaluate.py writes it: the same episodes (episode seed 0) for every run;
    `seed` only changes the accuracies drawn around `level`."""
    g = torch.Generator().manual_seed(seed * 100 + int(level * 100))
    domains = {}
    for name, split in SPLITS.items():
        accuracies = [round(100 * a, 4) for a in (level + 0.2 * torch.rand(episodes, generator=g)).clamp(0, 1).tolist()]
        mean, ci95 = tables.confidence_interval(torch.tensor(accuracies))
        domains[name] = {"split": split, "mean": mean, "ci95": ci95, "episodes": episodes, "accuracies": accuracies,
                         "router_weights": [0.5, 0.5]} | ({"distance": DISTANCE[name]} if name in DISTANCE else {})
    out = {"results_format": tables.RESULTS_FORMAT, "domains": domains, **tables.averages(domains),
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
            # the real-glyph check, in both polarities: zero-shot
            for folder, name, content in (("glyphs-results", "results-zeroshot-x.json", zero_shot),
                                          ("glyphs-inverted-results", "results-zeroshot-x.json", zero_shot)):
                (root / folder / run.name).mkdir(parents=True)
                (root / folder / run.name / name).write_text(json.dumps(content))
    for prefix, level in (("smat-s0.5", 0.66), ("smat-m1", 0.62), ("smat-noteacher", 0.64)):  # 2 seeds each
        for seed in (0, 1):
            run = root / f"{prefix}-seed{seed}"
            run.mkdir()
            made[(prefix, seed)] = results(seed, level) | {"baselines": {"Pre": pre}}
            (run / "results.json").write_text(json.dumps(made[(prefix, seed)]))
            torch.save({"model": {"delta": torch.full((6,), 2.0), "log_alpha": torch.zeros(2, 6)}}, run / "best.pt")
    for setting, scores in (("pmf-lr0.02", (81.0, 80.0)), ("pmf-lr0.05", (80.9, 81.5)), ("pmf-lr0.1", (70.0,)),
                            ("smat-lr0.05-t1", (82.0, 81.0))):
        for seed, score in enumerate(scores):
            run = root / "select" / f"{setting}-seed{seed}"
            run.mkdir(parents=True)
            (run / ".done").touch()
            (run / "metrics.jsonl").write_text(json.dumps({"episode": 4, "val_accuracy": score - 1}) + "\n"
                                               + json.dumps({"episode": 8, "val_accuracy": score}) + "\n")
    return made | {"Pre+full": tuned_pre}


def test_the_fine_tuning_tables_hold_seed_means_paired_differences_gains_and_the_chosen_lrs(tmp_path):
    made = write_tree(tmp_path)

    shown = subprocess.run([sys.executable, "benchmarks/results_tables.py", str(tmp_path)], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout

    section = shown.split("#### Embedded benchmark, full fine-tuning")[1].split("####")[0]
    assert "| Pre+full | PMF+full (2 seeds) | SMAT+full (2 seeds) |" in section
    smat = tables.average_runs([made[("smat", 0)], made[("smat", 1)]])
    pmf = tables.average_runs([made[("pmf", 0)], made[("pmf", 1)]])
    assert tables.difference_cell(tables.paired_difference(smat, pmf)["ood_avg"]) in section
    assert tables.difference_cell(tables.paired_difference(smat, made["Pre+full"])["id_avg"]) in section
    gain = tables.paired_difference(smat, tables.average_runs([made[("smat", s, "zero-shot")] for s in (0, 1)]))
    assert f"| SMAT | {tables.difference_cell(gain['id_avg'])} | {tables.difference_cell(gain['ood_avg'])} |" in section
    # SMAT seed 0 chose candidates 0, 1, 2, seed 1 candidates 1, 2, 3; Pre (seed 9) 4, 0, 1 (see `results`)
    assert "| SMAT+full | 1 | 2 | 2 | 1 | 0 |" in section and "| Pre+full | 1 | 1 | 0 | 0 | 1 |" in section


def printed(root: Path) -> str:
    return subprocess.run([sys.executable, "benchmarks/results_tables.py", str(root), "--sweep-episodes", "12"],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_the_lr_selection_picks_the_best_mean_over_the_seeds_every_setting_has(tmp_path):
    write_tree(tmp_path)

    section = printed(tmp_path).split("#### Learning-rate selection")[1].split("####")[0]

    assert "| **pmf-lr0.05** | 80.90 | 81.50 | **81.20** |" in section  # best mean, not best seed 0
    assert "| pmf-lr0.1 | 70.00 | - | 70.00 |" in section  # a setting missing a seed cannot be chosen
    assert "| **smat-lr0.05-t1** |" in section


def test_near_and_far_ood_the_sweeps_and_the_findings_are_paired_against_the_default(tmp_path):
    made = write_tree(tmp_path)

    shown = printed(tmp_path)

    main = shown.split("#### Embedded benchmark, zero-shot")[1].split("####")[0]
    smat = tables.average_runs([made[("smat", 0, "zero-shot")], made[("smat", 1, "zero-shot")]])
    pre = made[("smat", 0, "zero-shot")]["baselines"]["Pre"]
    near = tables.paired_difference(smat, pre)["near_ood_avg"]
    assert "| near OOD avg |" in main and tables.difference_cell(near) in main
    sweep = shown.split("#### Sparsity sweep")[1].split("####")[0]
    swept = tables.average_runs([made[("smat-s0.5", 0)], made[("smat-s0.5", 1)]])
    assert tables.difference_cell(tables.paired_difference(swept, smat)["id_avg"]) in sweep
    assert "slope per unit τ" in sweep and "| 0.9 |" in sweep
    assert "| 1 |" in shown.split("#### Expert sweep")[1]
    found = shown.split("#### The paper's findings")[1].split("####")[0]
    assert found.count("| (a) SMAT > PMF on OOD |") == 2 and "(d) more experts help" in found
    assert "Real glyphs inverted (light ink on dark)" in shown and "Real glyphs as built" in shown
    ablation = shown.split("#### Ablations, one switch each")[1].split("####")[0]
    without = tables.average_runs([made[("smat-noteacher", 0)], made[("smat-noteacher", 1)]])
    row = next(line for line in ablation.splitlines() if line.startswith("| SMAT without the dense teacher |"))
    assert tables.difference_cell(tables.paired_difference(without, smat)["id_avg"]) in row
    # ‖θ_i − θ_pre‖: gates of log α = 0 are 0.5 (stretched: 0.5·1.2 − 0.1), weights 0.5 + 0.5, δ = 2 on 6 entries
    assert row.endswith(f"| {0.5 * 2 * 6 ** 0.5:.2f} |")


def test_a_verdict_needs_the_seed_level_interval_to_exclude_zero_in_the_papers_direction():
    import importlib.util
    spec = importlib.util.spec_from_file_location("results_tables", ROOT / "benchmarks" / "results_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    assert module.verdict((1.0, 0.5), +1) == "reproduced"
    assert module.verdict((1.0, 1.5), +1).startswith("not reproduced")
    assert module.verdict((-1.0, 0.5), +1) == "opposite" and module.verdict((-1.0, 0.5), -1) == "reproduced"
    assert module.verdict(None, +1) == "not testable here"
    assert module.verdict((0.3, 0.5), 0) == "reproduced (a tie)" and module.verdict((1.0, 0.5), 0).startswith("not")


def test_the_teacher_lead_is_in_points_whichever_metrics_format_logged_it(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import results_tables

    old, new = tmp_path / "smat-seed0", tmp_path / "smat-seed1"
    old.mkdir(), new.mkdir()
    # before metrics_format 2 the lead was a fraction; a killed session's record past the resume is dropped
    (old / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"start": True, "episode": 0}, {"episode": 2, "teacher_lead": 0.02}, {"episode": 4, "teacher_lead": 0.9},
        {"start": True, "episode": 2}, {"episode": 4, "teacher_lead": 0.04}]) + "\n")
    (new / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"start": True, "episode": 0, "metrics_format": 2}, {"episode": 2, "teacher_lead": 1.5}]) + "\n")

    assert results_tables.teacher_lead(tmp_path, "smat") == "smat-seed0 +3.00, smat-seed1 +1.50"
