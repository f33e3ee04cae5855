"""Meta-test SMAT runs: `python evaluate.py RUN_DIR [RUN_DIR ...]`.

Every run is tested on the same seeded episodes of every ID and OOD domain (600 per domain by
default) and reported as mean accuracy with a 95% confidence interval [M1.6], zero-shot
[M5.1] or after fine-tuning on the support set [M5.2; finetuning.py]. Start at
`evaluate_model`, which returns a `Results`; `Tested` is what runs on each episode (the model, or
"Pre", its frozen backbone). Below them: the choice of the fine-tuning lr on validation episodes, and
last the command line, which only parses flags and calls these functions. Statistics and tables:
tables.py; results files, --compare and --gather: resultfiles.py; pictures and --curves: pictures.py.
Runs are read through rundir.py; this module never imports train.py.
"""

import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal, Optional, TypedDict

import torch
import typer
from torch import Tensor

import cli
import configs
import data
import devices
import monitor
import pictures
import readers
import resultfiles
import rundir
import smat
import tables
from data import Episode, Source
from finetuning import FINETUNE_STEPS, FinetuneError, finetune_logits
from smat import SMAT, Config
from tables import EvaluateError, averages, confidence_interval

FinetuneMode = Literal["none", "full", "lora"]
# Candidate learning rates, tried in this order; strict ">" so lr 0 (no fine-tuning) wins ties
# [official: find_best_finetune_configs, MD list without its extremes 1e-6 and 0.1].
LR_CANDIDATES = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
LR_SEARCH_EPISODES = 5  # validation episodes per domain for the lr search [official: 5 test episodes]
MAX_FINETUNE_LR = 1.0  # AdamW moves every weight by about lr per step: above 1 a ViT is destroyed, not tuned
# progress(stage, total) -> tick: how an evaluation reports its episodes (`Stages` draws them in a terminal)
Announce = Callable[[str, int], Callable[[], None]]
PROTOCOL_FIELDS = ("test_protocol", "test_ways", "test_shots", "test_queries")


# --- § 1 Meta-testing: episodes -> accuracies -> mean ± 95% CI ------------------------------------


class DomainResult(TypedDict, total=False):
    """One domain of a `Results`: accuracy in percent over its episodes."""

    split: Literal["id", "ood"]
    mean: float
    ci95: float  # half-width of the 95% CI [M1.6]
    episodes: int
    accuracies: list[float]  # per episode, percent correct (as `mean`): what paired differences pair
    router_weights: list[float]  # the router's w, mean over the episodes, one per expert
    distance: Literal["near", "far"]  # an OOD domain whose distance to the training data is known
    task_update_density: float  # SMAT: the fraction of θ_pre one task's update Σ_m w_m z_m changes
    finetune_lr: float  # with fine-tuning: the lr used


class Results(TypedDict, total=False):
    """What `evaluate_model` returns and results.json holds (resultfiles.write_results adds "baselines" and "paired")."""

    results_format: int  # tables.RESULTS_FORMAT: what the fields mean (older files: resultfiles.upgraded)
    domains: dict[str, DomainResult]
    id_avg: float | None  # unweighted over the domains, as the paper; near/far_ood_avg where known
    ood_avg: float | None
    near_ood_avg: float
    far_ood_avg: float
    method: str  # "smat", "pmf" or "pre"
    variant: dict  # the method's settings that differ from its defaults (rundir.variant)
    finetune: FinetuneMode
    partition: Literal["val", "test"]
    seed: int
    protocol: dict
    seconds: float
    config: dict
    data: str
    provenance: dict  # code version and whether it had changes, torch, python, device, processes (resultfiles.provenance)
    checkpoint: dict  # the run's checkpoint tested: file, episode, its validation accuracy (tested_checkpoint)
    finetune_lr_search: dict  # with fine-tuning and no fixed lr: select_finetune_lr's table
    experts: dict  # SMAT: kept fraction per tensor, mask overlap, parameters per tensor
    sparsity: dict  # SMAT: the tested model's sparsity (sparsity_report)


