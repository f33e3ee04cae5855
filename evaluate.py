"""Meta-test SMAT runs: `python evaluate.py RUN_DIR [RUN_DIR ...]`.

Every run is tested on the same seeded episodes of every ID and OOD domain (600 per domain by
default) and reported as mean accuracy with a 95% confidence interval [M1.6], zero-shot
[M5.1] or after fine-tuning on the support set [M5.2; finetuning.py]. Start at
`evaluate_model`; below it are the choice of the fine-tuning lr on validation episodes, tables and
results files, inference cost and pictures, and last the command line, which only parses flags and
calls these functions. Runs are read through rundir.py; this module never imports train.py.
"""

import copy
import hashlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, replace
from functools import cache
from pathlib import Path
from typing import Annotated, Literal, Optional

import jaxtyping
import torch
import typer
from beartype import beartype
from jaxtyping import Float, jaxtyped
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import Tensor, nn

import data
import devices
import readers
import cli
import rundir
import smat
from data import Episode, Source
from finetuning import FINETUNE_STEPS, FinetuneError, finetune_logits
from smat import SMAT, Config

typechecked = jaxtyped(typechecker=beartype)  # JAXTYPING_DISABLE=1 turns every check off

FinetuneMode = Literal["none", "full", "lora"]
# Candidate learning rates, tried in this order; strict ">" so lr 0 (no fine-tuning) wins ties
# [official: find_best_finetune_configs, MD list without its extremes 1e-6 and 0.1].
LR_CANDIDATES = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
LR_SEARCH_EPISODES = 5  # validation episodes per domain for the lr search [official: 5 test episodes]
MAX_FINETUNE_LR = 1.0  # AdamW moves every weight by about lr per step: above 1 a ViT is destroyed, not tuned
# progress(stage, total) -> tick: how an evaluation reports its episodes (`Stages` draws them in a terminal)
Announce = Callable[[str, int], Callable[[], None]]
PICTURES = ("router_weights.png", "kept_fraction.png", "mask_overlap.png")  # --plots, in each run directory


class EvaluateError(ValueError):
    """A bad evaluation request (flag out of range, missing extra); the message is one line."""


# --- § 1 Meta-testing: episodes -> accuracies -> mean ± 95% CI ------------------------------------


@typechecked
def confidence_interval(accuracies: Float[Tensor, " n_episodes"]) -> tuple[float, float]:
    """(mean, half-width of the 95% CI) in percent: 1.96·std/√n with the unbiased std [M1.6]."""
    percent = accuracies.double() * 100
    return percent.mean().item(), (1.96 * percent.std(correction=1) / len(percent) ** 0.5).item()


PROTOCOL_FIELDS = ("test_protocol", "test_ways", "test_shots", "test_queries")


def evaluate_model(
    model: SMAT,
    sources: list[Source],
    cfg: Config,
    *,
    partition: Literal["val", "test"] = "test",
    episodes: int,
    seed: int,
    finetune: FinetuneMode = "none",
    finetune_lr: float | None = None,
    finetune_steps: int = FINETUNE_STEPS,
    baseline: Literal["model", "pretrained"] = "model",
    device: str | torch.device = "cpu",
    progress: Announce | None = None,
) -> dict:
    """Accuracy of `model` on `episodes` seeded episodes of every source, as one results dict: per
    domain its split, mean and 95% CI, per-episode accuracies and mean router weights; the ID and OOD
    averages; the protocol, seed and config (and, for SMAT, the tested model's sparsity).

    `cfg` gives the protocol and image size (the model's own config gives the method). The same
    `seed` yields the same episodes for every model. `baseline="pretrained"` is "Pre": ProtoNet on
    θ_pre. Fine-tuning uses `finetune_lr` if given, else the lr chosen on validation episodes.
    `progress(stage, total)` announces each stage ("lr search D", "test D") with its number of
    episodes and returns the function called after every one of them (`Stages` draws them).
    """
    check_request(episodes, finetune, finetune_lr, seed)
    model = model.to(device)
    lrs, search = {s.name: 0.0 for s in sources}, None
    if finetune != "none" and finetune_lr is not None:
        lrs = {s.name: finetune_lr for s in sources}
    elif finetune != "none":
        lrs, search = select_finetune_lr(model, sources, cfg, finetune, seed=seed, baseline=baseline,
                                         device=device, steps=finetune_steps, progress=progress)
    started, domains, protocol = time.perf_counter(), {}, data.protocol(cfg, "test")
    # the test gates do not depend on the task: computed once, not once per episode
    gates = tested_gates(model, baseline)
    density = 0.0
    for source in sources:
        tasks = data.evaluation_episodes(source, partition, protocol, episodes, seed, cfg.image_size)
        accuracies, weights, domain_density = _accuracies(model, tasks, finetune, lrs[source.name], baseline,
                                                          finetune_steps, seed, device, gates,
                                                          progress and progress(f"{partition} {source.name}", episodes))
        mean, ci95 = confidence_interval(accuracies.cpu())
        if not math.isfinite(mean):  # _accuracies marks an episode with non-finite logits as NaN
            raise EvaluateError(non_finite_message(source.name, accuracies, finetune, lrs[source.name]))
        domains[source.name] = {"split": source.split, "mean": mean, "ci95": ci95, "episodes": episodes,
                                "router_weights": (weights / episodes).tolist(),
                                "accuracies": [round(a, 6) for a in accuracies.tolist()]}
        if source.distance:
            domains[source.name]["distance"] = source.distance
        if gates is not None:
            domains[source.name]["task_update_density"] = domain_density.item() / episodes
            density += domain_density.item() / episodes / len(sources)
        if finetune != "none":
            domains[source.name]["finetune_lr"] = lrs[source.name]
    results = {"domains": domains, **_averages(domains),
               "method": "pre" if baseline == "pretrained" else model.cfg.method,
               "variant": {} if baseline == "pretrained" else rundir.variant(model.cfg), "finetune": finetune,
               "partition": partition, "seed": seed, "protocol": asdict(protocol),
               "seconds": round(time.perf_counter() - started, 2), "config": model.cfg.to_dict(), "data": cfg.data,
               "provenance": provenance(device)}
    if search is not None:
        results["finetune_lr_search"] = search
    if gates is not None:
        results["experts"] = {"kept_fraction": kept_fraction(model), "overlap": mask_overlap(model).tolist(),
                              "parameters": dict(zip(model.layout.names, model.layout.numels))}
        results["sparsity"] = sparsity_report(gates, density, model.cfg.sparsity)
    return results


