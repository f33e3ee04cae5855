"""Meta-testing's numbers: 95% t-intervals, averages, paired differences, tables, results files, --compare.

Plumbing for evaluate.py and train.py's final test: a results dict (evaluate.evaluate_model) becomes
a rich table on the terminal, results.json / .md / .csv in a run directory (written whole, under a
name no other evaluation has; the csv in long form, one row per run × domain), paired differences
between every two runs on the same episodes, and a comparison file of several runs.
`evaluate.py --compare` reads stored results files back and computes nothing again; `--gather`
joins every results csv under a folder.
"""

import csv
import hashlib
import io
import itertools
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from rich.console import Console
from rich.table import Table
from torch import Tensor

import cli
import rundir

typechecked = jaxtyped(typechecker=beartype)  # JAXTYPING_DISABLE=1 turns every check off


class EvaluateError(ValueError):
    """A bad evaluation request (flag out of range, missing extra, unreadable results); the message is one line."""


# 2: per-episode accuracies in percent (like every mean), paired differences under ASCII keys "a - b"
# with their "a" and "b", the tested checkpoint. 1 (files without the field): accuracies as fractions,
# keys "a − b" with U+2212. `upgraded` reads a format-1 dict as format 2.
RESULTS_FORMAT = 2


def upgraded(results: dict) -> dict:
    """A stored results dict in today's format (RESULTS_FORMAT); a current one is returned as it is."""
    if results.get("results_format", 1) >= RESULTS_FORMAT:
        return results
    domains = {name: d | {"accuracies": [round(100 * a, 4) for a in d["accuracies"]]} if "accuracies" in d else d
               for name, d in results["domains"].items()}  # fractions rounded to 6 places: 4 in percent
    out = results | {"results_format": RESULTS_FORMAT, "domains": domains}
    if "baselines" in results:
        out["baselines"] = {name: upgraded(base) for name, base in results["baselines"].items()}
    if "paired" in results:
        out["paired"] = {}
        for key, value in results["paired"].items():
            a, _, b = key.partition(" \u2212 ")
            out["paired"][pair_key(a, b)] = {"a": a, "b": b} | value
    return out


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


def _averages(domains: dict) -> dict[str, float | None]:
    """Each average's mean accuracy, unweighted over its domains, as the paper."""
    groups = average_groups(domains)
    out: dict[str, float | None] = {"id_avg": None, "ood_avg": None}
    for key, names in groups.items():
        out[key] = sum(domains[n]["mean"] for n in names) / len(names)
    return out


def _per_episode(results: dict, domains: list[str]) -> Tensor:
    """episodes × domains matrix of per-episode accuracies (percent)."""
    return torch.tensor([results["domains"][d]["accuracies"] for d in domains], dtype=torch.float64).T


def paired_difference(a: dict, b: dict) -> dict:
    """a − b on the same test episodes, in accuracy points: per domain and for the ID and OOD
    averages, the mean difference and the half-width of its paired 95% CI, t_{0.975, n-1}·sd(diff)/√n
    over n episodes (confidence_interval). For an average, episode i's difference is averaged over the split's domains first (the
    domains' episodes are drawn independently), so the CI is over n episode-averaged differences."""
    same = ("seed", "partition", "protocol")
    if any(a.get(k) != b.get(k) for k in same) or a["domains"].keys() != b["domains"].keys() or any(
            a["domains"][d]["episodes"] != b["domains"][d]["episodes"] for d in a["domains"]):
        raise EvaluateError("a paired difference needs the same episodes: the same domains, episode count, "
                            "seed, partition and protocol in both results")
    if any("accuracies" not in r["domains"][d] for r in (a, b) for d in a["domains"]):
        raise EvaluateError("a paired difference needs per-episode accuracies; evaluate again with this version")
    names = list(a["domains"])
    diff = _per_episode(a, names) - _per_episode(b, names)  # episodes × domains
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
    stacked = torch.stack([_per_episode(r, names) for r in results])  # runs × episodes × domains
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
    return {"results_format": RESULTS_FORMAT, "domains": domains, **_averages(domains),
            "method": first["method"], "finetune": first["finetune"], "partition": first["partition"],
            "seed": first["seed"], "protocol": first["protocol"], "runs": len(results)}


