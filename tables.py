"""Meta-testing's numbers: 95% t-intervals, averages, paired differences, and their tables.

Plumbing for evaluate.py and train.py's final test: a results dict (evaluate.evaluate_model) becomes
a rich table on the terminal and a markdown table, with the paired differences between runs on the
same episodes (every pair, `pairwise`) and the tested model's sparsity. resultfiles.py writes them
to disk and reads them back.
"""

import itertools
from collections.abc import Callable

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from rich.console import Console
from rich.table import Table
from torch import Tensor

import cli

typechecked = jaxtyped(typechecker=beartype)  # JAXTYPING_DISABLE=1 turns every check off


class EvaluateError(ValueError):
    """A bad evaluation request (flag out of range, missing extra, unreadable results); the message is one line."""


# What a results dict's fields mean. 2: per-episode accuracies in percent (like every mean), paired
# differences under ASCII keys "a - b" with their "a" and "b", the tested checkpoint. 1 (stored files
# without the field): accuracies as fractions, keys "a − b" with U+2212 (resultfiles.upgraded reads them).
RESULTS_FORMAT = 2


# --- statistics: the 95% CI [M1.6], the averages, paired differences -----------------------------


# Student's t 0.975 quantile for the few degrees of freedom where the expansion below is off by more
# than 1e-5 (values to 4 decimals); from 10 on, t_975 computes it.
T_975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 8: 2.3060, 9: 2.2622}
Z_975 = 1.959963984540054  # the standard normal's 0.975 quantile


def t_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom: the table for df < 10, else the
    Cornish-Fisher expansion of t in powers of 1/df around the normal quantile (Abramowitz & Stegun
    26.7.5, four terms; off by < 1e-5 at df = 10 and < 1e-9 from df = 50)."""
    if df < 1:
        raise ValueError(f"a t quantile needs df >= 1, not {df}")
    if df in T_975:
        return T_975[df]
    z = Z_975
    terms = ((z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
             (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160)
    return z + sum(g / df**k for k, g in enumerate(terms, 1))


@typechecked
def confidence_interval(values: Float[Tensor, " n"]) -> tuple[float, float]:
    """(mean, half-width of its 95% CI) in the values' unit: t_{0.975, n-1}·sd/√n with the unbiased sd
    [M1.6]. The t quantile, not the normal's 1.96, so that few values (seeds) get the wide interval
    they need (at n = 3: 4.30·sd/√3); at 600 episodes the two differ by 0.2%."""
    values = values.double()
    n = len(values)
    return values.mean().item(), (t_975(n - 1) * values.std(correction=1) / n**0.5).item()


def t_interval(values: list[float]) -> tuple[float, float] | None:
    """confidence_interval of a list (e.g. one difference per seed); None for fewer than 2 values."""
    return confidence_interval(torch.tensor(values, dtype=torch.float64)) if len(values) >= 2 else None


# The averages a results dict carries, with their table labels. ID and OOD always (None without
# such a domain); near and far OOD where some OOD domain says how far it is (the embedded ones do).
AVERAGES = {"id_avg": "ID avg", "ood_avg": "OOD avg", "near_ood_avg": "near OOD avg", "far_ood_avg": "far OOD avg"}


def average_groups(domains: dict) -> dict[str, list[str]]:
    """The domains each average is over, for the averages that have any (key of AVERAGES -> names)."""
    member = {"id_avg": lambda d: d["split"] == "id", "ood_avg": lambda d: d["split"] == "ood",
              "near_ood_avg": lambda d: d.get("distance") == "near",
              "far_ood_avg": lambda d: d.get("distance") == "far"}
    groups = {key: [name for name, d in domains.items() if member[key](d)] for key in AVERAGES}
    return {key: names for key, names in groups.items() if names}


def averages(domains: dict) -> dict[str, float | None]:
    """Each average's mean accuracy, unweighted over its domains, as the paper."""
    groups = average_groups(domains)
    out: dict[str, float | None] = {"id_avg": None, "ood_avg": None}
    for key, names in groups.items():
        out[key] = sum(domains[n]["mean"] for n in names) / len(names)
    return out


def per_episode(results: dict, domains: list[str]) -> Tensor:
    """episodes × domains matrix of per-episode accuracies (percent)."""
    return torch.tensor([results["domains"][d]["accuracies"] for d in domains], dtype=torch.float64).T