def check_request(episodes: int | None, finetune: str, finetune_lr: float | None, seed: int = 0) -> None:
    """The evaluation flags, before any work (`episodes` None: the run's own, checked by its Config)."""
    if episodes is not None and episodes < 2:
        raise EvaluateError(f"episodes = {episodes} is too few; a confidence interval needs >= 2 per domain")
    if finetune not in ("none", "full", "lora"):
        raise EvaluateError(f"finetune = {finetune!r} is not valid; use none, full or lora")
    if finetune_lr is not None and not (math.isfinite(finetune_lr) and 0 <= finetune_lr <= MAX_FINETUNE_LR):
        raise EvaluateError(f"finetune_lr = {finetune_lr} is not valid; use a finite learning rate >= 0 and "
                            f"<= {MAX_FINETUNE_LR}")
    if finetune_lr is not None and finetune == "none":
        raise EvaluateError(f"finetune_lr = {finetune_lr} is given but finetune is none; use --finetune full or lora")
    if not 0 <= seed <= smat.MAX_SEED:
        raise EvaluateError(f"seed = {seed} is out of range; it must be an integer in [0, {smat.MAX_SEED}]")


def non_finite_message(domain: str, accuracies: Tensor, finetune: str, lr: float) -> str:
    bad = int(accuracies.isnan().sum())
    cause = (f"after fine-tuning ({finetune}) with lr {lr}; use a smaller --finetune-lr" if finetune != "none" and lr
             else "from finite parameters; the model overflows on these images")
    return f"domain {domain}: the logits of {bad} of {len(accuracies)} episodes are not finite {cause}; nothing was written"


def tested_gates(model: SMAT, baseline: str) -> Tensor | None:
    """The evaluation gates z of the model under test, computed once for all episodes (they do not
    depend on the task); None for PMF and for the "Pre" baseline, which have no masks."""
    return smat.eval_gates(model.log_alpha.detach()) if model.cfg.has_masks and baseline == "model" else None


def sparsity_report(gates: Tensor, task_update_density: float, target: float) -> dict:
    """The sparsity of the model that was tested, from its deterministic test gates z (M × P):
    each expert's fraction of exact zeros (the constraint's ŝ_m), the share of gates that are exactly
    0 or 1 (how binary the masks are), and the density of the merged task mask Σ_m w_m z_m averaged
    over the test episodes (the fraction of θ_pre one task actually changes)."""
    binary = ((gates == 0) | (gates == 1)).sum() / gates.numel()
    return {"per_expert": [round(s, 6) for s in smat.hard_sparsity(gates).tolist()],
            "task_update_density": round(task_update_density, 6), "binary_fraction": round(binary.item(), 6),
            "target": target}


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


