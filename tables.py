"""Meta-testing's numbers as tables and files: 95% CIs, averages, paired differences, results, --compare.

Plumbing for evaluate.py and train.py's final test: a results dict (evaluate.evaluate_model) becomes
a rich table on the terminal, results.json / results.md in a run directory (written whole, under a
name no other evaluation has), and paired differences against Pre or another run on the same
episodes. `evaluate.py --compare` reads stored results files back and computes nothing again.
"""

import hashlib
import json
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


# --- statistics: the 95% CI [M1.6], the averages, paired differences -----------------------------


@typechecked
def confidence_interval(accuracies: Float[Tensor, " n_episodes"]) -> tuple[float, float]:
    """(mean, half-width of the 95% CI) in percent: 1.96·std/√n with the unbiased std [M1.6]."""
    percent = accuracies.double() * 100
    return percent.mean().item(), (1.96 * percent.std(correction=1) / len(percent) ** 0.5).item()


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
    """episodes × domains matrix of per-episode accuracies (fraction correct)."""
    return torch.tensor([results["domains"][d]["accuracies"] for d in domains], dtype=torch.float64).T


def paired_difference(a: dict, b: dict) -> dict:
    """a − b on the same test episodes, in accuracy points: per domain and for the ID and OOD
    averages, the mean difference and the half-width of its paired 95% CI, 1.96·std(diff)/√n over
    episodes. For an average, episode i's difference is averaged over the split's domains first (the
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
                         "accuracies": [round(x, 6) for x in mean[:, j].tolist()],
                         "run_means": [r["domains"][name]["mean"] for r in results]}
        if "distance" in first["domains"][name]:
            domains[name]["distance"] = first["domains"][name]["distance"]
    return {"domains": domains, **_averages(domains),
            "method": first["method"], "finetune": first["finetune"], "partition": first["partition"],
            "seed": first["seed"], "protocol": first["protocol"], "runs": len(results)}


def split_average(results: dict, split: str) -> tuple[float, float] | None:
    """(mean, 95% CI half-width) of the split's average accuracy: episode i's accuracy averaged over
    the split's domains, then the CI over episodes. None when the split has no domain."""
    names = [d for d, v in results["domains"].items() if v["split"] == split]
    if not names:
        return None
    return confidence_interval(_per_episode(results, names).mean(1))


# --- tables and results files ------------------------------------------------------------------------


def difference_cell(value: dict | None) -> str:
    return f"{value['mean']:+.2f} ± {value['ci95']:.2f}" if value else "-"


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
            text: Callable[[str], str] = str) -> Table:
    """One rich table: a row per domain, a column per result (accuracy % ± 95% CI), then a column per
    paired difference (points ± paired 95% CI). `text` maps every string (cli.to_ascii for a
    stream that cannot encode ±, so the table is laid out with what is printed)."""
    first, differences = results[0], differences or {}
    episodes = next(iter(first["domains"].values()))["episodes"]
    mode = "zero-shot" if first["finetune"] == "none" else f"fine-tuned ({first['finetune']})"
    table = Table(title=text(f"{mode} accuracy % ± 95% CI, {_describe(first['protocol'])}, "
                             f"{episodes} episodes per domain, seed {first['seed']}"))
    for column in ["domain", "split", *names, *differences]:
        table.add_column(text(column), justify="left" if column in ("domain", "split") else "right")
    rows = _rows(results, list(differences.values()))
    for i, row in enumerate(rows):
        table.add_row(*map(text, row), end_section=i == len(rows) - 3)
    return table


def _describe(protocol: dict) -> str:
    if protocol["kind"] == "variable":
        return "variable way/shot"
    return f"{protocol['ways']}-way {protocol['shots']}-shot {protocol['queries']}-query"


def sparsity_line(results: dict) -> str:
    """One line on the tested model's sparsity (results["sparsity"]), for tables and results.md."""
    s = results["sparsity"]
    per_expert = torch.tensor(s["per_expert"])
    return (f"sparsity of the tested model (test gates, τ = {s['target']}): per expert {per_expert.mean():.3f} "
            f"(min {per_expert.min():.3f}, max {per_expert.max():.3f}); gates exactly 0 or 1: "
            f"{s['binary_fraction']:.1%}; parameters one task's update Σ w_m z_m touches: "
            f"{s['task_update_density']:.1%}")


def print_table(results: list[dict], names: list[str], console: Console | None = None,
                differences: dict[str, dict] | None = None) -> None:
    console = console or Console()
    text = cli.to_ascii if console.options.ascii_only else str  # PYTHONIOENCODING=ascii: +/- for ±
    console.print(compare(results, names, differences, text))
    for name, result in zip(names, results):
        if "sparsity" in result:
            console.print(text(f"{name}: {sparsity_line(result)}"))