def paired_difference(a: dict, b: dict) -> dict:
    """a − b on the same test episodes, in accuracy points: per domain and for the ID and OOD
    averages, the mean difference and the half-width of its paired 95% CI, t_{0.975, n-1}·sd(diff)/√n
    over n episodes (confidence_interval). For an average, episode i's difference is averaged over the
    split's domains first (the domains' episodes are drawn independently), so the CI is over n
    episode-averaged differences. Two results that record their --data must have tested the same: a
    folder called glyphs in two places has the same domain name and other images."""
    same = ("seed", "partition", "protocol")
    if any(a.get(k) != b.get(k) for k in same) or a["domains"].keys() != b["domains"].keys() or any(
            a["domains"][d]["episodes"] != b["domains"][d]["episodes"] for d in a["domains"]):
        raise EvaluateError("a paired difference needs the same episodes: the same domains, episode count, "
                            "seed, partition and protocol in both results")
    if a.get("data") is not None and b.get("data") is not None and a["data"] != b["data"]:
        raise EvaluateError(f"a paired difference needs the same episodes, but one result tested --data {a['data']} "
                            f"and the other --data {b['data']}; evaluate both runs on one --data")
    if any("accuracies" not in r["domains"][d] for r in (a, b) for d in a["domains"]):
        raise EvaluateError("a paired difference needs per-episode accuracies; evaluate again with this version")
    names = list(a["domains"])
    diff = per_episode(a, names) - per_episode(b, names)  # episodes × domains
    out = {"domains": {}, "id_avg": None, "ood_avg": None}
    for j, name in enumerate(names):
        mean, ci95 = confidence_interval(diff[:, j])
        out["domains"][name] = {"split": a["domains"][name]["split"], "mean": mean, "ci95": ci95}
    for key, group in average_groups(a["domains"]).items():
        mean, ci95 = confidence_interval(diff[:, [names.index(n) for n in group]].mean(1))
        out[key] = {"mean": mean, "ci95": ci95}
    return out


def average_runs(results: list[dict]) -> dict:
    """The mean of several runs (e.g. seeds) evaluated on the same episodes, as one results dict:
    episode i's accuracy is the mean of the runs' accuracies on episode i, so paired differences of
    two averages compare methods on identical tasks. `runs` says how many were averaged."""
    first, names = results[0], list(results[0]["domains"])
    for other in results[1:]:
        paired_difference(first, other)  # raises unless every run saw the same episodes
    stacked = torch.stack([per_episode(r, names) for r in results])  # runs × episodes × domains
    mean = stacked.mean(0)
    domains = {}
    for j, name in enumerate(names):
        centre, ci95 = confidence_interval(mean[:, j])
        domains[name] = {"split": first["domains"][name]["split"], "mean": centre, "ci95": ci95,
                         "episodes": first["domains"][name]["episodes"],
                         "accuracies": [round(x, 6) for x in mean[:, j].tolist()],  # percent
                         "run_means": [r["domains"][name]["mean"] for r in results]}
        if "distance" in first["domains"][name]:
            domains[name]["distance"] = first["domains"][name]["distance"]
    return {"results_format": RESULTS_FORMAT, "domains": domains, **averages(domains),
            "method": first["method"], "finetune": first["finetune"], "partition": first["partition"],
            "seed": first["seed"], "protocol": first["protocol"], "runs": len(results)} | (
        {"data": first["data"]} if first.get("data") is not None else {})


def split_average(results: dict, split: str) -> tuple[float, float] | None:
    """(mean, 95% CI half-width) of the split's average accuracy: episode i's accuracy averaged over
    the split's domains, then the CI over episodes. None when the split has no domain."""
    names = [d for d, v in results["domains"].items() if v["split"] == split]
    if not names:
        return None
    return confidence_interval(per_episode(results, names).mean(1))


# --- tables: the terminal and results.md, the same columns in the same order -----------------------


SPARSITY_SHORTFALL = 0.05  # an expert this far below τ has not met the constraint: more than noise around τ
SHORT_NAME = 8  # a run name longer than this becomes a letter when the whole names do not fit the terminal


def difference_cell(value: dict | None) -> str:
    return f"{value['mean']:+.2f} ± {value['ci95']:.2f}" if value else "-"


def pair_key(a: str, b: str) -> str:
    """The ASCII key of the paired difference a − b in results files ("smat - Pre")."""
    return f"{a} - {b}"


