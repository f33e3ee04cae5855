"""Markdown tables (and the sparsity-sweep picture) of docs/results.md from benchmarks/reproduce_results.sh.

    python benchmarks/results_tables.py runs/results [--plot docs/img/sparsity_sweep.png]

Every number is over the seeds found (seed-averaged per episode: episode i's accuracy is the mean of
the seeds' accuracies on episode i, which all seeds share), and every difference is paired on those
episodes: mean ± 1.96·std/√n over n episode differences (evaluate.paired_difference). Beside it, the
spread over seeds: each seed's own difference of averages, and a t-interval over the seeds
(t_{0.975, S-1}·sd/√S), which also carries the variation between meta-training runs.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evaluate  # noqa: E402  (the repository root is on the path only now)

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}  # Student t quantiles, by degrees of freedom
SWEEP = (0.5, 0.7, 0.9, 0.95)
GLYPH_RESULTS = "results*.json"  # evaluate.py --out names its file by what it measured (older files: results.json)
FINETUNE_RESULTS = "results-full-*.json"


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def seeds_of(root: Path, prefix: str, name: str = "results.json") -> dict[int, dict]:
    """{seed: results} of every finished seed of a run family, e.g. "smat" -> smat-seed0, ...: train.py's
    results.json, or with name="results-*.json" evaluate.py's file (the first by name where several)."""
    found = sorted(root.glob(f"{prefix}-seed*/{name}"), reverse=True)  # so the first by name wins below
    return {int(path.parent.name.rsplit("seed", 1)[1]): load(path) for path in found}


def first(results: dict, n: int) -> dict:
    """The same results on their first n episodes (episodes are shared prefixes across runs)."""
    domains = {}
    for name, d in results["domains"].items():
        accuracies = d["accuracies"][:n]
        mean, ci95 = evaluate.confidence_interval(evaluate.torch.tensor(accuracies))
        domains[name] = d | {"accuracies": accuracies, "mean": mean, "ci95": ci95, "episodes": len(accuracies)}
    return results | {"domains": domains, "id_avg": evaluate._average(domains, "id"),
                      "ood_avg": evaluate._average(domains, "ood")}


def seed_interval(a: dict[int, dict], b: dict[int, dict], key: str) -> str:
    """Per-seed differences of the averages (a_s − b_s, seeds both have), and their t-interval over seeds."""
    differences = [a[s][key] - b[s][key] for s in sorted(a.keys() & b.keys()) if a[s][key] is not None]
    if not differences:
        return "-"
    cells = ", ".join(f"{d:+.2f}" for d in differences)
    if len(differences) < 2:
        return cells
    half = T_975[len(differences) - 1] * statistics.stdev(differences) / len(differences) ** 0.5
    return f"{statistics.fmean(differences):+.2f} ± {half:.2f} (seeds: {cells})"


def comparison(pre: dict, pmf: dict[int, dict], smat: dict[int, dict], title: str, mode: str = "") -> str:
    """Pre, PMF, SMAT (seed means) per domain, and the paired differences; `mode` names a fine-tuning
    ("+full") that all three had."""
    pmf_mean, smat_mean = evaluate.average_runs(list(pmf.values())), evaluate.average_runs(list(smat.values()))
    differences = {"SMAT − PMF": evaluate.paired_difference(smat_mean, pmf_mean),
                   "SMAT − Pre": evaluate.paired_difference(smat_mean, pre),
                   "PMF − Pre": evaluate.paired_difference(pmf_mean, pre)}
    names = [f"Pre{mode}", f"PMF{mode} ({len(pmf)} seeds)", f"SMAT{mode} ({len(smat)} seeds)"]
    text = f"#### {title}\n\n" + evaluate.markdown_table([pre, pmf_mean, smat_mean], names, differences)
    rows = ["", "| average | SMAT − PMF over seeds | SMAT − Pre over seeds | PMF − Pre over seeds |",
            "|---|---:|---:|---:|"]
    pres = {seed: pre for seed in smat.keys() | pmf.keys()}
    for key, label in (("id_avg", "ID"), ("ood_avg", "OOD")):
        if smat_mean[key] is not None:
            rows.append(f"| {label} | {seed_interval(smat, pmf, key)} | {seed_interval(smat, pres, key)} | "
                        f"{seed_interval(pmf, pres, key)} |")
    first_domain = next(iter(pre["domains"].values()))
    return (text + "\n".join(rows) + f"\n\n{first_domain['episodes']} test episodes per domain, "
            f"{evaluate._describe(pre['protocol'])}, episode seed {pre['seed']}.\n")


