"""Meta-train SMAT (or the dense PMF baseline): `python train.py --sparsity 0.9 --experts 8`.

With no other flag this uses the embedded procedural benchmark and the shipped tiny ViT (the
stand-in for DINO, pretrained once on a disjoint corpus: standin.py), meta-trains on CPU or GPU,
validates on ID validation classes (keeping the best model), and ends with the ID/OOD test table of
the model beside the frozen backbone (Pre) on the same episodes, with their paired difference.
`torchrun --nproc_per_node=N train.py ...` splits every meta-batch across N processes.

Read top to bottom: `meta_train` holds the loop, whose `# --- method ---` lines are the algorithm
(smat.meta_train_step per task, smat.meta_update per meta-batch) and whose `# --- plumbing ---`
lines are one call each; then validation and the final test, the schedule, the data, and last the
command line. The method itself lives in smat.py; the plumbing behind the calls: devices.py (devices,
processes, precision), runstate.py (the run started or resumed, checkpoints), monitor.py (progress,
metrics.jsonl), flags.py (the flags made into a Config), rundir.py and cli.py.
"""

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import typer
from rich.console import Console
from rich.markup import escape

import cli
import data
import devices
import evaluate
import flags
import readers
import resultfiles
import rundir
import runstate
import smat
import tables
from cli import fail
from flags import option
from monitor import Monitor, Stages, episode_bar, summary_writer, wandb_module
from rundir import atomic_save, load_run
from smat import SMAT, Config, NonFiniteLoss

# --- the loop ---------------------------------------------------------------------------------------