def pairwise(results: list[dict], names: list[str]) -> dict[str, dict]:
    """Every later − earlier paired difference of `results` (B − A, C − A, C − B for A, B, C), each
    with its "a" and "b": the same episodes are needed (paired_difference)."""
    return {pair_key(names[j], names[i]): {"a": names[j], "b": names[i]} | paired_difference(results[j], results[i])
            for i, j in itertools.combinations(range(len(results)), 2)}


def difference_label(key: str, value: dict, label: Callable[[str], str] = str) -> str:
    """A difference column's header: "a − b" from its runs' labels, or its key."""
    return f"{label(value['a'])} − {label(value['b'])}" if "a" in value else key


def column_label(name: str, results: dict) -> str:
    """A run's column header: its name and, fine-tuned, the lr it was tuned with, so that a column
    never claims a fine-tuning that did not happen (lr 0 is the zero-shot model)."""
    lrs = {d.get("finetune_lr") for d in results["domains"].values()}
    if results["finetune"] == "none" or len(lrs) != 1 or None in lrs:
        return name if results["finetune"] == "none" else f"{name} (lr per domain, below)"
    (lr,) = lrs
    chosen = " chosen" if "finetune_lr_search" in results else ""
    return f"{name} (lr 0{chosen}: no fine-tuning)" if lr == 0 else f"{name} (lr {lr:g}{chosen})"


def lr_line(name: str, results: dict) -> str | None:
    """The lr of every domain of a run fine-tuned with a different lr per domain, else None."""
    if not column_label(name, results).endswith("(lr per domain, below)"):
        return None
    how = "chosen on validation classes" if "finetune_lr_search" in results else "given"
    lrs = [f"{d} {v.get('finetune_lr', 0):g}" + (" (no fine-tuning)" if not v.get("finetune_lr") else "")
           for d, v in results["domains"].items()]
    return f"{name}: fine-tuning lr per domain ({how}): " + ", ".join(lrs)


def _rows(results: list[dict], differences: list[dict] = ()) -> list[list[str]]:
    """Domain, split, then "mean ± ci" per result and "±diff ± ci" per paired difference; the ID and
    OOD averages last."""
    domains = list(dict.fromkeys(d for r in results for d in r["domains"]))
    rows = []
    for domain in domains:
        cells = [r["domains"].get(domain) for r in results]
        first = next(c for c in cells if c)
        split = f"{first['split']} {first['distance']}" if "distance" in first else first["split"]
        rows.append([domain, split] + [f"{c['mean']:.2f} ± {c['ci95']:.2f}" if c else "-" for c in cells]
                    + [difference_cell(d["domains"].get(domain)) for d in differences])
    for key, label in AVERAGES.items():
        if key in ("id_avg", "ood_avg") or any(r.get(key) is not None for r in results):
            rows.append([label, ""] + [f"{r[key]:.2f}" if r.get(key) is not None else "-" for r in results]
                        + [difference_cell(d.get(key)) for d in differences])
    return rows


def compare(results: list[dict], names: list[str], differences: dict[str, dict] | None = None,
            text: Callable[[str], str] = str, label: Callable[[str], str] = str) -> Table:
    """One rich table: a row per domain, a column per result (accuracy % ± 95% CI), then a column per
    paired difference (points ± paired 95% CI). `names` are the column headers; `label` maps a run's
    name to what a difference's header calls it; `text` maps every string (cli.to_ascii for a stream
    that cannot encode ±, so the table is laid out with what is printed). Domain names are never cut."""
    first, differences = results[0], differences or {}
    episodes = next(iter(first["domains"].values()))["episodes"]
    mode = "zero-shot" if first["finetune"] == "none" else f"fine-tuned ({first['finetune']})"
    table = Table(title=text(f"{mode} accuracy % ± 95% CI, {protocol_text(first['protocol'])}, "
                             f"{episodes} episodes per domain, seed {first['seed']}"))
    rows = _rows(results, list(differences.values()))
    for i, column in enumerate(("domain", "split")):  # at least as wide as their longest cell, however narrow the terminal
        table.add_column(text(column), no_wrap=True, min_width=max(len(text(r[i])) for r in [[column] * 2, *rows]))
    for column in [*names, *(difference_label(k, v, label) for k, v in differences.items())]:
        table.add_column(text(column), justify="right", no_wrap=True)
    for i, row in enumerate(rows):
        table.add_row(*map(text, row), end_section=i == len(rows) - 3)
    return table


