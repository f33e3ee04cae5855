"""Results on disk: results.json / .md / .csv, comparison files, the long-form CSV, --gather, --compare.

Plumbing for evaluate.py and train.py's final test: a results dict (evaluate.evaluate_model) is
written into a run directory whole (a temporary file renamed), under a name that says what was
measured and that no other evaluation has; the csv is its long form, one row per run × domain, for
pandas. `evaluate.py --compare` reads stored files back (older formats upgraded) and computes nothing
again; `--gather` joins every results csv under a folder. The numbers and tables are tables.py's.
"""

import csv
import hashlib
import io
import json
import os
import platform
import re
import subprocess
import time
from functools import cache
from pathlib import Path

import torch
from rich.console import Console

import cli
import rundir
from tables import (
    AVERAGES,
    RESULTS_FORMAT,
    EvaluateError,
    average_groups,
    confidence_interval,
    markdown_text,
    pair_key,
    pairwise,
    per_episode,
    print_table,
    protocol_text,
    with_baselines,
)

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
                  stem: str = "results") -> dict:
    """<stem>.json, .md and .csv in `run_dir` (results.*: train.py's final test). `baselines` (e.g.
    {"Pre": ...}) join the json and the table, before the run, with the run's paired difference
    against each; the csv is the long form of all of it (long_rows). Returns what the json holds."""
    results = with_baselines(results, baselines)
    name = Path(run_dir).name
    columns = {**(baselines or {}), name: results}
    differences = {k: v | {"a": name} for k, v in results.get("paired", {}).items()}  # the run's column name
    header = (f"{results['partition']} classes, {protocol_text(results['protocol'])}, seed {results['seed']}, "
              f"{time.strftime('%Y-%m-%d')}" + (f", data `{results['data']}`" if results.get("data") else "")
              + "".join(f", {k} = {v}" for k, v in results.get("variant", {}).items()) + ".")
    write_files(run_dir, stem, {
        ".json": json.dumps(results, indent=2, allow_nan=False) + "\n",
        ".md": markdown_text(f"Results: {name}", header, list(columns.values()), list(columns), differences),
        ".csv": long_csv(columns, differences)})
    return results


def write_comparison(directory: Path, results: list[dict], names: list[str], paths: list[str],
                     paired: dict[str, dict]) -> Path:
    """comparison-<what was measured>.json, .md and .csv in `directory`, under a name no file has:
    every run's results (without per-episode lists) and its source, and `paired`, every pairwise
    paired difference (tables.pairwise). Returns the path without its suffix."""
    stem = free_name(directory, "comparison" + results_name(results[-1]).removeprefix("results"))
    heavy = {"accuracies", "router_weights", "baselines", "paired", "experts", "config"}
    runs = {name: {"source": path} | {k: v for k, v in r.items() if k not in heavy}
            | {"domains": {d: {k: v for k, v in c.items() if k not in heavy} for d, c in r["domains"].items()}}
            for name, r, path in zip(names, results, paths)}
    first = results[0]
    header = (f"{first['partition']} classes, {protocol_text(first['protocol'])}, seed {first['seed']}, "
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
        averages = {k: dict(zip(("mean", "ci95"), confidence_interval(per_episode(r, group).mean(1))))
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


GATHERED = ("run", "method", "domain", "split", "mean", "ci95")  # what makes a csv a results csv, in any version


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
            header, *lines = list(csv.reader(io.StringIO(path.read_text(), newline=""), strict=True)) or [[]]
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise EvaluateError(f"cannot read {path} ({cli.reason(error)}); remove it or write it again") from None
        bad_line = next((i + 2 for i, line in enumerate(lines) if len(line) != len(header)), None)
        if not set(GATHERED) <= set(header) or bad_line is not None:
            where = f"line {bad_line} has another number of cells than its header" if bad_line else \
                "its header lacks " + ", ".join(c for c in GATHERED if c not in header)
            raise EvaluateError(f"{path} is not a results csv ({where}); remove it or write it again with evaluate.py")
        columns |= dict.fromkeys(header)
        rows += [{"file": str(path)} | dict(zip(header, line)) for line in lines]
    return _csv(rows, tuple(columns))


# --- --compare: stored results files, paired, nothing evaluated again --------------------------------


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
    twice = rundir.given_twice(paths)
    if twice is not None:
        raise EvaluateError(f"results file {twice} is given twice; name each once")
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
        written = write_comparison(out, results, names, [str(p) for p in paths], differences)
    print_table(results, names, console or cli.console(), differences, [str(p) for p in paths])
    return written