@dataclass(frozen=True)
class Tested:
    """What meta-testing runs on each episode: the trained `model`, or with `pre` the "Pre" baseline,
    ProtoNet on the same model's frozen θ_pre (no router, no experts, no δ)."""

    model: SMAT
    pre: bool = False

    @cached_property
    def gates(self) -> Tensor | None:
        """The test gates z: they do not depend on the task, so they are computed once for all episodes
        (on the model's device at first use); None for PMF and for Pre, which have no masks."""
        return smat.eval_gates(self.model.log_alpha.detach()) if self.model.cfg.has_masks and not self.pre else None

    def logits(self, episode: Episode, n_way: int, finetune: FinetuneMode, lr: float, steps: int,
               seed: int) -> tuple[Tensor, Tensor]:
        """(query logits, router weights) of one episode: zero-shot, or fine-tuned when lr > 0."""
        if finetune == "none" or lr == 0:  # lr 0 is "no fine-tuning" [official hps search]
            out = smat.predict(self.model, episode.support_images, episode.support_labels, episode.query_images,
                               n_way, pretrained=self.pre, gates=self.gates)
            return out.logits, out.weights
        return finetune_logits(self.model, episode.support_images, episode.support_labels, episode.query_images,
                               n_way, finetune, lr, steps, seed, pretrained=self.pre, gates=self.gates)


def evaluate_model(
    model: SMAT | Tested,
    sources: list[Source],
    cfg: Config,
    *,
    partition: Literal["val", "test"] = "test",
    episodes: int,
    seed: int,
    finetune: FinetuneMode = "none",
    finetune_lr: float | None = None,
    finetune_steps: int = FINETUNE_STEPS,
    finetune_grid: tuple[float, ...] = LR_CANDIDATES,
    device: str | torch.device = "cpu",
    progress: Announce | None = None,
) -> Results:
    """Accuracy of `model` on `episodes` seeded episodes of every source, as one `Results`: per
    domain its split, mean and 95% CI, per-episode accuracies and mean router weights; the ID and OOD
    averages; the protocol, seed and config (and, for SMAT, the tested model's sparsity).

    `cfg` gives the protocol and image size (the model's own config gives the method). The same
    `seed` yields the same episodes for every model. `Tested(model, pre=True)` is "Pre": ProtoNet on
    the model's θ_pre. Fine-tuning uses `finetune_lr` if given, else the lr of `finetune_grid` chosen on
    validation episodes. Accuracies are in percent, per episode too.
    `progress(stage, total)` announces each stage ("lr search D", "test D") with its number of
    episodes and returns the function called after every one of them (`Stages` draws them).
    """
    check_request(episodes, finetune, finetune_lr, seed, finetune_grid)
    tested = model if isinstance(model, Tested) else Tested(model)
    model = tested.model.to(device)
    lrs, search = {s.name: 0.0 for s in sources}, None
    if finetune != "none" and finetune_lr is not None:
        lrs = {s.name: finetune_lr for s in sources}
    elif finetune != "none":
        lrs, search = select_finetune_lr(tested, sources, cfg, finetune, seed=seed, device=device, steps=finetune_steps,
                                         candidates=finetune_grid, progress=progress)
    started, domains, protocol = time.perf_counter(), {}, data.protocol(cfg, "test")
    density = 0.0
    for source in sources:
        tasks = data.evaluation_episodes(source, partition, protocol, episodes, seed, cfg.image_size)
        accuracies, weights, domain_density = _accuracies(tested, tasks, finetune, lrs[source.name], finetune_steps,
                                                          seed, device, progress and progress(f"{partition} {source.name}",
                                                                                              episodes))
        accuracies = accuracies.cpu().double() * 100  # percent, as every number of a Results
        mean, ci95 = confidence_interval(accuracies)
        if not math.isfinite(mean):  # _accuracies marks an episode with non-finite logits as NaN
            raise EvaluateError(non_finite_message(source.name, accuracies, finetune, lrs[source.name]))
        domains[source.name] = {"split": source.split, "mean": mean, "ci95": ci95, "episodes": episodes,
                                "router_weights": (weights / episodes).tolist(),
                                "accuracies": [round(a, 4) for a in accuracies.tolist()]}
        if source.distance:
            domains[source.name]["distance"] = source.distance
        if tested.gates is not None:
            domains[source.name]["task_update_density"] = domain_density.item() / episodes
            density += domain_density.item() / episodes / len(sources)
        if finetune != "none":
            domains[source.name]["finetune_lr"] = lrs[source.name]
    results: Results = {"results_format": tables.RESULTS_FORMAT, "domains": domains, **averages(domains),
                        "method": "pre" if tested.pre else model.cfg.method,
                        "variant": {} if tested.pre else rundir.variant(model.cfg), "finetune": finetune,
                        "partition": partition, "seed": seed, "protocol": asdict(protocol),
                        "seconds": round(time.perf_counter() - started, 2), "config": model.cfg.to_dict(),
                        "data": cfg.data, "provenance": resultfiles.provenance(device)}
    if search is not None:
        results["finetune_lr_search"] = search
    if tested.gates is not None:
        results["experts"] = {"kept_fraction": kept_fraction(model), "overlap": mask_overlap(model).tolist(),
                              "parameters": dict(zip(model.layout.names, model.layout.numels))}
        results["sparsity"] = sparsity_report(tested.gates, density, model.cfg.sparsity)
    return results


