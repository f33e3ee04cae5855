"""Markdown tables (and the sparsity-sweep picture) of docs/results.md from benchmarks/reproduce_results.sh.

    python benchmarks/results_tables.py runs/results [--plot docs/img/sparsity_sweep.png]

Every number is over the seeds found (seed-averaged per episode: episode i's accuracy is the mean of
the seeds' accuracies on episode i, which all seeds share), and every difference is paired on those
episodes: mean ± t_{0.975, n-1}·sd/√n over n episode differences (tables.paired_difference). Beside it,
the spread over seeds: each seed's own difference of averages, and the same t-interval over the seeds
(tables.t_interval: t_{0.975, S-1}·sd/√S), which also carries the variation between meta-training runs.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import delta_scaling  # noqa: E402  (the repository root and benchmarks/ are on the path only now)
import torch  # noqa: E402

import pictures  # noqa: E402
import resultfiles  # noqa: E402
import tables  # noqa: E402

GLYPH_RESULTS = "results*.json"  # evaluate.py --out names its file by what it measured (older files: results.json)
FINETUNE_RESULTS = "results-full-*.json"


def load(path: Path) -> dict:
    """A stored results file (or δ-scaling file, {"scales": {s: results}}) in today's format (resultfiles.upgraded)."""
    found = json.loads(path.read_text())
    if "scales" in found:
        found["scales"] = {s: resultfiles.upgraded(r) for s, r in found["scales"].items()}
    return resultfiles.upgraded(found) if "domains" in found else found


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
        mean, ci95 = tables.confidence_interval(torch.tensor(accuracies, dtype=torch.float64))
        domains[name] = d | {"accuracies": accuracies, "mean": mean, "ci95": ci95, "episodes": len(accuracies)}
    return results | {"domains": domains, **tables.averages(domains)}


def selection_scores(select: Path) -> dict[str, dict[int, float]]:
    """{setting: {seed: best ID-validation accuracy}} of benchmarks/select_lr.sh's finished runs."""
    scores: dict[str, dict[int, float]] = {}
    for done in sorted(select.glob("*-seed*/.done")):
        setting, seed = done.parent.name.rsplit("-seed", 1)
        records = pictures.read_metrics(done.parent)
        scores.setdefault(setting, {})[int(seed)] = max(r["val_accuracy"] for r in records if "val_accuracy" in r)
    return scores


def selection_table(scores: dict[str, dict[int, float]]) -> str:
    """Markdown: each setting's best validation accuracy per seed and their mean; the chosen one bold."""
    seeds = sorted({seed for by_seed in scores.values() for seed in by_seed})
    means = {s: statistics.fmean(v.values()) for s, v in scores.items()}
    # only settings run with every seed compete (a one-seed mean is a noisier score)
    complete = [s for s in scores if len(scores[s]) == len(seeds)]
    chosen = {m: max((s for s in complete if s.startswith(m + "-")), key=means.get, default=None)
              for m in ("pmf", "smat")}
    rows = ["| setting | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
            "|---|" + "---:|" * (len(seeds) + 1)]
    for setting in sorted(scores, key=lambda s: (s.split("-")[0], -means[s])):
        cells = [f"{scores[setting][s]:.2f}" if s in scores[setting] else "-" for s in seeds]
        mark = "**" if setting in chosen.values() else ""
        rows.append(f"| {mark}{setting}{mark} | " + " | ".join(cells) + f" | {mark}{means[setting]:.2f}{mark} |")
    return "\n".join(rows) + "\n\nBest ID-validation accuracy (%) of each run; bold: the chosen setting.\n"


def seed_differences(a: dict[int, dict], b: dict[int, dict], key: str) -> list[float]:
    """a_s − b_s of one average, for every seed both have."""
    return [a[s][key] - b[s][key] for s in sorted(a.keys() & b.keys()) if a[s].get(key) is not None]


def seed_interval(a: dict[int, dict], b: dict[int, dict], key: str) -> str:
    """Per-seed differences of the averages (a_s − b_s, seeds both have), and their t-interval over seeds."""
    differences = seed_differences(a, b, key)
    cells = ", ".join(f"{d:+.2f}" for d in differences)
    interval = tables.t_interval(differences)
    return f"{interval[0]:+.2f} ± {interval[1]:.2f} (seeds: {cells})" if interval else cells or "-"