def split_average(results: dict, split: str) -> tuple[float, float] | None:
    """(mean, 95% CI half-width) of the split's average accuracy: episode i's accuracy averaged over
    the split's domains, then the CI over episodes. None when the split has no domain."""
    names = [d for d, v in results["domains"].items() if v["split"] == split]
    if not names:
        return None
    return confidence_interval(_per_episode(results, names).mean(1))


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
    table = Table(title=text(f"{mode} accuracy % ± 95% CI, {_describe(first['protocol'])}, "
                             f"{episodes} episodes per domain, seed {first['seed']}"))
    rows = _rows(results, list(differences.values()))
    for i, column in enumerate(("domain", "split")):  # at least as wide as their longest cell, however narrow the terminal
        table.add_column(text(column), no_wrap=True, min_width=max(len(text(r[i])) for r in [[column] * 2, *rows]))
    for column in [*names, *(difference_label(k, v, label) for k, v in differences.items())]:
        table.add_column(text(column), justify="right", no_wrap=True)
    for i, row in enumerate(rows):
        table.add_row(*map(text, row), end_section=i == len(rows) - 3)
    return table


def _describe(protocol: dict) -> str:
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
    lines = legend + [line for n, r in zip(names, results) if (line := lr_line(n, r))]
    lines += [f"{n}: {sparsity_line(r)}" for n, r in zip(names, results) if "sparsity" in r]
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
    lines = list(notes) + [line for n, r in zip(names, results) if (line := lr_line(n, r))]
    lines += [f"{n}: {sparsity_line(r)}" for n, r in zip(names, results) if "sparsity" in r]
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


# --- results files: where, under which name, what they record -----------------------------------------


def _git(*args: str) -> str | None:
    """The output of `git ARGS` in this file's folder, or None when git or the repository is missing."""
    try:
        done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


@cache
def _code_version() -> tuple[str | None, bool | None]:
    """(commit of the code that runs, whether tracked files differ from it), or Nones outside git."""
    commit = (_git("rev-parse", "HEAD") or "").strip()
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, None if status is None else bool(status.strip())