def check_request(episodes: int | None, finetune: str, finetune_lr: float | None, seed: int = 0,
                  finetune_grid: tuple[float, ...] = LR_CANDIDATES) -> None:
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
    if not finetune_grid or any(not (math.isfinite(lr) and 0 <= lr <= MAX_FINETUNE_LR) for lr in finetune_grid) \
            or len(set(finetune_grid)) < len(finetune_grid):
        raise EvaluateError(f"finetune_grid = {','.join(map(str, finetune_grid)) or '(empty)'} is not valid; give "
                            f"distinct learning rates in [0, {MAX_FINETUNE_LR}], comma-separated, e.g. 0,1e-4,1e-3")
    if finetune_grid != LR_CANDIDATES and (finetune == "none" or finetune_lr is not None):
        raise EvaluateError("--finetune-grid is the lr search's grid; it needs --finetune full or lora and no "
                            "--finetune-lr (a fixed lr has no search)")
    if not 0 <= seed <= smat.MAX_SEED:
        raise EvaluateError(f"seed = {seed} is out of range; it must be an integer in [0, {smat.MAX_SEED}]")


def non_finite_message(domain: str, accuracies: Tensor, finetune: str, lr: float) -> str:
    bad = int(accuracies.isnan().sum())
    cause = (f"after fine-tuning ({finetune}) with lr {lr}; use a smaller --finetune-lr" if finetune != "none" and lr
             else "from finite parameters; the model overflows on these images")
    return f"domain {domain}: the logits of {bad} of {len(accuracies)} episodes are not finite {cause}; nothing was written"


def sparsity_report(gates: Tensor, task_update_density: float, target: float) -> dict:
    """The sparsity of the model that was tested, from its deterministic test gates z (M × P):
    each expert's fraction of exact zeros (the constraint's ŝ_m), the share of gates that are exactly
    0 or 1 (how binary the masks are), and the density of the merged task mask Σ_m w_m z_m averaged
    over the test episodes (the fraction of θ_pre one task actually changes)."""
    binary = ((gates == 0) | (gates == 1)).sum() / gates.numel()
    return {"per_expert": [round(s, 6) for s in smat.hard_sparsity(gates).tolist()],
            "task_update_density": round(task_update_density, 6), "binary_fraction": round(binary.item(), 6),
            "target": target}


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