def protocol_text(protocol: dict) -> str:
    if protocol["kind"] == "variable":
        return "variable way/shot"
    return f"{protocol['ways']}-way {protocol['shots']}-shot {protocol['queries']}-query"


def sparsity_line(results: dict) -> str:
    """One line on the tested model's sparsity (results["sparsity"]), for tables and results.md, with
    a warning when an expert is more than SPARSITY_SHORTFALL below its target τ."""
    s = results["sparsity"]
    per_expert = torch.tensor(s["per_expert"])
    line = (f"sparsity of the tested model (test gates, τ = {s['target']}): per expert {per_expert.mean():.3f} "
            f"(min {per_expert.min():.3f}, max {per_expert.max():.3f}); gates exactly 0 or 1: "
            f"{s['binary_fraction']:.1%}; parameters one task's update Σ w_m z_m touches: "
            f"{s['task_update_density']:.1%}")
    if per_expert.min() < s["target"] - SPARSITY_SHORTFALL:
        line += (f". WARNING: an expert is {s['target'] - per_expert.min().item():.3f} below τ = {s['target']}: the "
                 f"sparsity constraint was not met, so this is not the sparse model the method describes; "
                 f"train longer (more --episodes) until every expert reaches τ")
    return line


def note_lines(names: list[str], results: list[dict]) -> list[str]:
    """The lines under a table: each run's per-domain fine-tuning lrs and its tested model's sparsity."""
    lrs = [line for n, r in zip(names, results) if (line := lr_line(n, r))]
    return lrs + [f"{n}: {sparsity_line(r)}" for n, r in zip(names, results) if "sparsity" in r]


def print_table(results: list[dict], names: list[str], console: Console | None = None,
                differences: dict[str, dict] | None = None, paths: list[str] | None = None) -> None:
    """The table on `console`: runs under their whole names where the table fits its width, else
    each long name as a letter, with a legend mapping the letter to the run (`paths`, else the name);
    then the lr and sparsity lines."""
    console = console or cli.console()
    text = cli.to_ascii if console.options.ascii_only else str  # PYTHONIOENCODING=ascii: +/- for ±
    table = compare(results, [column_label(n, r) for n, r in zip(names, results)], differences, text)
    legend = []
    if console.measure(table, options=console.options.update_width(10**6)).maximum > console.width:
        long = [n for n in names if len(n) > SHORT_NAME]
        letters = dict(zip(long, (chr(ord("A") + i) if i < 26 else f"R{i + 1}" for i in range(len(long)))))
        where = dict(zip(names, paths or names))
        legend = [f"{letter} = {where[name]}" for name, letter in letters.items()]
        short = lambda name: letters.get(name, name)  # noqa: E731
        table = compare(results, [column_label(short(n), r) for n, r in zip(names, results)], differences, text, short)
    console.print(table)
    lines = legend + note_lines(names, results)
    for line in lines:
        cli.print_line(console, line)


def markdown_table(results: list[dict], names: list[str], differences: dict[str, dict] | None = None) -> str:
    differences = differences or {}
    columns = names + [difference_label(k, v) for k, v in differences.items()]
    lines = ["| domain | split | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    rows = _rows(results, list(differences.values()))
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def markdown_text(title: str, header: str, results: list[dict], names: list[str], differences: dict[str, dict],
                  notes: list[str] = ()) -> str:
    """A results .md: title, one header line, the table (as the terminal's, whole names), then the
    notes, lr and sparsity lines."""
    lines = list(notes) + note_lines(names, results)
    return (f"# {title}\n\n{header} Accuracy % ± 95% CI; differences in points ± paired 95% CI over the same "
            f"episodes.\n\n" + markdown_table(results, [column_label(n, r) for n, r in zip(names, results)], differences)
            + "".join(f"\n{line}\n" for line in lines))


def run_name(results: dict) -> str:
    return results["method"] + ("" if results["finetune"] == "none" else f"+{results['finetune']}")


def with_baselines(results: dict, baselines: dict[str, dict] | None) -> dict:
    """`results` with {"baselines": {name: ...}} and {"paired": {"method - name": paired difference}}."""
    if not baselines:
        return results
    paired = {pair_key(run_name(results), name): {"a": run_name(results), "b": name} | paired_difference(results, base)
              for name, base in baselines.items()}
    return results | {"baselines": baselines, "paired": paired}