def meta_train(
    cfg: Config,
    out_dir: Path | None = None,
    *,
    device: str = "auto",
    resume: bool = False,
    evaluate_at_end: bool = True,
    stop_after: int | None = None,
    cache_dir: Path | None = None,
    console: Console | None = None,
    workers: int | None = None,
    compile_model: bool = False,
    tensorboard: bool = False,
    wandb: str | None = None,
) -> Path:
    """Meta-train `cfg` into `out_dir` (default: a new runs/METHOD-TIME); returns the run directory.

    Every check that needs only the flags, the data and the backbone runs before anything is written;
    the run directory is then claimed for the run's lifetime, one process at a time
    (rundir.RunDirectory). `resume` continues the run in `out_dir` exactly where it stopped;
    `stop_after` episodes stops it resumably. `workers` data processes make the episodes (None:
    devices.default_workers(); 0: this process); `compile_model` compiles the backbone's forward
    (devices.compile_backbone). Neither changes the episodes. `tensorboard` also writes
    metrics.jsonl's records and the final test as TensorBoard scalars into RUN/tensorboard/; `wandb`
    (a project name) logs them to Weights & Biases as well.
    """
    # --- plumbing: every check before anything is written, then the run directory claimed ---
    console = console or cli.console()
    if tensorboard:
        summary_writer()  # the extra is installed
    if wandb is not None:
        wandb_module(wandb)
    procs = devices.processes(device, cfg)
    runstate.check_stop_after(cfg, stop_after)
    devices.resolve_precision(cfg.precision, procs.device)
    sources = load_sources(cfg, Path(cache_dir) if cache_dir else data.default_cache_dir())
    id_sources = [s for s in sources if s.split == "id"]
    vit = None if resume else runstate.checked_backbone(cfg, procs)  # a resumed run's model is in its checkpoint
    claim, out_dir = runstate.claim_run_directory(cfg, out_dir, resume, procs)
    with runstate.interrupted_says_where(out_dir, claim, resume), claim or nullcontext():
        state = runstate.previous_state(cfg, out_dir, resume, sources, stop_after, evaluate_at_end)
        procs = devices.init_distributed(procs)
        precision = devices.resolve_precision(cfg.precision, procs.device)
        run = runstate.start_run(cfg, out_dir, claim, state, procs, stop_after, sources, precision, vit)
        if procs.main:  # every check passed: the one line saying where the run goes
            cli.print_line(console, f"run directory: {out_dir}")
        if compile_model:
            devices.compile_backbone(run.model)
        workers = devices.default_workers() if workers is None else workers
        mine = len(range(procs.rank, cfg.meta_batch, procs.world))  # this process's tasks per meta-batch
        stream = data.training_stream(id_sources, data.protocol(cfg, "train"), cfg.seed, cfg.image_size,
                                      start=run.episodes_done + procs.rank, stride=procs.world,
                                      count=(run.last_step - run.step) * mine, workers=workers,
                                      pin_memory=procs.device.type == "cuda")
        setting = {"device": str(procs.device), "precision": precision, "workers": workers, "compile": compile_model,
                   "processes": procs.world}  # metrics.jsonl's start line: how this session ran
        with Monitor(run, procs.main, console, setting, tensorboard, wandb) as monitor:
            with stream as episodes, monitor.training():
                while run.step < run.last_step:
                    # --- method: a meta-batch of tasks, then one meta-update [M3.10-3.11] ---
                    outputs = []
                    for index in range(procs.rank, cfg.meta_batch, procs.world):  # this process's tasks
                        episode, task = next(episodes).to(procs.device), run.episodes_done + index
                        run.model.tasks_seen.fill_(task)  # drives T_r, as the official counter
                        with devices.autocast(precision, procs.device):
                            out = smat.meta_train_step(run.model, episode.support_images, episode.support_labels,
                                                       episode.query_images, episode.query_labels, episode.n_way,
                                                       episode_generator(cfg.seed, task, procs.device))
                        loss = out.loss / cfg.meta_batch  # the gradients accumulate to the meta-batch mean
                        (run.scaler.scale(loss) if run.scaler else loss).backward()
                        outputs.append(out)
                    lr = lr_scale(run.step, run.total_steps, cfg.warmup_fraction)
                    with run.naming_the_step():  # a non-finite loss names its step and the last good checkpoint
                        batch = smat.meta_update(run.model, run.optimizer, outputs, lr, run.scaler)
                    run.step += 1
                    run.model.tasks_seen.fill_(run.episodes_done)
                    # --- plumbing: metrics, validation (best.pt), checkpoint.pt ---
                    if procs.main and monitor.log_due():
                        monitor.log(batch, lr)
                    if procs.main and run.validation_due():
                        monitor.validated(validate_and_keep_best(run, id_sources, procs.device, monitor.stages))
                    if procs.main and run.checkpoint_due():
                        runstate.save_checkpoint(run)
                    if procs.world > 1:
                        dist.barrier()
            if procs.main and run.step == run.total_steps and evaluate_at_end:
                monitor.tested(final_evaluation(out_dir, sources, procs.device, console))
                cli.print_line(console, f"wrote {out_dir / 'results'}.json, .md and .csv")
    return out_dir


# --- validation (best.pt) and the final test ---------------------------------------------------------


def validate_and_keep_best(run: runstate.Run, id_sources: list, device,
                           progress: evaluate.Announce | None = None) -> float:
    """Validate; a new best is written to best.pt. Returns the validation accuracy."""
    val = validate(run.model, id_sources, run.cfg, device, progress)
    if val > run.best_val:
        run.best_val, run.best_episode = val, run.episodes_done
        atomic_save(run.snapshot(), run.out_dir / "best.pt")
    return val


def validate(model: SMAT, id_sources: list, cfg: Config, device, progress: evaluate.Announce | None = None) -> float:
    """Zero-shot accuracy on the ID domains' validation classes (fixed episodes), mean over domains."""
    results = evaluate.evaluate_model(model, id_sources, cfg, partition="val", episodes=cfg.val_episodes,
                                      seed=10_000, device=device, progress=progress)  # fixed validation episodes
    return results["id_avg"]