def provenance(device: str | torch.device) -> dict:
    """What produced a result besides its config and protocol: the code (commit, and whether tracked
    files had uncommitted changes), torch, python, device, and this evaluation's process count."""
    commit, dirty = _code_version()
    return {"git_commit": commit, "git_dirty": dirty, "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "processes": int(os.environ.get("WORLD_SIZE", "1"))}


def _shape(protocol: dict | None) -> str:
    protocol = protocol or {"kind": "variable"}
    return "var" if protocol["kind"] == "variable" else f"{protocol['ways']}w{protocol['shots']}s{protocol['queries']}q"


def data_slug(data_spec: str, limit: int = 32) -> str:
    """A short file-name slug of a --data string that keeps what tells it apart at a glance: per
    source its kind, its name (a torchvision key, or the folder's last path component) and its split
    mark, cut whole words from the right: "folder:/tmp/glyphs@ood" -> "folder-glyphs-ood"."""
    words = []
    for source in filter(None, data_spec.split(",")):
        source, mark = re.fullmatch(r"(.*?)(?:@(id|ood))?", source.strip()).groups()
        kind, _, rest = source.partition(":")
        fields = rest.split(":")
        name = next((f for f in fields if f and "/" not in f and "=" not in f), Path(fields[0]).name)
        words += [kind, name, mark or ""]
    slug = re.sub(r"[^a-z0-9]+", "-", "-".join(words).lower()).strip("-")
    while len(slug) > limit and "-" in slug:
        slug = slug.rsplit("-", 1)[0]
    return slug[:limit].strip("-") or "data"


def results_name(results: dict) -> str:
    """The file stem of an evaluation, named by what it measured:
    results-<mode>-<protocol>-<data>-seed<S>-<N>ep, where <protocol> is "var" (variable way/shot) or
    e.g. 5w1s15q, and <data> the data string's slug (data_slug) plus a short hash of all of it, e.g.
    results-zeroshot-5w5s15q-folder-glyphs-ood-3f2a1c-seed0-600ep."""
    data_spec = str(results.get("data", ""))
    digest = hashlib.sha256(data_spec.encode()).hexdigest()[:6]
    mode = "zeroshot" if results["finetune"] == "none" else results["finetune"]
    episodes = next(iter(results["domains"].values()))["episodes"] if results["domains"] else 0
    return f"results-{mode}-{_shape(results.get('protocol'))}-{data_slug(data_spec)}-{digest}-seed{results['seed']}-{episodes}ep"


SUFFIXES = (".json", ".md", ".csv")  # the files of one results stem


def free_name(directory: Path, stem: str) -> str:
    """`stem`, or stem-2, stem-3 ... : the first whose .json, .md and .csv are all absent from
    `directory`, so that an evaluation never replaces another's file."""
    candidates = (stem if k == 1 else f"{stem}-{k}" for k in range(1, 10_000))
    return next(c for c in candidates if not any((directory / f"{c}{x}").exists() or (directory / f"{c}{x}").is_symlink()
                                                 for x in SUFFIXES))


def write_files(directory: Path, stem: str, files: dict[str, str]) -> None:
    """{suffix: text} as <stem><suffix> in `directory`, each written to a temporary file and renamed,
    so a reader never sees half a file."""
    for suffix, content in files.items():
        rundir.atomic_write_text(content, Path(directory) / f"{stem}{suffix}")


def write_results(run_dir: Path, results: dict, baselines: dict[str, dict] | None = None,
                  stem: str = "results") -> None:
    """<stem>.json, .md and .csv in `run_dir` (results.*: train.py's final test). `baselines` (e.g.
    {"Pre": ...}) join the json and the table, before the run, with the run's paired difference
    against each; the csv is the long form of all of it (long_rows)."""
    results = with_baselines(results, baselines)
    name = Path(run_dir).name
    columns = {**(baselines or {}), name: results}
    differences = {k: v | {"a": name} for k, v in results.get("paired", {}).items()}  # the run's column name
    header = (f"{results['partition']} classes, {_describe(results['protocol'])}, seed {results['seed']}, "
              f"{time.strftime('%Y-%m-%d')}" + (f", data `{results['data']}`" if results.get("data") else "")
              + "".join(f", {k} = {v}" for k, v in results.get("variant", {}).items()) + ".")
    write_files(run_dir, stem, {
        ".json": json.dumps(results, indent=2, allow_nan=False) + "\n",
        ".md": markdown_text(f"Results: {name}", header, list(columns.values()), list(columns), differences),
        ".csv": long_csv(columns, differences)})


def write_comparison(directory: Path, results: list[dict], names: list[str], paths: list[str]) -> Path:
    """comparison-<what was measured>.json, .md and .csv in `directory`, under a name no file has:
    every run's results (without per-episode lists) and its source, and every pairwise paired
    difference (pairwise). Returns the path without its suffix."""
    paired = pairwise(results, names)
    stem = free_name(directory, "comparison" + results_name(results[-1]).removeprefix("results"))
    heavy = {"accuracies", "router_weights", "baselines", "paired", "experts", "config"}
    runs = {name: {"source": path} | {k: v for k, v in r.items() if k not in heavy}
            | {"domains": {d: {k: v for k, v in c.items() if k not in heavy} for d, c in r["domains"].items()}}
            for name, r, path in zip(names, results, paths)}
    first = results[0]
    header = (f"{first['partition']} classes, {_describe(first['protocol'])}, seed {first['seed']}, "
              f"{time.strftime('%Y-%m-%d')}.")
    write_files(directory, stem, {
        ".json": json.dumps({"results_format": RESULTS_FORMAT, "runs": runs, "paired": paired}, indent=2,
                            allow_nan=False) + "\n",
        ".md": markdown_text("Comparison", header, results, names, paired,
                             [f"{n}: {p}" for n, p in zip(names, paths)]),
        ".csv": long_csv(dict(zip(names, results)), paired)})
    return Path(directory) / stem


# --- the long form: one CSV row per run × domain, and --gather -----------------------------------------


CSV_COLUMNS = ("run", "minus", "method", "settings", "train_seed", "finetune", "finetune_lr", "protocol",
               "episode_seed", "episodes", "level", "domain", "split", "distance", "mean", "ci95")


def long_rows(runs: dict[str, dict], paired: dict[str, dict] | None = None) -> list[dict]:
    """One row per run × domain and per run × average (level "domain" / "average"): accuracy % and its
    95% CI; then the same per paired difference in `paired`, run = a and minus = b, in points (on the
    accuracy rows minus is empty). settings: the run's non-default settings, "key=value;key=value"."""
    rows = []

    def add(name: str, minus: str, r: dict, values: dict, averages: dict) -> None:
        common = {"run": name, "minus": minus, "method": r["method"], "finetune": r["finetune"],
                  "settings": ";".join(f"{k}={v}" for k, v in sorted(r.get("variant", {}).items())),
                  "train_seed": r.get("config", {}).get("seed", "") if r["method"] != "pre" else "",
                  "protocol": _shape(r.get("protocol")), "episode_seed": r["seed"]}
        for domain, d in r["domains"].items():
            rows.append(common | {"level": "domain", "domain": domain, "split": d["split"],
                                  "distance": d.get("distance", ""), "finetune_lr": d.get("finetune_lr", ""),
                                  "episodes": d["episodes"]} | _cells(values["domains"].get(domain)))
        for key, group in average_groups(r["domains"]).items():
            lrs = {r["domains"][n].get("finetune_lr", "") for n in group}
            split = "id" if key == "id_avg" else "ood"
            rows.append(common | {"level": "average", "domain": AVERAGES[key], "split": split,
                                  "distance": key.removesuffix("_ood_avg") if "_ood_" in key else "",
                                  "finetune_lr": lrs.pop() if len(lrs) == 1 else "",
                                  "episodes": r["domains"][group[0]]["episodes"]} | _cells(averages.get(key)))

    for name, r in runs.items():
        averages = {k: dict(zip(("mean", "ci95"), confidence_interval(_per_episode(r, group).mean(1))))
                    for k, group in average_groups(r["domains"]).items()
                    if all("accuracies" in r["domains"][n] for n in group)}
        add(name, "", r, r, averages)
    for entry in (paired or {}).values():
        add(entry["a"], entry["b"], runs[entry["a"]], entry, entry)
    return rows


def _cells(value: dict | None) -> dict:
    return {"mean": round(value["mean"], 4), "ci95": round(value["ci95"], 4)} if value else {"mean": "", "ci95": ""}


def _csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def long_csv(runs: dict[str, dict], paired: dict[str, dict] | None = None) -> str:
    return _csv(long_rows(runs, paired), CSV_COLUMNS)


def gather(folders: list[Path]) -> str:
    """Every results csv under `folders` (results.csv, results-*.csv, at any depth) as one CSV, with a
    first column "file" naming where each row came from; columns a file lacks are left empty."""
    files = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise EvaluateError(f"--gather {folder} is not a directory; give the folders that hold the runs")
        files += sorted(p for p in Path(folder).rglob("results*.csv") if p.is_file())
    if not files:
        raise EvaluateError(f"--gather: no results*.csv under {', '.join(map(str, folders))}; evaluate runs first "
                            f"(every results json has its csv beside it)")
    rows, columns = [], {"file": None}
    for path in files:
        try:
            found = list(csv.DictReader(io.StringIO(path.read_text())))
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise EvaluateError(f"cannot read {path} ({type(error).__name__}); remove it or write it again") from None
        for row in found:
            columns |= dict.fromkeys(row)
            rows.append({"file": str(path)} | row)
    return _csv(rows, tuple(columns))


# --- --compare: stored results files, paired, nothing evaluated again --------------------------------


def load_results(path: Path) -> dict:
    """One stored results file in today's format (upgraded), or an EvaluateError line naming what is
    wrong with it."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise EvaluateError(f"cannot read results file {path} ({type(error).__name__}); give results-*.json "
                            f"or results.json files written by evaluate.py or train.py") from None
    try:
        if not isinstance(results["domains"], dict) or not results["domains"]:
            raise TypeError
        return upgraded(results)
    except (KeyError, TypeError, AttributeError):
        raise EvaluateError(f"{path} is not a results file (no per-domain results); give results-*.json or "
                            f"results.json files written by evaluate.py or train.py") from None


def compare_files(paths: list[Path], out: Path | None = None, console: Console | None = None) -> Path | None:
    """The table of stored results files and every pairwise paired difference (same episodes needed),
    from their per-episode accuracies: nothing is evaluated again. With `out`, the comparison files
    there too (write_comparison); returns their path without suffix."""
    if len(paths) < 2:
        raise EvaluateError("--compare needs at least two results files")
    if out is not None:
        rundir.check_target_directory(out, "--out")
    results = [load_results(p) for p in paths]
    names = [Path(p).parent.name or str(p) for p in paths]
    if len(set(names)) < len(names):
        names = [f"{Path(p).parent.name}/{Path(p).stem}" for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    differences = pairwise(results, names)
    written = None
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        written = write_comparison(out, results, names, [str(p) for p in paths])
    print_table(results, names, console or cli.console(), differences, [str(p) for p in paths])
    return written