def comparison(pre: dict, pmf: dict[int, dict], smat: dict[int, dict], title: str, mode: str = "") -> str:
    """Pre, PMF, SMAT (seed means) per domain, and the paired differences; `mode` names a fine-tuning
    ("+full") that all three had."""
    pmf_mean, smat_mean = tables.average_runs(list(pmf.values())), tables.average_runs(list(smat.values()))
    differences = {"SMAT − PMF": tables.paired_difference(smat_mean, pmf_mean),
                   "SMAT − Pre": tables.paired_difference(smat_mean, pre),
                   "PMF − Pre": tables.paired_difference(pmf_mean, pre)}
    seeds = lambda runs: f"{len(runs)} seed{'s' if len(runs) != 1 else ''}"  # noqa: E731
    names = [f"Pre{mode}", f"PMF{mode} ({seeds(pmf)})", f"SMAT{mode} ({seeds(smat)})"]
    text = f"#### {title}\n\n" + tables.markdown_table([pre, pmf_mean, smat_mean], names, differences)
    rows = ["", "| average | SMAT − PMF over seeds | SMAT − Pre over seeds | PMF − Pre over seeds |",
            "|---|---:|---:|---:|"]
    pres = {seed: pre for seed in smat.keys() | pmf.keys()}
    for key, label in tables.AVERAGES.items():
        if smat_mean.get(key) is not None:
            rows.append(f"| {label} | {seed_interval(smat, pmf, key)} | {seed_interval(smat, pres, key)} | "
                        f"{seed_interval(pmf, pres, key)} |")
    first_domain = next(iter(pre["domains"].values()))
    return (text + "\n".join(rows) + f"\n\n{first_domain['episodes']} test episodes per domain, "
            f"{tables.protocol_text(pre['protocol'])}, episode seed {pre['seed']}.\n")


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
        tuned_mean = tables.average_runs(list(tuned.values()))
        n = next(iter(tuned_mean["domains"].values()))["episodes"]
        gain = tables.paired_difference(tuned_mean, tables.average_runs([first(r, n) for r in zero_shot.values()]))
        rows.append(f"| {name} | {tables.difference_cell(gain['id_avg'])} | {tables.difference_cell(gain['ood_avg'])} |")
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


KEYS = ("id_avg", "near_ood_avg", "far_ood_avg")  # the averages the findings are about


def split_cells(results: dict) -> str:
    """ "ID | near OOD | far OOD" averages of a results dict."""
    return " | ".join(f"{results[k]:.2f}" if results.get(k) is not None else "-" for k in KEYS)


def shared(root: Path, prefixes: list[str], episodes: int) -> tuple[dict[str, dict], list[int]]:
    """({prefix: seed-mean results}, the seeds): over the seeds every prefix has, on the first `episodes`
    episodes."""
    families = {p: seeds_of(root, p) for p in prefixes}
    seeds = set.intersection(*(set(f) for f in families.values())) if families else set()
    return {p: tables.average_runs([first(f[s], episodes) for s in sorted(seeds)]) for p, f in families.items()
            if seeds}, sorted(seeds)


def episode_slopes(by_value: dict[float, dict], key: str, per_doubling: bool) -> "torch.Tensor | None":
    """Per episode, the least-squares slope (points per unit of the value, or per doubling) of one
    average's accuracy against the swept value; None when no domain is in that average."""
    values = sorted(by_value)
    groups = tables.average_groups(by_value[values[0]]["domains"]).get(key)
    if not groups:
        return None
    xs = torch.tensor(values, dtype=torch.float64)
    xs = xs.log2() if per_doubling else xs
    # episodes × values: each episode's average over the group's domains, for every value
    ys = torch.stack([tables.per_episode(by_value[v], groups).mean(1) for v in values], 1)
    centred = xs - xs.mean()
    return (ys - ys.mean(1, keepdim=True)) @ centred / (centred @ centred)  # accuracies are in points


def sweep_families(root: Path, flag: str, default: float) -> dict[float, str]:
    """{value: run family} of a sweep: the default is the main runs (`smat`), the others
    `smat-<flag><value>` (flag "s" for τ, "m" for M), each only once it has every seed the main runs
    have (a sweep point still running would otherwise shrink every comparison to its seeds)."""
    families = {float(p.name.split("-seed")[0].removeprefix(f"smat-{flag}")): p.name.split("-seed")[0]
                for p in root.glob(f"smat-{flag}[0-9]*-seed*")}
    complete = seeds_of(root, "smat").keys()
    return {default: "smat"} | {v: f for v, f in families.items() if seeds_of(root, f).keys() >= complete}