def fine_tuned(folder: Path, title: str, zero_shot: dict[str, dict[int, dict]]) -> str:
    """The "+full" table of the PMF and SMAT runs fine-tuned into `folder` (with Pre+full), what
    fine-tuning added to each of the `zero_shot` models, and the lrs used; "" if there are none."""
    pmf, smat = seeds_of(folder, "pmf", FINETUNE_RESULTS), seeds_of(folder, "smat", FINETUNE_RESULTS)
    if not (pmf and smat):
        return ""
    pre = next(iter(smat.values()))["baselines"]["Pre+full"]
    tuned = {"Pre": {0: pre}, "PMF": pmf, "SMAT": smat}
    text = (comparison(pre, pmf, smat, title, "+full") + "\n"
            + finetune_gains({name: (zero_shot[name], runs) for name, runs in tuned.items()}) + "\n")
    if "finetune_lr_search" in pre:
        return text + finetune_lrs({f"{name}+full": runs for name, runs in tuned.items()})
    lrs = {d["finetune_lr"] for runs in tuned.values() for r in runs.values() for d in r["domains"].values()}
    return text + f"Fine-tuning lr given (--finetune-lr): {', '.join(f'{lr:g}' for lr in sorted(lrs))}.\n"


def finetune_gains(families: dict[str, tuple[dict[int, dict], dict[int, dict]]]) -> str:
    """What fine-tuning adds to each model: fine-tuned − zero-shot, seed means, paired on the episodes
    the fine-tuned runs were tested on (the first n of the zero-shot runs' episodes)."""
    rows = ["| model | ID: +full − zero-shot | OOD: +full − zero-shot |", "|---|---:|---:|"]
    for name, (zero_shot, tuned) in families.items():
        tuned_mean = evaluate.average_runs(list(tuned.values()))
        n = next(iter(tuned_mean["domains"].values()))["episodes"]
        gain = evaluate.paired_difference(tuned_mean, evaluate.average_runs([first(r, n) for r in zero_shot.values()]))
        rows.append(f"| {name} | {evaluate.difference_cell(gain['id_avg'])} | {evaluate.difference_cell(gain['ood_avg'])} |")
    return "Gain from fine-tuning (paired 95% CIs):\n\n" + "\n".join(rows) + "\n"


def finetune_lrs(families: dict[str, dict[int, dict]]) -> str:
    """How often each candidate lr was chosen on validation episodes, over domains and seeds."""
    candidates = next(iter(next(iter(families.values())).values()))["finetune_lr_search"]["candidates"]
    rows = ["| model | " + " | ".join(f"lr {c:g}" for c in candidates) + " |", "|---|" + "---:|" * len(candidates)]
    for name, runs in families.items():
        chosen = [lr for r in runs.values() for lr in r["finetune_lr_search"]["chosen"].values()]
        rows.append(f"| {name} | " + " | ".join(str(chosen.count(c)) for c in candidates) + " |")
    return "Fine-tuning lr chosen on validation episodes (count over domains and seeds):\n\n" + "\n".join(rows) + "\n"