def markdown_table(results: list[dict], names: list[str], differences: dict[str, dict] | None = None) -> str:
    differences = differences or {}
    columns = names + list(differences)
    lines = ["| domain | split | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    rows = _rows(results, list(differences.values()))
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def run_name(results: dict) -> str:
    return results["method"] + ("" if results["finetune"] == "none" else f"+{results['finetune']}")


def with_baselines(results: dict, baselines: dict[str, dict] | None) -> dict:
    """`results` with {"baselines": {name: ...}} and {"paired": {"method − name": paired difference}}."""
    if not baselines:
        return results
    paired = {f"{run_name(results)} − {name}": paired_difference(results, base) for name, base in baselines.items()}
    return results | {"baselines": baselines, "paired": paired}


@cache
def _git_commit() -> str | None:
    """The commit of the code that runs (`git rev-parse HEAD` in this file's folder), or None."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def provenance(device: str | torch.device) -> dict:
    """What produced a result besides its config and protocol: code version, torch, python, device."""
    return {"git_commit": _git_commit(), "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device)}


def results_name(results: dict) -> str:
    """The file stem of an evaluation, named by what it measured:
    results-<mode>-<protocol>-<data>-seed<S>-<N>ep, where <protocol> is "var" (variable way/shot) or
    e.g. 5w1s15q, and <data> a short slug of the data string (its end, where paths differ) plus a
    short hash of all of it, e.g. results-zeroshot-5w5s15q-folder-tmp-glyphs-ood-3f2a1c-seed0-600ep."""
    data_spec = str(results.get("data", ""))
    slug = re.sub(r"[^a-z0-9]+", "-", data_spec.lower()).strip("-")[-24:].strip("-") or "data"
    digest = hashlib.sha256(data_spec.encode()).hexdigest()[:6]
    mode = "zeroshot" if results["finetune"] == "none" else results["finetune"]
    protocol = results.get("protocol") or {"kind": "variable"}
    shape = ("var" if protocol["kind"] == "variable"
             else f"{protocol['ways']}w{protocol['shots']}s{protocol['queries']}q")
    episodes = next(iter(results["domains"].values()))["episodes"] if results["domains"] else 0
    return f"results-{mode}-{shape}-{slug}-{digest}-seed{results['seed']}-{episodes}ep"


def free_name(directory: Path, stem: str) -> str:
    """`stem`, or stem-2, stem-3 ... : the first whose .json and .md are both absent from `directory`,
    so that an evaluation never replaces another's file."""
    candidates = (stem if k == 1 else f"{stem}-{k}" for k in range(1, 10_000))
    return next(c for c in candidates if not any((directory / f"{c}{x}").exists() or (directory / f"{c}{x}").is_symlink()
                                                 for x in (".json", ".md")))


def write_results(run_dir: Path, results: dict, baselines: dict[str, dict] | None = None,
                  stem: str = "results") -> None:
    """<stem>.json and <stem>.md in `run_dir` (results.json / results.md: train.py's final test), each
    written to a temporary file and renamed, so a reader never sees half a file. `baselines` (e.g.
    {"Pre": ...}) join the json and the table, with the paired difference of the run against each."""
    results = with_baselines(results, baselines)
    extra = list((baselines or {}).items())
    text = (f"# Results: {Path(run_dir).name}\n\n{results['partition']} classes, "
            f"{_describe(results['protocol'])}, seed {results['seed']}, {time.strftime('%Y-%m-%d')}"
            + (f", data `{results['data']}`" if results.get("data") else "")
            + "".join(f", {k} = {v}" for k, v in results.get("variant", {}).items()) + ". "
            f"Accuracy % ± 95% CI; differences in points ± paired 95% CI over the same episodes.\n\n"
            + markdown_table([results] + [r for _, r in extra], [run_name(results)] + [n for n, _ in extra],
                             results.get("paired"))
            + (f"\n{sparsity_line(results)}\n" if "sparsity" in results else ""))
    files = {f"{stem}.json": json.dumps(results, indent=2, allow_nan=False) + "\n", f"{stem}.md": text}
    for name, content in files.items():
        rundir.atomic_write_text(content, Path(run_dir) / name)


# --- --compare: stored results files, paired, nothing evaluated again --------------------------------


def load_results(path: Path) -> dict:
    """One stored results file, or an EvaluateError line naming what is wrong with it."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise EvaluateError(f"cannot read results file {path} ({type(error).__name__}); give results-*.json "
                            f"or results.json files written by evaluate.py or train.py") from None
    if not isinstance(results, dict) or not isinstance(results.get("domains"), dict) or not results["domains"]:
        raise EvaluateError(f"{path} is not a results file (no per-domain results); give results-*.json or "
                            f"results.json files written by evaluate.py or train.py")
    return results


def compare_files(paths: list[Path], console: Console | None = None) -> None:
    """The table of stored results files and each one's paired difference against the first (same
    episodes needed), from their per-episode accuracies: nothing is evaluated again."""
    if len(paths) < 2:
        raise EvaluateError("--compare needs at least two results files")
    results = [load_results(p) for p in paths]
    names = [Path(p).parent.name or str(p) for p in paths]
    if len(set(names)) < len(names):
        names = [f"{Path(p).parent.name}/{Path(p).stem}" for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    differences = {f"{name} − {names[0]}": paired_difference(result, results[0])
                   for name, result in zip(names[1:], results[1:])}
    print_table(results, names, console or Console(), differences)