def _accuracies(model: SMAT, episodes, finetune: FinetuneMode, lr: float, baseline: str, steps: int,
                seed: int, device, gates: Tensor | None = None,
                progress: Callable[[], None] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Query accuracy of every episode, the sum of the router weights and the sum of the merged
    masks' densities (0 without `gates`), left on the device (no per-episode host sync)."""
    accuracies, weights, density = [], torch.zeros((), device=device), torch.zeros((), device=device)
    for index, episode in enumerate(episodes):
        n_way = episode.n_way  # read on the host, before the copy to the device
        logits, w = episode_logits(model, episode.to(device), n_way, finetune, lr, baseline, steps,
                                   seed=seed * 1_000_003 + index, gates=gates)
        accuracy = (logits.argmax(-1) == episode.query_labels.to(device)).float().mean()
        accuracies.append(torch.where(torch.isfinite(logits).all(), accuracy, torch.nan))  # no result from NaN
        weights = weights + w
        if gates is not None:  # the fraction of parameters this task's update Σ_m w_m z_m touches
            density = density + (smat.merge_masks(w, gates) != 0).sum() / gates.shape[-1]
        if progress is not None:
            progress()
    return torch.stack(accuracies), weights, density


def episode_logits(model: SMAT, episode: Episode, n_way: int, finetune: FinetuneMode, lr: float,
                   baseline: str, steps: int, seed: int, gates: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(query logits, router weights) of one episode: zero-shot, or fine-tuned when lr > 0."""
    if finetune == "none" or lr == 0:  # lr 0 is "no fine-tuning" [official hps search]
        out = smat.predict(model, episode.support_images, episode.support_labels, episode.query_images, n_way,
                           pretrained=baseline == "pretrained", gates=gates)
        return out.logits, out.weights
    return finetune_logits(model, episode.support_images, episode.support_labels, episode.query_images, n_way,
                           finetune, lr, steps, seed, pretrained=baseline == "pretrained", gates=gates)


# --- § 2 Fine-tuning on the support set [M5.2]: the lr, chosen on validation episodes ----------


def select_finetune_lr(model: SMAT, sources: list[Source], cfg: Config, finetune: FinetuneMode, *, seed: int,
                       baseline: str, device, steps: int = FINETUNE_STEPS, candidates=LR_CANDIDATES,
                       episodes: int = LR_SEARCH_EPISODES,
                       progress: Announce | None = None) -> tuple[dict[str, float], dict]:
    """The fine-tuning lr of every domain, chosen on its VALIDATION classes, never on test episodes.

    NOTE: the official search runs on 5 of each dataset's test episodes [official: md_few_shot
    find_best_finetune_configs]; we use `episodes` validation episodes per domain (docs/deviations.md).
    A domain without validation classes takes the lr that is best on all validation episodes pooled.
    Returns ({domain: lr}, the search table for results.json). `progress` as in evaluate_model.
    """
    table, protocol = {}, data.protocol(cfg, "test")
    for source in sources:
        if not source.class_sizes("val"):
            continue
        val = list(data.evaluation_episodes(source, "val", protocol, episodes, seed, cfg.image_size))
        gates = tested_gates(model, baseline)
        tick = progress and progress(f"lr search {source.name}", len(candidates) * len(val))
        means = [_accuracies(model, val, finetune, lr, baseline, steps, seed, device, gates, tick)[0].mean().item()
                 * 100 for lr in candidates]
        table[source.name] = [None if math.isnan(m) else m for m in means]  # None: non-finite logits, never chosen
    if not table:
        raise EvaluateError("no domain has validation classes to choose the fine-tuning lr on; "
                            "pass --finetune-lr")

    def first_best(accuracies: list[float | None]) -> float:
        best = 0
        for i, accuracy in enumerate(accuracies):
            if accuracy is not None and (accuracies[best] is None or accuracy > accuracies[best]):
                best = i  # strict: the smaller lr (first) wins ties
        return candidates[best]

    pooled = first_best([None if None in column else statistics.fmean(column) for column in zip(*table.values())])
    chosen = {s.name: first_best(table[s.name]) if s.name in table else pooled for s in sources}
    return chosen, {"candidates": list(candidates), "partition": "val", "episodes": episodes,
                    "accuracy": table, "pooled_lr": pooled, "chosen": chosen}


# --- § 3 Tables and results files ------------------------------------------------------------------


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


# --- § 4 Inference cost and what the experts learned ------------------------------------------------


def inference_cost(model: SMAT, episode: Episode, repeats: int = 20) -> dict:
    """Median ms per episode of zero-shot SMAT (θ_pre support pass + router + merge + forward) and of a plain ProtoNet on
    an ordinary nn.Module copy of the same backbone (θ_pre), on the model's device. Shape checks are
    off while timing: they cost per call, not per FLOP, and would favour the plain ProtoNet."""
    device = model.theta_pre.device
    episode, n_way, n_support = episode.to(device), episode.n_way, len(episode.support_labels)
    plain = plain_backbone(model)

    def protonet() -> Tensor:
        features = plain(torch.cat([episode.support_images, episode.query_images]))
        prototypes = smat.class_prototypes(features[:n_support], episode.support_labels, n_way)
        return smat.cosine_logits(features[n_support:], prototypes, model.cfg.cosine_scale)

    # as in evaluate_model: the test gates belong to the trained model, computed once for all episodes
    gates = tested_gates(model, "model")

    def method() -> Tensor:
        xs, ys, xq = episode.support_images, episode.support_labels, episode.query_images
        return smat.predict(model, xs, ys, xq, n_way, gates=gates).logits

    def median_ms(fn: Callable[[], Tensor]) -> float:
        times = []
        for _ in range(repeats + 2):  # two warm-up calls
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times[2:])

    checks = not jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        with torch.no_grad():
            smat_ms, protonet_ms = median_ms(method), median_ms(protonet)
    finally:
        jaxtyping.config.update("jaxtyping_disable", not checks)
    return {"smat_ms": smat_ms, "protonet_ms": protonet_ms, "ratio": smat_ms / protonet_ms,
            "repeats": repeats, "device": str(device),
            "images": len(episode.support_labels) + len(episode.query_labels)}


def plain_backbone(model: SMAT) -> nn.Module:
    """An ordinary nn.Module with θ_pre as its parameters (SMAT keeps only the architecture)."""
    plain = copy.deepcopy(model.architecture).to_empty(device=model.theta_pre.device)
    torch.nn.utils.vector_to_parameters(model.theta_pre, plain.parameters())
    return plain


def kept_fraction(model: SMAT) -> dict[str, list[float]]:
    """Per backbone tensor, the fraction of its entries each expert's test mask keeps (z > 0)."""
    kept = (smat.eval_gates(model.log_alpha.detach()) > 0).float()
    return {name: kept[:, s].mean(1).tolist() for name, s in model.layout.slices().items()}


def mask_overlap(model: SMAT) -> Tensor:
    """n_experts × n_experts Jaccard overlap |z_a>0 ∧ z_b>0| / |z_a>0 ∨ z_b>0| of the test masks."""
    kept = (smat.eval_gates(model.log_alpha.detach()) > 0).float()
    both = kept @ kept.T
    count = kept.sum(1)
    return both / (count[:, None] + count[None, :] - both).clamp_min(1)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or one clear line if the extra is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EvaluateError("pictures need matplotlib: pip install 'smat-reference[plots]', or drop --plots")
    return plt


def _save(figure, path: Path) -> None:
    try:
        rundir.write_atomically(Path(path), lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        pyplot().close(figure)


def _heatmap(matrix: list[list[float]], rows: list[str], columns: list[str], title: str, path: Path,
             xlabel: str = "", ylabel: str = "") -> None:
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(1.2 + 0.5 * len(columns), 1.0 + 0.22 * len(rows)))
    image = axes.imshow(matrix, aspect="auto", cmap="viridis")
    axes.set_xticks(range(len(columns)), columns, fontsize=7)
    axes.set_yticks(range(len(rows)), rows, fontsize=7)
    axes.set_xlabel(xlabel, fontsize=8)
    axes.set_ylabel(ylabel, fontsize=8)
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes)
    _save(figure, path)