def sparsity_rows(runs: dict[int, dict]) -> str:
    """The tested models' sparsity, mean over seeds (and experts)."""
    reports = [r["sparsity"] for r in runs.values()]
    per_expert = [s for report in reports for s in report["per_expert"]]
    return (f"{statistics.fmean(per_expert):.3f} [{min(per_expert):.3f}, {max(per_expert):.3f}] | "
            f"{statistics.fmean(r['binary_fraction'] for r in reports):.3f} | "
            f"{statistics.fmean(r['task_update_density'] for r in reports):.3f}")


def sweep(root: Path, episodes: int, plot: Path | None, references: dict[str, dict]) -> str:
    lines = ["| τ | seeds | ID avg ± CI | OOD avg ± CI | real glyphs (OOD) avg ± CI | per-expert test sparsity "
             "[min, max] | gates exactly 0/1 | task update density |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    points = {}
    for tau in SWEEP:
        prefix = "smat" if tau == 0.9 else f"smat-s{tau}"
        runs = seeds_of(root, prefix)
        if not runs:
            continue
        mean = evaluate.average_runs([first(r, episodes) for r in runs.values()])
        points[tau] = mean
        (id_mean, id_ci), (ood_mean, ood_ci) = evaluate.split_average(mean, "id"), evaluate.split_average(mean, "ood")
        glyphs = seeds_of(root / "glyphs", prefix, GLYPH_RESULTS)
        glyph = evaluate.split_average(evaluate.average_runs(list(glyphs.values())), "ood") if glyphs else None
        glyph_cell = f"{glyph[0]:.2f} ± {glyph[1]:.2f} ({len(glyphs)} seeds)" if glyph else "-"
        lines.append(f"| {tau} | {len(runs)} | {id_mean:.2f} ± {id_ci:.2f} | {ood_mean:.2f} ± {ood_ci:.2f} | "
                     f"{glyph_cell} | {sparsity_rows(runs)} |")
    if plot and points:
        evaluate.plot_sparsity_sweep(points, plot, {name: first(r, episodes) for name, r in references.items()})
    return "\n".join(lines) + (f"\n\nEmbedded: the first {episodes} test episodes per domain of every run; real "
                               f"glyphs: all of their episodes; seed-averaged per episode.\n")


def update_norm(run: Path, results: dict) -> float:
    """‖θ_i − θ_pre‖ of the task model, for the router weights averaged over each test domain's
    episodes, mean over domains (PMF: ‖δ‖, every task's update): how far the tested model moves."""
    state = evaluate.torch.load(run / "best.pt", map_location="cpu", weights_only=True)["model"]
    if "log_alpha" not in state:
        return state["delta"].norm().item()
    gates = evaluate.smat.eval_gates(state["log_alpha"])
    norms = [((evaluate.torch.tensor(d["router_weights"]) @ gates) * state["delta"]).norm().item()
             for d in results["domains"].values()]
    return statistics.fmean(norms)


def ablations(root: Path, episodes: int, families: dict[str, str], reference: str) -> str:
    """Each run family against `reference` on the same episodes (embedded: the first `episodes`;
    real glyphs: all), seed means and paired differences, and how far its task model moves."""
    rows = ["| run | seeds | ID avg | OOD avg | real glyphs avg | Δ ID vs SMAT | Δ OOD vs SMAT | Δ glyphs vs SMAT | "
            "‖θ_i − θ_pre‖ |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = evaluate.average_runs([first(r, episodes) for r in seeds_of(root, reference).values()])
    base_glyphs = seeds_of(root / "glyphs", reference, GLYPH_RESULTS)
    for label, prefix in families.items():
        runs = seeds_of(root, prefix)
        if not runs:
            continue
        mean = evaluate.average_runs([first(r, episodes) for r in runs.values()])
        paired = evaluate.paired_difference(mean, base)
        glyphs = seeds_of(root / "glyphs", prefix, GLYPH_RESULTS)
        glyph_cell, glyph_diff = "-", "-"
        if glyphs and base_glyphs:
            n = min(len(next(iter(g["domains"].values()))["accuracies"]) for g in [*glyphs.values(), *base_glyphs.values()])
            glyph_mean = evaluate.average_runs([first(g, n) for g in glyphs.values()])
            glyph_base = evaluate.average_runs([first(g, n) for g in base_glyphs.values()])
            glyph_cell = f"{glyph_mean['ood_avg']:.2f}"
            glyph_diff = evaluate.difference_cell(evaluate.paired_difference(glyph_mean, glyph_base)["ood_avg"])
        norm = statistics.fmean(update_norm(root / f"{prefix}-seed{s}", r) for s, r in runs.items())
        rows.append(f"| {label} | {len(runs)} | {mean['id_avg']:.2f} | {mean['ood_avg']:.2f} | {glyph_cell} | "
                    f"{evaluate.difference_cell(paired['id_avg'])} | {evaluate.difference_cell(paired['ood_avg'])} | {glyph_diff} | {norm:.2f} |")
    return "\n".join(rows) + (f"\n\nEmbedded: the first {episodes} test episodes per domain; real glyphs: the "
                              f"episodes all compared runs share; seed means, paired 95% CIs.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, nargs="?", default=Path("runs/results"))
    parser.add_argument("--sweep-episodes", type=int, default=200)
    parser.add_argument("--plot", type=Path, default=None, help="write the sparsity-sweep picture here")
    args = parser.parse_args()
    root = args.root
    pmf, smat = seeds_of(root, "pmf"), seeds_of(root, "smat")
    pre = next(iter(smat.values()))["baselines"]["Pre"]
    # Pre depends on the shipped backbone and the episodes only: every run must have measured the same
    assert all(r["baselines"]["Pre"]["domains"][d]["accuracies"] == pre["domains"][d]["accuracies"]
               for r in [*smat.values(), *pmf.values()] for d in pre["domains"])
    print(comparison(pre, pmf, smat, "Embedded benchmark, zero-shot"))
    print("#### Sparsity of the tested models (best.pt of each run)\n")
    print("| method | per-expert test sparsity [min, max] | gates exactly 0/1 | task update density |\n"
          "|---|---:|---:|---:|")
    print(f"| SMAT τ = 0.9 | {sparsity_rows(smat)} |\n")
    references = {"Pre": pre, "PMF": evaluate.average_runs(list(pmf.values()))}
    print("#### Sparsity sweep\n\n" + sweep(root, args.sweep_episodes, args.plot, references))
    glyph_pmf = seeds_of(root / "glyphs", "pmf", GLYPH_RESULTS)
    glyph_smat = seeds_of(root / "glyphs", "smat", GLYPH_RESULTS)
    if glyph_smat and glyph_pmf:
        glyph_pre = next(iter(glyph_smat.values()))["baselines"]["Pre"]
        print(comparison(glyph_pre, glyph_pmf, glyph_smat, "Real glyphs (OOD), zero-shot"))
    print(fine_tuned(root / "finetune", "Embedded benchmark, full fine-tuning", {"Pre": {0: pre}, "PMF": pmf, "SMAT": smat}))
    if glyph_smat and glyph_pmf:
        print(fine_tuned(root / "glyphs-finetune", "Real glyphs (OOD), full fine-tuning",
                         {"Pre": {0: glyph_pre}, "PMF": glyph_pmf, "SMAT": glyph_smat}))
    families = {"SMAT (τ = 0.9)": "smat", "SMAT without the KL to Pre": "smat-nokl",
                "SMAT without the teacher": "smat-noteacher", "SMAT τ = 0.5": "smat-s0.5",
                "PMF (δ lr 0.05)": "pmf", "PMF, δ lr 0.02": "pmf-lr0.02"}
    print("#### Ablations: what keeps SMAT's OOD accuracy\n\n" + ablations(root, args.sweep_episodes, families, "smat"))


if __name__ == "__main__":
    main()