def final_evaluation(out_dir: Path, sources: list, device, console: Console) -> dict:
    """Test the best-on-validation model and the frozen backbone ("Pre") on the same episodes of every
    ID and OOD domain; write results.json / .md / .csv, then print both with their paired difference."""
    model, cfg, state = load_run(out_dir, device)
    run = {}
    with episode_bar(console) as bar:
        for name, tested in ((cfg.method, evaluate.Tested(model)), ("Pre", evaluate.Tested(model, pre=True))):
            with Stages(bar, f"{name}: ", log=console) as stages:  # seed 0, as evaluate.py
                run[name] = evaluate.evaluate_model(tested, sources, cfg, partition="test", episodes=cfg.test_episodes,
                                                    seed=0, device=device, progress=stages)
    run[cfg.method]["checkpoint"] = evaluate.tested_checkpoint(out_dir, state)  # which model was tested
    results = resultfiles.write_results(out_dir, run[cfg.method], {"Pre": run["Pre"]})
    tables.print_table([run["Pre"], run[cfg.method]], ["Pre", rundir.variant_label(cfg)], console, results["paired"])
    return results


# --- the schedule and the data --------------------------------------------------------------------


def lr_scale(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Linear warm-up, then cosine decay to 0 over the run.

    NOTE: the official trainer steps an epoch-wise cosine (5 warm-up, 50 total epochs) but stops at
    epoch 25; we decay over the whole run (docs/deviations.md).
    """
    warmup = max(1, round(warmup_fraction * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))


def episode_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The random numbers of episode `index` (router noise, gate samples): a function of (seed, index),
    so a resumed or multi-process run draws exactly what an uninterrupted one would."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)


def load_sources(cfg: Config, cache_dir: Path) -> list[data.Source]:
    """The sources of `--data`, checked: at least one ID source, and every protocol drawable on them."""
    sources = readers.parse_data_spec(cfg.data, cfg.image_size, cache_dir, seed=0)
    if not any(s.split == "id" for s in sources):
        raise data.DataError(f"--data {cfg.data!r} has no ID source to meta-train on; mark one with @id")
    check_protocols(sources, cfg)
    return sources


def check_protocols(sources: list, cfg: Config) -> None:
    """Draw one episode plan per (domain, partition) the run will use, so that an impossible protocol
    (too many ways, too few images per class) fails before any work, not at the first validation."""
    for source in sources:
        needs = [("test", "test")] + ([("train", "train"), ("val", "test")] if source.split == "id" else [])
        for partition, stage in needs:
            try:
                data.sample_plan(source, partition, data.protocol(cfg, stage), np.random.default_rng(0))
            except data.DataError as error:
                raise data.DataError(f"domain {source.name}, {partition} classes: {error}") from None


# --- the command line: parse, build a Config (flags.py), call meta_train ------------------------------

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(cls=cli.OneLineCommand)
@flags.config_flags
def main(
    sparsity: Annotated[Optional[float], option(help="target fraction of zeros per expert, τ in [0, 1)")] = None,
    n_experts: Annotated[Optional[int], option("--experts", help=f"number of experts in [1, {smat.MAX_EXPERTS}]")] = None,
    episodes: Annotated[Optional[int], option(help="meta-training episodes (tasks), a multiple of the meta-batch")] = None,
    method: Annotated[Optional[smat.Method], option(help=flags.METHOD_HELP)] = None,
    out: Annotated[Optional[Path], typer.Option(help="run directory (default runs/METHOD[-VARIANT]-TIME)")] = None,
    seed: Annotated[Optional[int], option(help=f"random seed in [0, {smat.MAX_SEED}]")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    data: Annotated[Optional[str], option(help="embedded, folder:PATH, torchvision:NAME:ROOT, h5:PATH/SOURCE; comma-joined, @id/@ood")] = None,
    backbone: Annotated[Optional[str], option(help="tiny, vit_small_patch16[:WEIGHTS], vit_base_patch16[:WEIGHTS] or a backbone file")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="continue the run in this directory")] = None,
    profile: Annotated[Optional[Literal["cpu", "paper"]], typer.Option(help=escape("cpu (embedded, tiny ViT) or paper (ViT-S/16 DINO, Meta-Dataset) [default: cpu]"))] = None,
    teacher: Annotated[Optional[bool], option("--teacher/--no-teacher", help="dense teacher + distillation")] = None,
    kl_to_pretrained: Annotated[Optional[bool], option("--kl-to-pretrained/--no-kl-to-pretrained", help="extra KL to the frozen model")] = None,
    router_top_k: Annotated[Optional[int], option(help="route each task to its K highest-scoring experts (0: all)")] = None,
    mask_sampling: Annotated[Optional[smat.MaskSampling], option(help="stochastic (Louizos) or official (noise-free)")] = None,
    constraint_gates: Annotated[Optional[smat.ConstraintGates], option(help="the gates ŝ ≥ τ counts: test (the evaluated model's) or sampled (the paper's)")] = None,
    precision: Annotated[Optional[smat.Precision], option(help="GPU autocast: auto = bf16 where the card has it, else fp16 with a loss scaler (CPU runs in fp32)")] = None,
    test_episodes: Annotated[Optional[int], option(help="test episodes per domain (≥ 2)")] = None,
    val_episodes: Annotated[Optional[int], option(help="validation episodes per ID domain (≥ 2)")] = None,
    checkpoint_every: Annotated[Optional[int], option(help="episodes between resumable checkpoints (≥ 1)")] = None,
    stop_after: Annotated[Optional[int], typer.Option(help="stop after this many episodes (a multiple of the meta-batch), resumable")] = None,
    evaluate_at_end: Annotated[bool, typer.Option("--evaluate/--no-evaluate", help="test table at the end")] = True,
    check_shapes: Annotated[bool, typer.Option("--check-shapes/--no-check-shapes", help="jaxtyping checks")] = True,
    config_file: Annotated[Optional[Path], typer.Option(
        "--config", help="JSON, TOML or YAML file of Config fields (a run's config.json works) or of the official code's keys (docs/configs.md); the flags and --set change it")] = None,
    settings: Annotated[Optional[list[str]], typer.Option(
        "--set", help="KEY=VALUE for any Config field, e.g. --set inner_lr=0.01 (repeatable); a field set twice, here or by a flag, must agree")] = None,
    workers: Annotated[Optional[int], typer.Option(min=0, help=escape("data worker processes (0: episodes made in the training process) [default: CPUs - 1, at most 16]"))] = None,
    compile_model: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the backbone's forward (first steps slower while it compiles; turns shape checks off)")] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard/--no-tensorboard", help="also write the metrics as TensorBoard scalars into RUN/tensorboard/ (needs the tensorboard extra)")] = False,
    wandb: Annotated[Optional[str], typer.Option(metavar="PROJECT", help="also log the metrics, the Config and the test results to this Weights & Biases project (needs the wandb extra)")] = None,
) -> None:
    """Meta-train SMAT (or PMF), then evaluate on ID and OOD test domains."""
    overrides = flags.given_fields(locals())  # the named flags: parameters named after Config fields
    try:
        flags.check_flags(resume, out, profile)
        overrides = flags.config_overrides(config_file, settings or [], overrides)
        cfg = flags.make_config(profile or "cpu", overrides, resume)
        if not check_shapes or compile_model:  # dynamo cannot trace the shape checks
            import jaxtyping

            jaxtyping.config.update("jaxtyping_disable", True)
        meta_train(cfg, resume or out, device=device, resume=resume is not None, evaluate_at_end=evaluate_at_end,
                   stop_after=stop_after, workers=workers, compile_model=compile_model, tensorboard=tensorboard,
                   wandb=wandb)
    except cli.USER_ERRORS as error:
        fail(str(error))
    except NonFiniteLoss as error:
        fail(str(error), code=1)
    except cli.Interrupted as error:
        fail(str(error), code=130)
    except KeyboardInterrupt:
        fail("interrupted (Ctrl-C) before the run started; nothing was written", code=130)
    except OSError as error:  # what no check foresaw: still one line naming the path
        fail(cli.os_error_line(error))


if __name__ == "__main__":
    cli.run_cli(app)