def _accuracies(tested: Tested, episodes, finetune: FinetuneMode, lr: float, steps: int, seed: int, device,
                progress: Callable[[], None] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Query accuracy of every episode, the sum of the router weights and the sum of the merged
    masks' densities (0 without test gates), left on the device (no per-episode host sync)."""
    accuracies, weights, density = [], torch.zeros((), device=device), torch.zeros((), device=device)
    for index, episode in enumerate(episodes):
        n_way = episode.n_way  # read on the host, before the copy to the device
        logits, w = tested.logits(episode.to(device), n_way, finetune, lr, steps, seed=seed * 1_000_003 + index)
        accuracy = (logits.argmax(-1) == episode.query_labels.to(device)).float().mean()
        accuracies.append(torch.where(torch.isfinite(logits).all(), accuracy, torch.nan))  # no result from NaN
        weights = weights + w
        if tested.gates is not None:  # the fraction of parameters this task's update Σ_m w_m z_m touches
            density = density + (smat.merge_masks(w, tested.gates) != 0).sum() / tested.gates.shape[-1]
        if progress is not None:
            progress()
    return torch.stack(accuracies), weights, density


# --- § 2 Fine-tuning on the support set [M5.2]: the lr, chosen on validation episodes ----------


def select_finetune_lr(tested: Tested, sources: list[Source], cfg: Config, finetune: FinetuneMode, *, seed: int,
                       device, steps: int = FINETUNE_STEPS, candidates=LR_CANDIDATES,
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
        tick = progress and progress(f"lr search {source.name}", len(candidates) * len(val))
        means = [_accuracies(tested, val, finetune, lr, steps, seed, device, tick)[0].mean().item() * 100
                 for lr in candidates]
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


def search_plan(grid: tuple[float, ...], domains: int, models: int) -> str:
    """What the lr search will cost, said before it starts: the grid, the episodes of each stage, the stages."""
    return (f"fine-tuning lr search on validation classes, before the test: grid {','.join(f'{lr:g}' for lr in grid)} "
            f"(--finetune-grid), {len(grid)} lrs × {LR_SEARCH_EPISODES} episodes = {len(grid) * LR_SEARCH_EPISODES} "
            f"episodes per stage, {domains * models} stages ({domains} domains × {models} models)")


def tested_checkpoint(run_dir: Path, state: dict) -> dict:
    """Which checkpoint of a run rundir.load_run tested (best.pt if there, else checkpoint.pt): the
    file, the episode it was saved at and, when it is the model best on validation, that accuracy.
    Evaluation needs none of these fields, so one a damaged file lacks or mistypes is recorded as null."""
    number = lambda value: value if type(value) in (int, float) and math.isfinite(value) else None  # noqa: E731
    episode, best_val = number(state.get("episode")), number(state.get("best_val"))
    best = episode is not None and episode == state.get("best_episode") and best_val is not None and best_val >= 0
    return {"file": "best.pt" if (Path(run_dir) / "best.pt").is_file() else "checkpoint.pt",
            "episode": episode, "val_accuracy": best_val if best else None}


# --- § 3 The command line ----------------------------------------------------------------------------

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
    finetune_grid: Annotated[str, typer.Option(
        help="the lrs the search on validation classes tries, comma-separated; lr 0 (no fine-tuning) wins ties")]
        = ",".join(f"{lr:g}" for lr in LR_CANDIDATES),
    baselines: Annotated[bool, typer.Option("--baselines/--no-baselines", help="add Pre (θ_pre + ProtoNet)")] = True,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="PNG pictures in each run directory")] = False,
    sweep_plot: Annotated[Optional[Path], typer.Option(help="write ID and OOD accuracy against τ of all runs here")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    out: Annotated[Optional[Path], typer.Option(
        help="write OUT/<run name>/results-*.json instead of into each run, and several runs' comparison-*.json "
             "into OUT instead of their folder (with --compare: the comparison files into OUT)")] = None,
    ways: Annotated[Optional[int], typer.Option(min=2, help="fixed N-way test episodes (default: the run's protocol)")] = None,
    shots: Annotated[Optional[int], typer.Option(min=1, help="fixed K-shot test episodes (default: the run's)")] = None,
    queries: Annotated[Optional[int], typer.Option(min=1, help="queries per class, fixed protocol (default: the run's)")] = None,
    compare_stored: Annotated[bool, typer.Option(
        "--compare", help="the arguments are results files: print their table and every pairwise paired "
                          "difference, computing nothing (--out DIR: save them as comparison-*.json/.md/.csv)")] = False,
    gather_csv: Annotated[bool, typer.Option(
        "--gather", help="the arguments are folders: print every results*.csv under them as one CSV "
                         "(python evaluate.py --gather runs > all.csv)")] = False,
    curves: Annotated[bool, typer.Option(
        "--curves", help="draw each run's metrics.jsonl (loss, accuracy vs Pre, sparsity per expert, λ, router "
                         "entropy, validation accuracy) into training_curves.png, evaluating nothing")] = False,
) -> None:
    """Meta-test runs on the same seeded ID and OOD episodes; write results-<mode>-<protocol>-<data>-seed<S>-<N>ep.json,
    .md and .csv into each run (or OUT/<run name>/), and for several runs their comparison-*.json, .md and .csv
    into the runs' folder (or OUT), never replacing another evaluation's file."""
    try:
        modes = [flag for flag, on in (("--compare", compare_stored), ("--gather", gather_csv), ("--curves", curves)) if on]
        if len(modes) > 1:
            raise EvaluateError(f"{' and '.join(modes)} are separate modes (stored results; csv files; training "
                                f"curves); give one")
        if gather_csv and out is not None:
            raise EvaluateError("--gather prints one CSV on stdout; redirect it (python evaluate.py --gather runs > "
                                "all.csv) and drop --out")
        if compare_stored:
            console = cli.console()
            written = resultfiles.compare_files(run_dirs, out, console)
            if written is not None:
                cli.print_line(console, f"wrote {written}.json, .md and .csv")
            return
        if gather_csv:
            sys.stdout.write(resultfiles.gather(run_dirs))
            return
        if curves:
            for path in pictures.draw_curves(run_dirs, out):
                cli.print_line(cli.console(), f"wrote {path}")
            return
        if data_spec is not None:  # every real source marked, as for train.py
            readers.check_marked(data_spec)
        fixed = {k: v for k, v in (("test_ways", ways), ("test_shots", shots), ("test_queries", queries)) if v}
        run_all(run_dirs, episodes, seed, data_spec, finetune, finetune_lr, baselines, plots, sweep_plot,
                device, out, {"test_protocol": "fixed", **fixed} if fixed else {}, parse_grid(finetune_grid))
    except USER_ERRORS as error:
        cli.fail(str(error))
    except KeyboardInterrupt:
        cli.fail("interrupted (Ctrl-C); each results file is written whole or not at all: run evaluate.py "
                    "again for what is missing", code=130)
    except OSError as error:  # what no check foresaw: still one line naming the path
        cli.fail(cli.os_error_line(error))