def _annotate(axes, matrix, fmt: str = "{:.2f}", fontsize: int = 6) -> None:
    """Each finite cell's value written on it, dark on light cells and light on dark ones."""
    values = torch.as_tensor(matrix, dtype=torch.float64)
    finite = values[values.isfinite()]
    middle = (finite.min() + finite.max()).item() / 2 if finite.numel() else 0.0
    for i, row in enumerate(values.tolist()):
        for j, value in enumerate(row):
            if math.isfinite(value):
                axes.text(j, i, fmt.format(value), ha="center", va="center", fontsize=fontsize,
                          color="black" if value > middle else "white")


MODULE_TYPES = ("embed", "qkv", "proj", "fc1", "fc2", "norms", "other")


def module_of(name: str) -> tuple[str, str]:
    """(block, module type) of a backbone tensor named as DINO/timm name them: "blocks.3.attn.qkv.weight"
    -> ("block 3", "qkv"); patch, position and class embeddings -> ("embeddings", "embed"); the final
    norm -> ("final norm", "norms")."""
    parts = name.split(".")
    if parts[0] in ("cls_token", "pos_embed", "patch_embed", "reg_token", "dist_token"):
        return "embeddings", "embed"
    block = f"block {parts[1]}" if parts[0] == "blocks" and len(parts) > 2 else ("final norm" if "norm" in parts[0] else "other")
    kind = next((k for k in ("qkv", "proj", "fc1", "fc2") if k in parts[2:]), None)
    return block, kind or ("norms" if any("norm" in p for p in parts) else "other")


def kept_by_module(results: dict) -> tuple[list[str], list[str], Tensor]:
    """(blocks, module types, experts × blocks × types kept fraction) from results["experts"]: the
    tensors of each (block, type) pooled, each weighted by its parameter count (equal weights for a
    results file without "parameters"); NaN where a block has no tensor of that type."""
    kept, counts = results["experts"]["kept_fraction"], results["experts"].get("parameters") or {}
    groups: dict[tuple[str, str], list[str]] = {}
    for name in kept:
        groups.setdefault(module_of(name), []).append(name)
    blocks = list(dict.fromkeys(block for block, _ in groups))
    types = [t for t in MODULE_TYPES if any(kind == t for _, kind in groups)]
    n_experts = len(next(iter(kept.values())))
    table = torch.full((n_experts, len(blocks), len(types)), float("nan"), dtype=torch.float64)
    for (block, kind), names in groups.items():
        weights = torch.tensor([float(counts.get(n, 1)) for n in names], dtype=torch.float64)
        fractions = torch.tensor([kept[n] for n in names], dtype=torch.float64)  # tensors × experts
        table[:, blocks.index(block), types.index(kind)] = (weights[:, None] * fractions).sum(0) / weights.sum()
    return blocks, types, table