def seed_slope_row(root: Path, families: dict[float, str], key: str, episodes: int, per_doubling: bool) -> tuple:
    """(seed-level (mean, t half-width) of each seed's slope, episode-level cell, seeds) over the seeds
    every family has; None when fewer than two values or two seeds."""
    runs = {v: seeds_of(root, p) for v, p in families.items()}
    runs = {v: r for v, r in runs.items() if r}
    seeds = sorted(set.intersection(*(set(r) for r in runs.values()))) if runs else []
    if len(runs) < 2 or len(seeds) < 2:
        return None
    per_seed = [episode_slopes({v: first(r[s], episodes) for v, r in runs.items()}, key, per_doubling).mean().item()
                for s in seeds]
    means = {v: tables.average_runs([first(r[s], episodes) for s in seeds]) for v, r in runs.items()}
    mean, ci95 = tables.confidence_interval(episode_slopes(means, key, per_doubling))
    return tables.t_interval(per_seed), f"{mean:+.2f} ± {ci95:.2f}", seeds


def paired_sweep(root: Path, values: dict[float, str], reference: float, episodes: int, name: str,
                 per_doubling: bool = False) -> str:
    """A sweep as paired differences against the `reference` value, on the seeds every value has, and
    the per-episode least-squares slope of each average against the value (points per unit, or per
    doubling with `per_doubling`; 95% CI over episodes); `values` maps each value to its run family."""
    present = {v: p for v, p in values.items() if seeds_of(root, p)}
    if reference not in present or len(present) < 2:
        return ""
    means, seeds = shared(root, list(present.values()), episodes)
    base = means[present[reference]]
    rows = [f"| {name} | ID | near OOD | far OOD | Δ ID vs {name} = {reference:g} | Δ near OOD | Δ far OOD | "
            "per-expert test sparsity [min, max] | gates exactly 0/1 | task update density |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for value, prefix in sorted(present.items()):
        paired = tables.paired_difference(means[prefix], base)
        runs = {s: r for s, r in seeds_of(root, prefix).items() if s in seeds}
        sparsity = sparsity_rows(runs) if all("sparsity" in r for r in runs.values()) else "- | - | -"
        rows.append(f"| {value:g} | {split_cells(means[prefix])} | "
                    + " | ".join(tables.difference_cell(paired.get(k)) for k in KEYS) + f" | {sparsity} |")
    slopes = []
    for key in KEYS:
        slope = episode_slopes({v: means[p] for v, p in present.items()}, key, per_doubling)
        if slope is not None:
            mean, ci95 = tables.confidence_interval(slope)
            slopes.append(f"{tables.AVERAGES[key]} {mean:+.2f} ± {ci95:.2f}")
    return ("\n".join(rows) + f"\n\nSeeds {', '.join(map(str, seeds))} (seed-averaged per episode), the first "
            f"{episodes} test episodes per domain, paired 95% CIs. Least-squares slope per "
            f"{'doubling of' if per_doubling else 'unit'} {name}, "
            f"per episode, 95% CI over episodes: " + "; ".join(slopes) + ".\n")


def scaling_table(root: Path, seeds: list[int], episodes: int) -> str:
    """SMAT and PMF with δ scaled (benchmarks/delta_scaling.py), seed means, against SMAT at s = 1."""
    files = {(m, s): root / f"{m}-seed{s}" / f"delta-scaling-{episodes}ep.json" for m in ("smat", "pmf") for s in seeds}
    found = {k: load(f) for k, f in files.items() if f.exists()}
    seeds = [s for s in seeds if ("smat", s) in found and ("pmf", s) in found]
    if not seeds:
        return ""
    base = tables.average_runs([found["smat", s]["scales"]["1"] for s in seeds])
    rows = ["| model | δ × s | ‖θ_i − θ_pre‖ | ID | near OOD | far OOD | Δ ID vs SMAT | Δ near OOD | Δ far OOD |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method in ("smat", "pmf"):
        scales = list(found[method, seeds[0]]["scales"])
        for index, scale in enumerate(scales):
            matched = method == "pmf" and "matched" in found[method, seeds[0]] and index == len(scales) - 1
            runs = [found[method, s]["scales"][list(found[method, s]["scales"])[index]] for s in seeds]
            mean = tables.average_runs(runs)
            paired = tables.paired_difference(mean, base)
            norm = statistics.fmean(list(found[method, s]["norms"].values())[index] for s in seeds)
            label = "at SMAT's norm" if matched else scale
            rows.append(f"| {method.upper()} | {label} | {norm:.2f} | {split_cells(mean)} | "
                        + " | ".join(tables.difference_cell(paired.get(k)) for k in KEYS) + " |")
    return ("\n".join(rows) + f"\n\nSeeds {', '.join(map(str, seeds))}, the first {episodes} test episodes per "
            f"domain, seed means, paired 95% CIs against SMAT as trained (s = 1).\n")


def verdict(seed_ci: tuple[float, float] | None, sign: int) -> str:
    """The paper's direction `sign` holds when the seed-level interval excludes 0 on that side; a tie
    (`sign` 0) holds when it includes 0."""
    if seed_ci is None:
        return "not testable here"
    mean, half = seed_ci
    if sign == 0:
        return "reproduced (a tie)" if abs(mean) <= half else "not reproduced (not a tie)"
    if sign * mean - half > 0:
        return "reproduced"
    return "opposite" if sign * mean + half < 0 else "not reproduced (interval includes 0)"


def ablations(root: Path, episodes: int, families: dict[str, str], reference: str) -> str:
    """Each run family against `reference` on the seeds both have and the same first `episodes`
    episodes, seed means and paired differences, and how far its task model moves."""
    rows = ["| run | seeds | ID | near OOD | far OOD | Δ ID vs SMAT | Δ near OOD | Δ far OOD | ‖θ_i − θ_pre‖ |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, prefix in families.items():
        if not seeds_of(root, prefix):
            continue
        means, seeds = shared(root, [prefix, reference], episodes)
        if not seeds:
            continue
        paired = tables.paired_difference(means[prefix], means[reference])
        norm = statistics.fmean(delta_scaling.tested_update_norm(root / f"{prefix}-seed{s}") for s in seeds)
        rows.append(f"| {label} | {len(seeds)} | {split_cells(means[prefix])} | "
                    + " | ".join(tables.difference_cell(paired.get(k)) for k in KEYS) + f" | {norm:.2f} |")
    return "\n".join(rows) + (f"\n\nThe first {episodes} test episodes per domain; seed means over the seeds "
                              f"each row shares with SMAT, paired 95% CIs.\n")


def teacher_lead(root: Path, prefix: str, last: int = 30) -> str:
    """The dense teacher's query-accuracy lead over the student (teacher_lead in metrics.jsonl, points),
    mean of each run's last `last` training records."""
    cells = []
    for run in sorted(root.glob(f"{prefix}-seed*/metrics.jsonl")):
        records = pictures.read_metrics(run.parent)  # in points, whichever format logged them
        leads = [r["teacher_lead"] for r in records if "teacher_lead" in r][-last:]
        if leads:
            cells.append(f"{run.parent.name} {statistics.fmean(leads):+.2f}")
    return ", ".join(cells) or "-"


def findings(root: Path, pre: dict, pmf: dict[int, dict], smat: dict[int, dict], episodes: int) -> str:
    """The paper's four findings, each as its measured paired difference: the seed-level interval
    (t over seeds; the method-level evidence) beside the episode-level one, and the verdict. Where the
    polarity check ran, (a) and (b) on near OOD are repeated with the OOD images inverted."""
    pres = {s: pre for s in smat.keys() | pmf.keys()}
    smat_mean, pmf_mean = tables.average_runs(list(smat.values())), tables.average_runs(list(pmf.values()))
    rows = ["| finding (the paper's direction) | comparison | seed-level (t over seeds) | episode-level | verdict |",
            "|---|---|---:|---:|---|"]
    inverted = {m: seeds_of(root, m, "polarity-inverted-*.json") for m in ("smat", "pmf")}

    def row(finding, label, a, b, a_mean, b_mean, key, sign):
        seed_ci = tables.t_interval(seed_differences(a, b, key))
        episode = tables.difference_cell(tables.paired_difference(a_mean, b_mean).get(key))
        cell = f"{seed_ci[0]:+.2f} ± {seed_ci[1]:.2f}" if seed_ci else "-"
        rows.append(f"| {finding} | {label} | {cell} | {episode} | {verdict(seed_ci, sign)} |")

    for key in ("near_ood_avg", "far_ood_avg"):
        row("(a) SMAT > PMF on OOD", f"SMAT − PMF, {tables.AVERAGES[key]}", smat, pmf, smat_mean, pmf_mean, key, +1)
    for key in ("near_ood_avg", "far_ood_avg"):
        row("(b) meta-tuning improves OOD", f"SMAT − Pre, {tables.AVERAGES[key]}", smat, pres, smat_mean, pre, key, +1)
        row("(b) ... where PMF ties Pre", f"PMF − Pre, {tables.AVERAGES[key]}", pmf, pres, pmf_mean, pre, key, 0)
    if inverted["smat"] and inverted["pmf"]:
        flipped = {m: tables.average_runs(list(runs.values())) for m, runs in inverted.items()}
        flipped_pre = next(iter(inverted["smat"].values()))["baselines"]["Pre"]
        flipped_pres = {s: flipped_pre for s in inverted["smat"].keys() | inverted["pmf"].keys()}
        row("(a) on inverted images", "SMAT − PMF, near OOD avg", inverted["smat"], inverted["pmf"],
            flipped["smat"], flipped["pmf"], "near_ood_avg", +1)
        row("(b) on inverted images", "SMAT − Pre, near OOD avg", inverted["smat"], flipped_pres, flipped["smat"],
            flipped_pre, "near_ood_avg", +1)
    for finding, flag, default, key, sign in (("(c) higher τ costs ID", "s", 0.9, "id_avg", -1),
                                              ("(c) higher τ helps OOD", "s", 0.9, "near_ood_avg", +1),
                                              ("(c) higher τ helps OOD", "s", 0.9, "far_ood_avg", +1),
                                              ("(d) more experts help", "m", 8.0, "id_avg", +1),
                                              ("(d) more experts help", "m", 8.0, "near_ood_avg", +1),
                                              ("(d) more experts help", "m", 8.0, "far_ood_avg", +1)):
        found = seed_slope_row(root, sweep_families(root, flag, default), key, episodes, per_doubling=flag == "m")
        if found is not None:
            seed_ci, episode, seeds = found
            unit = "unit τ" if flag == "s" else "doubling of M"
            rows.append(f"| {finding} | slope of {tables.AVERAGES[key]} per {unit} ({len(seeds)} seeds) | "
                        f"{seed_ci[0]:+.2f} ± {seed_ci[1]:.2f} | {episode} | {verdict(seed_ci, sign)} |")
    return ("\n".join(rows) + "\n\nVerdict: reproduced where the seed-level 95% interval excludes 0 in the "
            "paper's direction. Sweeps: the first " f"{episodes} test episodes per domain, their shared seeds.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, nargs="?", default=Path("runs/results"))
    parser.add_argument("--sweep-episodes", type=int, default=200)
    parser.add_argument("--delta-episodes", type=int, default=100)
    parser.add_argument("--plot", type=Path, default=None, help="write the sparsity-sweep picture here")
    args = parser.parse_args()
    root, episodes = args.root, args.sweep_episodes
    if (root / "select").is_dir():
        print("#### Learning-rate selection on ID validation classes\n\n" + selection_table(selection_scores(root / "select")))
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
    print(f"Teacher lead over the student (points, last 30 training records): {teacher_lead(root, 'smat')}\n")
    print("#### The paper's findings\n\n" + findings(root, pre, pmf, smat, episodes))
    for tree, title in (("glyphs", "Real glyphs as built (dark ink on white), zero-shot"),
                        ("glyphs-inverted", "Real glyphs inverted (light ink on dark), zero-shot")):
        glyph_pmf = seeds_of(root / f"{tree}-results", "pmf", GLYPH_RESULTS)
        glyph_smat = seeds_of(root / f"{tree}-results", "smat", GLYPH_RESULTS)
        if glyph_smat and glyph_pmf:
            print(comparison(next(iter(glyph_smat.values()))["baselines"]["Pre"], glyph_pmf, glyph_smat, title))
    inverted_pmf, inverted_smat = (seeds_of(root, m, "polarity-inverted-*.json") for m in ("pmf", "smat"))
    if inverted_pmf and inverted_smat:
        print(comparison(next(iter(inverted_smat.values()))["baselines"]["Pre"], inverted_pmf, inverted_smat,
                         "Embedded OOD domains with every image inverted, zero-shot"))
    print("#### δ scaling: update size against sparse routing\n\n"
          + scaling_table(root, sorted(smat), args.delta_episodes))
    families = {"SMAT without the dense teacher": "smat-noteacher", "SMAT without the KD to Pre": "smat-nokl"}
    print("#### Ablations, one switch each\n\n" + ablations(root, episodes, families, "smat"))
    taus = sweep_families(root, "s", 0.9)
    print("#### Sparsity sweep\n\n" + paired_sweep(root, taus, 0.9, episodes, "τ"))
    experts = sweep_families(root, "m", 8.0)
    print("#### Expert sweep\n\n" + paired_sweep(root, experts, 8.0, episodes, "M", per_doubling=True))
    if args.plot:
        means, _ = shared(root, list(taus.values()), episodes)
        if means:
            pictures.plot_sparsity_sweep({t: means[p] for t, p in taus.items() if p in means}, args.plot,
                                         {"Pre": first(pre, episodes), "PMF": first(tables.average_runs(list(pmf.values())), episodes)})
    print(fine_tuned(root / "finetune", "Embedded benchmark, full fine-tuning", {"Pre": {0: pre}, "PMF": pmf, "SMAT": smat}))


if __name__ == "__main__":
    main()