def parse_grid(text: str) -> tuple[float, ...]:
    """--finetune-grid's comma-separated lrs (checked by check_request)."""
    try:
        return tuple(float(lr) for lr in text.split(","))
    except ValueError:
        raise EvaluateError(f"--finetune-grid {text} is not valid; give learning rates in [0, {MAX_FINETUNE_LR}], "
                            f"comma-separated, e.g. 0,1e-4,1e-3") from None


def comparison_folder(run_dirs: list[Path], out: Path | None) -> Path:
    """Where several runs' comparison file goes: --out, else the folder that holds the runs."""
    return out if out is not None else Path(os.path.commonpath([Path(r).resolve().parent for r in run_dirs]))


def check_flags(run_dirs: list[Path], episodes: int | None, seed: int, finetune: str, finetune_lr: float | None,
                plots: bool, sweep_plot: Path | None, out: Path | None, grid: tuple[float, ...] = LR_CANDIDATES) -> None:
    """Every flag, before any run is loaded: what the evaluation would refuse, and every place a file
    will be written (so that an error there cannot cost the evaluation)."""
    check_request(episodes, finetune, finetune_lr, seed, grid)
    twice = rundir.given_twice(run_dirs)
    if twice is not None:
        raise EvaluateError(f"run {twice} is given twice; name each run once")
    if out is not None:
        rundir.check_target_directory(out, "--out")
        names = [Path(r).name for r in run_dirs]
        same = next((n for n in names if names.count(n) > 1), None)
        if same is not None:
            raise EvaluateError(f"--out {out}: two runs are named {same}, so their results would land in one "
                                f"folder; evaluate them separately or rename one")
    if len(run_dirs) > 1 and out is None:
        rundir.check_target_directory(comparison_folder(run_dirs, out), "the runs' folder (for comparison-*.json)")
    if plots or sweep_plot:
        pictures.pyplot()
    if sweep_plot:
        parent = Path(sweep_plot).parent
        if not parent.is_dir():
            raise EvaluateError(f"--sweep-plot {sweep_plot}: its directory does not exist; create it first")
        if Path(sweep_plot).is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise EvaluateError(f"--sweep-plot {sweep_plot} cannot be written (a directory is there, or its "
                                f"directory is not writable); choose another file")