def plot_router_weights(results: dict, path: Path) -> None:
    """Heatmap domains × experts of the router's merging weights, averaged over each domain's episodes."""
    names = list(results["domains"])
    matrix = [results["domains"][d]["router_weights"] for d in names]
    labels = [f"{d} ({results['domains'][d]['split']})" for d in names]
    _heatmap(matrix, labels, [str(m) for m in range(len(matrix[0]))], "router weight per domain", path,
             xlabel="expert", ylabel="domain (split)")


def plot_kept_fraction(results: dict, path: Path) -> None:
    """Per expert, a heatmap blocks × module types (qkv, proj, fc1, fc2, norms, embeddings) of the
    fraction of parameters its test mask keeps, pooled by parameter count (`kept_by_module`), annotated."""
    plt = pyplot()
    blocks, types, table = kept_by_module(results)
    n = table.shape[0]
    columns = min(n, 4)
    rows = math.ceil(n / columns)
    figure, grid = plt.subplots(rows, columns, squeeze=False, sharey=True, layout="constrained",
                                figsize=(0.9 + 0.55 * len(types) * columns, 0.8 + (0.28 * len(blocks) + 0.6) * rows))
    for m, axes in enumerate(grid.flat):
        if m >= n:
            axes.axis("off")
            continue
        image = axes.imshow(table[m].numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        _annotate(axes, table[m].tolist(), fontsize=5 if len(blocks) > 8 else 7)
        axes.set_xticks(range(len(types)), types, fontsize=7)
        axes.set_yticks(range(len(blocks)), blocks, fontsize=7)
        axes.set_title(f"expert {m}", fontsize=8)
        axes.set_xlabel("module type", fontsize=7)
        if m % columns == 0:
            axes.set_ylabel("block", fontsize=7)
    figure.colorbar(image, ax=grid.ravel().tolist(), label="kept fraction (z > 0), by parameter count")
    figure.suptitle("fraction of parameters each expert's mask keeps", fontsize=9)
    _save(figure, path)


def plot_mask_overlap(results: dict, path: Path) -> None:
    """Experts × experts Jaccard overlap of the test masks, the diagonal (always 1) left blank so that
    the colour scale spans the off-diagonal values, each written on its cell."""
    plt = pyplot()
    overlap = torch.tensor(results["experts"]["overlap"], dtype=torch.float64)
    overlap.fill_diagonal_(float("nan"))
    n = overlap.shape[0]
    figure, axes = plt.subplots(figsize=(1.6 + 0.55 * n, 1.0 + 0.5 * n))
    colours = plt.get_cmap("viridis").with_extremes(bad="white")
    image = axes.imshow(overlap.numpy(), cmap=colours)
    _annotate(axes, overlap.tolist(), fontsize=7 if n <= 8 else 5)
    labels = [str(m) for m in range(n)]
    axes.set_xticks(range(n), labels, fontsize=7)
    axes.set_yticks(range(n), labels, fontsize=7)
    axes.set_xlabel("expert", fontsize=8)
    axes.set_ylabel("expert", fontsize=8)
    axes.set_title("mask overlap |a∧b| / |a∨b| (diagonal = 1, left blank)", fontsize=9)
    figure.colorbar(image, ax=axes, label="Jaccard overlap")
    _save(figure, path)


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of RUN/metrics.jsonl (a line cut short by a kill is skipped), or an EvaluateError line."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise EvaluateError(f"cannot read {path} ({type(error).__name__}); --curves needs a run directory "
                            f"made by train.py") from None
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("episode"), (int, float)):
            records.append(record)
    if not records:
        raise EvaluateError(f"{path} holds no training records yet; draw the curves once the run has logged")
    return records