def run_all(run_dirs, episodes, seed, data_spec, finetune, finetune_lr, baselines, plots, sweep_plot,
            device, out: Path | None = None, protocol: dict | None = None, grid: tuple[float, ...] = LR_CANDIDATES) -> None:
    """Check every flag and load and check every run, evaluate every run, write every file (with several
    runs, their comparison file: every pairwise paired difference), then print:
    bad input fails before any work, an error anywhere leaves nothing written, and a closed or full
    stdout (printing comes last) never costs the results. Directories written into are claimed
    (rundir.RunDirectory): a run that train.py is still writing is refused."""
    check_flags(run_dirs, episodes, seed, finetune, finetune_lr, plots, sweep_plot, out, grid)
    dev, runs, sources_for, checkpoints = devices.pick_device(device), [], {}, []
    for run_dir in run_dirs:  # on the CPU until its turn, so a sweep of big runs fits the device
        model, cfg, state = rundir.load_run(run_dir, "cpu")
        checkpoints.append(tested_checkpoint(run_dir, state))
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
        rundir.check_run_files(target, rundir.PICTURES if plots else ())
    with ExitStack() as claims:
        for target in targets:  # the run directories, or folders under --out that exist already
            if target.is_dir():
                claims.enter_context(rundir.RunDirectory(target, fresh=False, create=False))
        results, pre, pre_name = evaluate_runs(runs, episodes, seed, finetune, finetune_lr, baselines, dev, grid)
        written: list[Path] = []
        for target, result, checkpoint in zip(targets, results, checkpoints):
            result["checkpoint"] = checkpoint  # every run saw Pre's episodes: each keeps it
            target.mkdir(parents=True, exist_ok=True)
            written.append(target / resultfiles.free_name(target, resultfiles.results_name(result)))
            resultfiles.write_results(target, result, {pre_name: pre} if pre else None, written[-1].name)
            if plots:
                pictures.plot_router_weights(result, target / "router_weights.png")
                if "experts" in result:
                    pictures.plot_kept_fraction(result, target / "kept_fraction.png")
                    pictures.plot_mask_overlap(result, target / "mask_overlap.png")
        if sweep_plot:
            pictures.plot_sparsity_sweep({cfg.sparsity: result for (_, _, cfg, _), result in zip(runs, results)}, sweep_plot)
        shown = ([pre] if pre else []) + results
        names = ([pre_name] if pre else []) + [run_dir.name for run_dir, *_ in runs]
        paths = ([f"{runs[0][0]} (its frozen backbone)"] if pre else []) + [str(run_dir) for run_dir, *_ in runs]
        paired = tables.pairwise(shown, names)
        if len(runs) > 1:
            folder = comparison_folder(run_dirs, out)
            folder.mkdir(parents=True, exist_ok=True)
            written.append(resultfiles.write_comparison(folder, shown, names, paths, paired))
    console = cli.console()  # the terminal's width, or unlimited off one
    tables.print_table(shown, names, console, paired, paths)
    for path in written:
        cli.print_line(console, f"wrote {path}.json, .md and .csv")
    for run_dir in run_dirs:  # last: a run refused anywhere above gets only its error line
        configs.note_filled_fields(run_dir)


def evaluate_runs(runs: list, episodes: int | None, seed: int, finetune: FinetuneMode, finetune_lr: float | None,
                  baselines: bool, device, grid: tuple[float, ...] = LR_CANDIDATES) -> tuple[list[Results], Results | None, str]:
    """(results of every run, Pre's results or None, Pre's name), with progress on stderr: a bar on a
    terminal, else a line per finished stage; an lr search is announced first, with what it costs."""
    kwargs = dict(episodes=episodes if episodes is not None else runs[0][2].test_episodes, seed=seed,
                  finetune=finetune, finetune_lr=finetune_lr, finetune_grid=grid, device=device)
    results, pre, pre_name = [], None, "Pre" + ("" if finetune == "none" else f"+{finetune}")
    status = cli.console(stderr=True)
    if finetune != "none" and finetune_lr is None:
        domains = sum(bool(s.class_sizes("val")) for s in runs[0][3])
        cli.print_line(status, search_plan(grid, domains, len(runs) + baselines))
    with monitor.episode_bar(status) as bar:
        for run_dir, model, cfg, sources in runs:
            jobs = [(Tested(model), run_dir.name)]
            if baselines and pre is None:  # Pre once, from the first run's θ_pre
                jobs.append((Tested(model, pre=True), pre_name))
            for tested, name in jobs:
                with monitor.Stages(bar, f"{name}: ", log=status) as stages:
                    result = evaluate_model(tested, sources, cfg, **kwargs, progress=stages)
                pre, results = (result, results) if tested.pre else (pre, results + [result])
            model.cpu()
    return results, pre, pre_name


if __name__ == "__main__":
    cli.run_cli(app)