def plot_curves(records: list[dict], path: Path, title: str = "", target: float | None = None) -> None:
    """Training curves of metrics.jsonl against episodes, one panel each: loss and ce; accuracy against
    the frozen backbone's (pretrained_accuracy) on the same tasks; sparsity per expert; mean λ;
    router entropy; validation accuracy. A panel whose fields the run did not log (PMF) says so.
    `target`: the sparsity target τ, drawn as a dotted line."""
    plt = pyplot()
    train = [r for r in records if "loss" in r]
    figure, grid = plt.subplots(2, 3, figsize=(13, 6.5))
    panels = [("loss", ("loss", "ce")), ("query accuracy", ("accuracy", "pretrained_accuracy")),
              ("sparsity per expert", ("sparsity",)), ("mean λ (multiplier_mean)", ("multiplier_mean",)),
              ("router entropy (nats)", ("router_entropy",)), ("validation accuracy %", ("val_accuracy",))]
    for axes, (name, fields) in zip(grid.flat, panels):
        drawn = False
        for field in fields:
            rows = [r for r in (train if field != "val_accuracy" else records) if field in r]
            if not rows:
                continue
            x = [r["episode"] for r in rows]
            if field == "sparsity":  # one line per expert
                for m in range(len(rows[0][field])):
                    axes.plot(x, [r[field][m] for r in rows], linewidth=1, label=f"expert {m}")
                if target is not None:
                    axes.axhline(target, color="black", linestyle=":", linewidth=1, label="τ")
            else:
                axes.plot(x, [r[field] for r in rows], marker="o" if field == "val_accuracy" else None,
                          markersize=3, linewidth=1.2, label=field)
            drawn = True
        if not drawn:
            axes.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=axes.transAxes)
        elif field != "sparsity" or len(rows[0][field]) <= 8:
            axes.legend(fontsize=7)
        axes.set_title(name, fontsize=9)
        axes.set_xlabel("training episodes", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
    figure.suptitle(title or "training curves (metrics.jsonl)", fontsize=10)
    figure.tight_layout()
    _save(figure, path)


def draw_curves(run_dirs: list[Path], out: Path | None) -> list[Path]:
    """training_curves.png of every run, in the run directory or OUT/<run name>/; checks every run first."""
    pyplot()
    if out is not None:
        rundir.check_target_directory(out, "--out")
    records = [read_metrics(r) for r in run_dirs]
    targets = [Path(r) if out is None else Path(out) / Path(r).name for r in run_dirs]
    for target in targets:
        rundir.check_run_files(target, ("training_curves.png",))
    for run_dir, target, record in zip(run_dirs, targets, records):
        try:
            tau = float(json.loads((Path(run_dir) / "config.json").read_text())["sparsity"])
        except (OSError, ValueError, KeyError, TypeError):
            tau = None  # the line is a guide only: the curves need metrics.jsonl alone
        target.mkdir(parents=True, exist_ok=True)
        plot_curves(record, target / "training_curves.png", f"{Path(run_dir).name}: training curves (metrics.jsonl)", tau)
    return [t / "training_curves.png" for t in targets]


def split_average(results: dict, split: str) -> tuple[float, float] | None:
    """(mean, 95% CI half-width) of the split's average accuracy: episode i's accuracy averaged over
    the split's domains, then the CI over episodes. None when the split has no domain."""
    names = [d for d, v in results["domains"].items() if v["split"] == split]
    if not names:
        return None
    return confidence_interval(_per_episode(results, names).mean(1))


def plot_sparsity_sweep(sweep: dict[float, dict], path: Path, references: dict[str, dict] | None = None) -> None:
    """ID and OOD average accuracy (± 95% CI over episodes) against the target sparsity τ, one point
    per τ; `sweep` maps τ to a results dict (one run, or average_runs of several seeds).
    `references` (e.g. {"Pre": ..., "PMF": ...}) are drawn as labelled horizontal lines per split."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(5.5, 3.8))
    taus = sorted(sweep)
    for split, colour in (("id", "tab:blue"), ("ood", "tab:orange")):
        points = [(tau, split_average(sweep[tau], split)) for tau in taus]
        points = [(tau, value) for tau, value in points if value is not None]
        if not points:
            continue
        axes.errorbar([t for t, _ in points], [v[0] for _, v in points], yerr=[v[1] for _, v in points],
                      fmt="o-", capsize=3, color=colour, label=f"SMAT, {split.upper()} average")
        for (name, reference), style in zip((references or {}).items(), (":", "--", "-.")):
            level = split_average(reference, split)
            if level is not None:
                axes.axhline(level[0], linestyle=style, color=colour, linewidth=1)
                axes.annotate(f"{name} {split.upper()}", (taus[-1], level[0]), textcoords="offset points",
                              xytext=(4, 0), fontsize=7, color=colour, va="center")
    axes.set_xlabel("target sparsity τ")
    axes.set_ylabel("accuracy % (± 95% CI over episodes)")
    axes.legend(fontsize=8, loc="center left")
    _save(figure, path)


# --- § 5 The command line ----------------------------------------------------------------------------

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


USER_ERRORS = cli.USER_ERRORS + (EvaluateError, FinetuneError)  # bad input: one line and exit code 2


@app.command(cls=cli.OneLineCommand)
def main(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories made by train.py")],
    episodes: Annotated[Optional[int], typer.Option(
        "--test-episodes", "--episodes", help="test episodes per domain (default: the run's, 600)")] = None,
    seed: Annotated[int, typer.Option(help="episode seed; the same seed gives every run the same episodes")] = 0,
    data_spec: Annotated[Optional[str], typer.Option("--data", help="test data (default: the run's --data)")] = None,
    finetune: Annotated[FinetuneMode, typer.Option(help="none (zero-shot), full or lora")] = "none",
    finetune_lr: Annotated[Optional[float], typer.Option(help="fixed fine-tuning lr (default: chosen on val)")] = None,
    baselines: Annotated[bool, typer.Option("--baselines/--no-baselines", help="add Pre (θ_pre + ProtoNet)")] = True,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="PNG pictures in each run directory")] = False,
    sweep_plot: Annotated[Optional[Path], typer.Option(help="write ID and OOD accuracy against τ of all runs here")] = None,
    cost: Annotated[bool, typer.Option("--cost/--no-cost", help="time zero-shot SMAT against ProtoNet")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="write OUT/<run name>/results-*.json instead of into each run")] = None,
    ways: Annotated[Optional[int], typer.Option(min=2, help="fixed N-way test episodes (default: the run's protocol)")] = None,
    shots: Annotated[Optional[int], typer.Option(min=1, help="fixed K-shot test episodes (default: the run's)")] = None,
    queries: Annotated[Optional[int], typer.Option(min=1, help="queries per class, fixed protocol (default: the run's)")] = None,
    compare_stored: Annotated[bool, typer.Option(
        "--compare", help="the arguments are results files: print their table and paired differences "
                          "against the first, computing nothing")] = False,
    curves: Annotated[bool, typer.Option(
        "--curves", help="draw each run's metrics.jsonl (loss, accuracy vs Pre, sparsity per expert, λ, router "
                         "entropy, validation accuracy) into training_curves.png, evaluating nothing")] = False,
) -> None:
    """Meta-test runs on the same seeded ID and OOD episodes; write results-<mode>-<protocol>-<data>-seed<S>-<N>ep.json
    and .md into each run (or OUT/<run name>/), never replacing another evaluation's file."""
    try:
        if compare_stored:
            compare_files(run_dirs)
            return
        if curves:
            for path in draw_curves(run_dirs, out):
                Console().print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)
            return
        fixed = {k: v for k, v in (("test_ways", ways), ("test_shots", shots), ("test_queries", queries)) if v}
        run_all(run_dirs, episodes, seed, data_spec, finetune, finetune_lr, baselines, plots, sweep_plot,
                cost, device, out, {"test_protocol": "fixed", **fixed} if fixed else {})
    except USER_ERRORS as error:
        cli.fail(str(error))
    except KeyboardInterrupt:
        cli.fail("interrupted (Ctrl-C); each results file is written whole or not at all: run evaluate.py "
                    "again for what is missing", code=130)
    except OSError as error:  # what no check foresaw: still one line naming the path
        cli.fail(cli.os_error_line(error))


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


def check_flags(run_dirs: list[Path], episodes: int | None, seed: int, finetune: str, finetune_lr: float | None,
                plots: bool, sweep_plot: Path | None, out: Path | None) -> None:
    """Every flag, before any run is loaded: what the evaluation would refuse, and every place a file
    will be written (so that an error there cannot cost the evaluation)."""
    check_request(episodes, finetune, finetune_lr, seed)
    paths = [Path(r).resolve() for r in run_dirs]
    twice = next((r for r, p in zip(run_dirs, paths) if paths.count(p) > 1), None)
    if twice is not None:
        raise EvaluateError(f"run {twice} is given twice; name each run once")
    if out is not None:
        rundir.check_target_directory(out, "--out")
        names = [Path(r).name for r in run_dirs]
        same = next((n for n in names if names.count(n) > 1), None)
        if same is not None:
            raise EvaluateError(f"--out {out}: two runs are named {same}, so their results would land in one "
                                f"folder; evaluate them separately or rename one")
    if plots or sweep_plot:
        pyplot()
    if sweep_plot:
        parent = Path(sweep_plot).parent
        if not parent.is_dir():
            raise EvaluateError(f"--sweep-plot {sweep_plot}: its directory does not exist; create it first")
        if Path(sweep_plot).is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise EvaluateError(f"--sweep-plot {sweep_plot} cannot be written (a directory is there, or its "
                                f"directory is not writable); choose another file")


def run_all(run_dirs, episodes, seed, data_spec, finetune, finetune_lr, baselines, plots, sweep_plot, cost,
            device, out: Path | None = None, protocol: dict | None = None) -> None:
    """Check every flag and load and check every run, evaluate every run, write every file, then print:
    bad input fails before any work, an error anywhere leaves nothing written, and a closed or full
    stdout (printing comes last) never costs the results. Directories written into are claimed
    (rundir.RunDirectory): a run that train.py is still writing is refused."""
    check_flags(run_dirs, episodes, seed, finetune, finetune_lr, plots, sweep_plot, out)
    dev, runs, sources_for = devices.pick_device(device), [], {}
    for run_dir in run_dirs:  # on the CPU until its turn, so a sweep of big runs fits the device
        model, cfg, _ = rundir.load_run(run_dir, "cpu")
        # Every run on the first run's protocol, so all of them see the same episodes.
        cfg = replace(cfg, **{k: getattr(runs[0][2] if runs else cfg, k) for k in PROTOCOL_FIELDS},
                      data=data_spec or cfg.data)  # cfg.data: the data tested, recorded in the results
        cfg = replace(cfg, **(protocol or {}))  # --ways/--shots/--queries: a fixed protocol, checked by Config
        key = (cfg.data, cfg.image_size)
        if key not in sources_for:
            sources_for[key] = readers.parse_data_spec(key[0], cfg.image_size, seed=0)
        rundir.check_classes(run_dir, sources_for[key], every_source=False)  # no test class the run trained on
        runs.append((Path(run_dir), model, cfg, sources_for[key]))
    targets = [run_dir if out is None else out / run_dir.name for run_dir, *_ in runs]
    for target in targets:  # results files get names no other file has (free_name): only pictures are replaced
        rundir.check_run_files(target, PICTURES if plots else ())
    with ExitStack() as claims:
        for target in targets:  # the run directories, or folders under --out that exist already
            if target.is_dir():
                claims.enter_context(rundir.RunDirectory(target, fresh=False, create=False))
        results, pre, pre_name = evaluate_runs(runs, episodes, seed, finetune, finetune_lr, baselines, cost, dev)
        written: list[Path] = []
        for target, result in zip(targets, results):  # every run saw Pre's episodes: each keeps it
            target.mkdir(parents=True, exist_ok=True)
            written.append(target / free_name(target, results_name(result)))
            write_results(target, result, {pre_name: pre} if pre else None, written[-1].name)
            if plots:
                plot_router_weights(result, target / "router_weights.png")
                if "experts" in result:
                    plot_kept_fraction(result, target / "kept_fraction.png")
                    plot_mask_overlap(result, target / "mask_overlap.png")
        if sweep_plot:
            plot_sparsity_sweep({cfg.sparsity: result for (_, _, cfg, _), result in zip(runs, results)}, sweep_plot)
    names, console = [run_dir.name for run_dir, *_ in runs], Console()
    differences = {f"{name} − {pre_name}": paired_difference(result, pre)
                   for name, result in zip(names, results)} if pre and len(results) <= 2 else None
    print_table(([pre] if pre else []) + results, ([pre_name] if pre else []) + names, console, differences)
    for path in written:
        console.print(f"wrote {path}.json and .md")
    for run_dir in run_dirs:  # last: a run refused anywhere above gets only its error line
        rundir.note_filled_fields(run_dir)
    for name, result in zip(names, results):
        if "inference_cost" in result:
            c = result["inference_cost"]
            console.print(f"{name}: zero-shot {c['smat_ms']:.1f} ms vs ProtoNet "
                          f"{c['protonet_ms']:.1f} ms per episode ({c['ratio']:.2f}x, {c['device']})")


def evaluate_runs(runs: list, episodes: int | None, seed: int, finetune: FinetuneMode, finetune_lr: float | None,
                  baselines: bool, cost: bool, device) -> tuple[list[dict], dict | None, str]:
    """(results of every run, Pre's results or None, Pre's name), with progress on stderr: a bar on a
    terminal, else a line per finished stage."""
    kwargs = dict(episodes=episodes if episodes is not None else runs[0][2].test_episodes, seed=seed,
                  finetune=finetune, finetune_lr=finetune_lr, device=device)
    results, pre, pre_name = [], None, "Pre" + ("" if finetune == "none" else f"+{finetune}")
    status = Console(stderr=True)
    with episode_bar(status) as bar:
        for run_dir, model, cfg, sources in runs:
            jobs = [("model", run_dir.name)]
            if baselines and pre is None:  # Pre once, from the first run's θ_pre
                jobs.append(("pretrained", pre_name))
            for baseline, name in jobs:
                with Stages(bar, f"{name}: ", log=status) as stages:
                    result = evaluate_model(model, sources, cfg, baseline=baseline, **kwargs, progress=stages)
                pre, results = (result, results) if baseline == "pretrained" else (pre, results + [result])
            if cost:
                first = next(data.evaluation_episodes(sources[0], "test", data.protocol(cfg, "test"), 1, seed,
                                                cfg.image_size))
                results[-1]["inference_cost"] = inference_cost(model, first)
            model.cpu()
    return results, pre, pre_name


def episode_bar(console: Console) -> Progress:
    """A progress display for evaluations that vanishes when done; off unless `console` is a terminal
    (a log file gets the results, not frames of a bar)."""
    return Progress(*Progress.get_default_columns(), console=console, transient=True, disable=not console.is_terminal)


class Stages:
    """evaluate_model's `progress`: one line of `bar` for the stage under way ("smat: lr search
    aircraft", then "smat: test aircraft" ...), replacing the last one; `fields` fill the bar's own
    columns. Where the bar is off (a batch job's log), each finished stage is one plain line on `log`
    if given. Used as a context manager, the last stage ends with the block."""

    def __init__(self, bar: Progress, prefix: str = "", log: Console | None = None, **fields) -> None:
        self.bar, self.prefix, self.log, self.fields = bar, prefix, log, fields
        self.task, self.stage, self.done, self.started = None, "", 0, 0.0

    def __call__(self, stage: str, total: int) -> Callable[[], None]:
        """Start `stage` of `total` episodes; returns the function to call after each episode."""
        self.close()
        self.task = self.bar.add_task(self.prefix + stage, total=total, **self.fields)
        self.stage, self.done, self.started = stage, 0, time.perf_counter()
        return self._tick

    def _tick(self) -> None:
        self.done += 1
        self.bar.advance(self.task)

    def close(self, finished: bool = True) -> None:
        if self.task is None:
            return
        if finished and self.log is not None and self.bar.disable:
            cli.print_line(self.log, f"{self.prefix}{self.stage}: {self.done} episodes in "
                                        f"{time.perf_counter() - self.started:.0f} s")
        self.bar.remove_task(self.task)
        self.task = None

    def __enter__(self) -> "Stages":
        return self

    def __exit__(self, error_type, *_) -> None:
        self.close(finished=error_type is None)


if __name__ == "__main__":
    cli.run_cli(app)
