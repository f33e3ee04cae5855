"""Meta-train SMAT (or the dense PMF baseline): `python train.py --sparsity 0.9 --experts 8`.

With no other flag this uses the embedded procedural benchmark and the shipped tiny ViT (the
stand-in for DINO, pretrained once on a disjoint corpus: standin.py), meta-trains on CPU or GPU,
validates on ID validation classes (keeping the best model), and ends with the ID/OOD test table of
the model beside the frozen backbone (Pre) on the same episodes, with their paired difference.
`torchrun --nproc_per_node=N train.py ...` splits every meta-batch across N processes.

Read top to bottom: `meta_train` (every check that needs only the flags, the data and the backbone,
then the run directory claimed) and `train_claimed`, the loop, whose `# --- method ---` lines are the
algorithm (smat.meta_train_step per task, smat.meta_update per meta-batch) and whose
`# --- plumbing ---` lines call the helpers below it (the backbone, the schedule, processes, data, the
run's state, checkpoints); last the command line. The method itself lives in smat.py; this file owns
devices, processes, files and time. Progress and metrics.jsonl: monitor.py; run directories:
rundir.py; the one-line error contract: cli.py.
"""

import dataclasses
import inspect
import json
import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import typer
from rich.console import Console
from rich.markup import escape

import backbone as backbones
import data
import evaluate
import readers
import cli
import rundir
import smat
from cli import fail
from rundir import (CHECKPOINT_FORMAT, RunError, atomic_save, build_model, config_from_dict, load_run, pick_device,
                    protocol, read_checkpoint, read_config)
from monitor import Monitor, summary_writer
from smat import SMAT, Config, NonFiniteLoss


# --- the loop ---------------------------------------------------------------------------------------


def meta_train(
    cfg: Config,
    out_dir: Path | None = None,
    device: str = "auto",
    resume: bool = False,
    evaluate_at_end: bool = True,
    stop_after: int | None = None,
    cache_dir: Path | None = None,
    console: Console | None = None,
    workers: int | None = None,
    compile_model: bool = False,
    tensorboard: bool = False,
) -> Path:
    """Meta-train `cfg` into `out_dir` (default: a new runs/METHOD-TIME); returns the run directory.
    See the module docstring. Every flag and the data are checked before anything is written; the
    run directory is then claimed for the run's lifetime, one process at a time (rundir.RunDirectory).
    `workers` data processes make the episodes (None: `default_workers()`; 0: this process);
    `compile_model` compiles the backbone's forward (`compile_backbone`). Neither changes the episodes.
    `tensorboard` also writes metrics.jsonl's records as TensorBoard scalars into RUN/tensorboard/."""
    console = console or Console(stderr=False)
    if tensorboard:
        summary_writer()  # the extra is installed: checked before anything is written
    procs = processes(device, cfg)
    check_stop_after(cfg, stop_after)
    resolve_precision(cfg.precision, procs.device)
    sources = load_sources(cfg, Path(cache_dir) if cache_dir else data.default_cache_dir())
    vit = None if resume else checked_backbone(cfg, procs)  # a resumed run reads its model from its checkpoint
    claim, out_dir = claim_run_directory(cfg, out_dir, resume, procs)
    try:
        with claim or nullcontext():
            return train_claimed(cfg, out_dir, claim, sources, procs, resume, evaluate_at_end, stop_after, console,
                                 workers, compile_model, tensorboard, vit)
    except KeyboardInterrupt:
        raise cli.Interrupted(interrupted(out_dir, claim, resume)) from None


def train_claimed(cfg: Config, out_dir: Path, claim: rundir.RunDirectory | None, sources: list, procs: "Processes",
                  resume: bool, evaluate_at_end: bool, stop_after: int | None, console: Console,
                  workers: int | None = None, compile_model: bool = False, tensorboard: bool = False,
                  vit: backbones.VisionTransformer | None = None) -> Path:
    """The run in its claimed directory: resume or start, the loop, the final evaluation."""
    state = previous_state(cfg, out_dir, resume, sources, stop_after, evaluate_at_end)
    procs = init_distributed(procs)
    precision = resolve_precision(cfg.precision, procs.device)
    run = start_run(cfg, out_dir, claim, state, procs, stop_after, sources, precision, vit)
    if compile_model:
        compile_backbone(run.model)
    id_sources = [s for s in sources if s.split == "id"]
    workers = default_workers() if workers is None else workers
    mine = len(range(procs.rank, cfg.meta_batch, procs.world))  # this process's tasks per meta-batch
    stream = data.training_stream(id_sources, protocol(cfg, "train"), cfg.seed, cfg.image_size,
                                  start=run.episodes_done + procs.rank, stride=procs.world,
                                  count=(run.last_step - run.step) * mine, workers=workers,
                                  pin_memory=procs.device.type == "cuda")
    setting = {"device": str(procs.device), "precision": precision, "workers": workers, "compile": compile_model}
    with stream as episodes, Monitor(run, procs.main, console, setting, tensorboard) as monitor:
        while run.step < run.last_step:
            # --- method: a meta-batch of tasks, then one meta-update [M3.10-3.11] ---
            outputs = []
            for index in range(procs.rank, cfg.meta_batch, procs.world):  # this process's tasks
                episode, task = next(episodes).to(procs.device), run.episodes_done + index
                run.model.tasks_seen.fill_(task)  # drives T_r, as the official counter
                with autocast(precision, procs.device):
                    out = smat.meta_train_step(run.model, episode.support_images, episode.support_labels,
                                               episode.query_images, episode.query_labels, episode.n_way,
                                               episode_generator(cfg.seed, task, procs.device))
                loss = out.loss / cfg.meta_batch  # the gradients accumulate to the meta-batch mean
                (run.scaler.scale(loss) if run.scaler else loss).backward()
                outputs.append(out)
            with run.naming_the_step():  # a non-finite loss names its step and the last good checkpoint
                batch = smat.meta_update(run.model, run.optimizer, outputs,
                                         lr_scale(run.step, run.total_steps, cfg.warmup_fraction), run.scaler)
            run.step += 1
            run.model.tasks_seen.fill_(run.episodes_done)
            # --- plumbing: metrics, validation (best.pt), checkpoint.pt ---
            if procs.main and monitor.log_due():
                monitor.log(batch, lr_scale(run.step - 1, run.total_steps, cfg.warmup_fraction))
            if procs.main and run.validation_due():
                monitor.validated(validate_and_keep_best(run, id_sources, procs.device, monitor.stages))
            if procs.main and run.checkpoint_due():
                save_checkpoint(run)
            if procs.world > 1:
                dist.barrier()
    if procs.main and run.step == run.total_steps and evaluate_at_end:
        final_evaluation(out_dir, sources, procs.device, console)
    return out_dir


# --- backbone: a pretrained stand-in for DINO, or DINO itself --------------------------------------


def resolve_backbone(cfg: Config) -> backbones.VisionTransformer:
    """The frozen θ_pre, from `--backbone`:

    - "tiny": the committed stand-in for DINO (weights/tiny.pt), pretrained once on a procedural
      corpus disjoint from every benchmark domain (standin.py, docs/benchmark.md);
    - "vit_small_patch16" / "vit_base_patch16": the official DINO weights (download), or
      "vit_small_patch16:PATH" for a local copy of them;
    - a path to a file written by backbone.save_backbone.
    """
    name, _, weights = cfg.backbone.partition(":")
    if name in backbones.PRESETS and name.startswith("vit_"):
        model = backbones.build_backbone(name)
        backbones.load_dino_weights(model, weights or "dino")
        return model
    if name in backbones.SHIPPED_WEIGHTS and not weights:
        return backbones.load_shipped(name)
    path = Path(cfg.backbone).expanduser()
    if path.exists():
        return backbones.load_backbone(path)[0]
    if name in backbones.PRESETS:  # never ignore a part of the flag
        raise backbones.BackboneError(f"backbone {cfg.backbone!r}: {name} takes no :WEIGHTS part (its weights are "
                                      f"shipped); use {name}, or the path of a backbone file")
    raise backbones.BackboneError(f"unknown backbone {cfg.backbone!r}; use tiny, vit_small_patch16[:WEIGHTS], "
                                  f"vit_base_patch16[:WEIGHTS] or a backbone file")


# --- schedule and small helpers ------------------------------------------------------------------


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


def resolve_precision(precision: smat.Precision, device: torch.device) -> Literal["bf16", "fp16", "fp32"]:
    """What `--precision` means on this device, decided when a run (or a resumed run) starts.

    CPU: fp32 always (CPU bf16 matmuls are slower, not faster). CUDA: "auto" is bf16 where the card
    computes in bf16 natively (compute capability 8.0 and up: A100, H100, L4 ...), else fp16 with a
    GradScaler (V100, T4); an explicit bf16 on a card that would only emulate it is refused.
    config.json keeps "auto", so a run resumed on another card resolves it again; metrics.jsonl
    records what it resolved to.
    """
    if device.type != "cuda":
        return "fp32"
    with torch.cuda.device(device):
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "auto":
        return "bf16" if native_bf16 else "fp16"
    if precision == "bf16" and not native_bf16:
        raise RunError(f"precision bf16 asked for but {torch.cuda.get_device_name(device)} has no native bf16; "
                       f"use --precision auto or fp16")
    return precision


def autocast(precision: Literal["bf16", "fp16", "fp32"], device: torch.device):
    """Autocast to the resolved precision (fp32: none)."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


def default_workers() -> int:
    """Data worker processes per training process: the CPUs this process may use, shared among the
    training processes of this machine, less one for the process itself, at most 16.

    Measured (docs/benchmark.md): a worker spends about 0.45 s of CPU on a 128-px Meta-Dataset
    episode, so feeding a step of 60 ms takes about 8 busy workers, more for the largest episodes;
    on a 2-core machine the one worker this gives trained as fast as the old background thread and
    faster than making episodes in the training process."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(16, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1))


def compile_backbone(model: SMAT, backend: str = "inductor") -> None:
    """`--compile`: torch.compile the backbone's forward, which every f_θ(x) of the step runs through
    (smat.SMAT.features). The rest of the step (autograd.grad for the inner step and the teacher, the
    merge of the experts) stays eager. Episodes vary in size, so shapes are compiled as dynamic from the
    start: one graph with gradients and one without (the frozen pass, the teacher's last pass,
    evaluation). Shape checks must be off (`--compile` turns them off): dynamo cannot trace
    jaxtyping's checks. The step takes gradients through the backbone with retain_graph=True (the
    inner step, the teacher's first gradient), which compiled backwards that donate their buffers
    refuse, so buffer donation is switched off."""
    from torch._functorch import config as functorch_config

    functorch_config.donated_buffer = False
    model.architecture.compile(backend=backend, dynamic=True)


def check_protocols(sources: list, cfg: Config) -> None:
    """Draw one episode plan per (domain, partition) the run will use, so that an impossible protocol
    (too many ways, too few images per class) fails before any work, not at the first validation."""
    for source in sources:
        needs = [("test", "test")] + ([("train", "train"), ("val", "test")] if source.split == "id" else [])
        for partition, stage in needs:
            try:
                data.sample_plan(source, partition, protocol(cfg, stage), np.random.default_rng(0))
            except data.DataError as error:
                raise data.DataError(f"domain {source.name}, {partition} classes: {error}") from None


# --- plumbing of the loop: processes, data, the run's state, files --------------------------------


@dataclass(frozen=True)
class Processes:
    """This process among `world` (torchrun sets WORLD_SIZE and RANK; one process otherwise)."""

    world: int
    rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0 writes every file and prints; the others only compute."""
        return self.rank == 0


def processes(device: str, cfg: Config) -> Processes:
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    procs = Processes(world, rank, pick_device(device))
    if world > 1 and cfg.meta_batch % world:
        raise RunError(f"meta_batch {cfg.meta_batch} must be a multiple of the {world} processes")
    return procs


def init_distributed(procs: Processes) -> Processes:
    """With several processes: the process group (NCCL on GPUs, gloo on CPUs), one GPU each."""
    if procs.world == 1 or dist.is_initialized():
        return procs
    dist.init_process_group("nccl" if procs.device.type == "cuda" else "gloo")
    if procs.device.type != "cuda":
        return procs
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return dataclasses.replace(procs, device=device)


def load_sources(cfg: Config, cache_dir: Path) -> list[data.Source]:
    """The sources of `--data`, checked: at least one ID source, and every protocol drawable on them."""
    sources = readers.parse_data_spec(cfg.data, cfg.image_size, cache_dir, seed=0)
    if not any(s.split == "id" for s in sources):
        raise data.DataError(f"--data {cfg.data!r} has no ID source to meta-train on; mark one with @id")
    check_protocols(sources, cfg)
    return sources


def check_stop_after(cfg: Config, stop_after: int | None) -> None:
    """--stop-after: a positive multiple of the meta-batch, within --episodes (never silently rounded)."""
    if stop_after is None:
        return
    batch = cfg.meta_batch
    if stop_after < 1 or stop_after % batch:
        near = max(batch, stop_after // batch * batch)
        raise RunError(f"--stop-after {stop_after} is not valid; it must be a positive multiple of meta_batch "
                       f"{batch}, such as {near} or {near + batch}")
    if stop_after > cfg.episodes:
        raise RunError(f"--stop-after {stop_after} is beyond --episodes {cfg.episodes}; drop it to train to the end")


def claim_run_directory(cfg: Config, out_dir: Path | None, resume: bool,
                        procs: "Processes") -> tuple[rundir.RunDirectory | None, Path]:
    """(claim, directory): rank 0 claims the run directory (a new runs/METHOD-TIME[-N] by default);
    the other processes write nothing and claim nothing."""
    if out_dir is None:
        if not procs.main:
            return None, Path("runs") / rundir.default_run_name(cfg)
        claim = rundir.RunDirectory.new(Path("runs"), rundir.default_run_name(cfg))
        return claim, claim.path
    out_dir = Path(out_dir)
    if not procs.main:
        return None, out_dir
    rundir.check_target_directory(out_dir, "--resume" if resume else "--out")
    return rundir.RunDirectory(out_dir, fresh=not resume, create=not resume), out_dir


def previous_state(cfg: Config, out_dir: Path, resume: bool, sources: list, stop_after: int | None = None,
                   evaluate_at_end: bool = True) -> dict | None:
    """The checkpoint to resume, checked (rundir.read_checkpoint), or None for a fresh run and for a run
    stopped before its first checkpoint (it starts again from episode 0). A resumed run keeps its
    configuration but for `episodes` (no fewer than it has done) and its classes (data.json), and
    must have something left to do."""
    if not resume:
        return None
    rundir.check_run_files(out_dir)
    rundir.check_classes(out_dir, sources, every_source=True)
    if not any((out_dir / name).exists() for name in ("checkpoint.pt", "best.pt")):
        return None
    state = read_checkpoint(out_dir / "checkpoint.pt")
    if dataclasses.replace(config_from_dict(state["config"]), episodes=cfg.episodes) != cfg:
        raise RunError(f"{out_dir} was trained with another configuration; resume with the same flags")
    rundir.check_resumable(state, out_dir / "checkpoint.pt")
    if (out_dir / "best.pt").exists():  # read at the end of the run: a damaged one fails now, not then
        best = read_checkpoint(out_dir / "best.pt")
        if dataclasses.replace(config_from_dict(best["config"]), episodes=cfg.episodes) != cfg:
            raise RunError(f"{out_dir / 'best.pt'} was trained with another configuration than {out_dir}")
    done = state["episode"]
    if done > cfg.episodes:
        raise RunError(f"{out_dir} has already trained {done} episodes; pass --episodes {done} or more to continue it")
    if stop_after is not None and stop_after <= done:
        raise RunError(f"--stop-after {stop_after}: {out_dir} has already trained {done} episodes; pass a larger one")
    if done == cfg.episodes and not evaluate_at_end:
        raise RunError(f"{out_dir} has trained all its {done} episodes, nothing is left to resume; pass a larger "
                       f"--episodes to train further, or test it with evaluate.py")
    return state


def interrupted(out_dir: Path, claim: rundir.RunDirectory | None, resume: bool) -> str:
    """What Ctrl-C leaves, and how to go on."""
    if not resume and (claim is None or not claim.started):
        return "interrupted (Ctrl-C) before the run started; nothing was written"
    checkpoint = out_dir / "checkpoint.pt"
    kept = f"{checkpoint} holds the last checkpoint" if checkpoint.is_file() else "no checkpoint was written yet"
    return f"interrupted (Ctrl-C); {kept}: continue with python train.py --resume {out_dir}"


def checked_backbone(cfg: Config, procs: Processes) -> backbones.VisionTransformer | None:
    """The backbone read (rank 0 reads or downloads it) and checked against the run before anything is
    written: one forward pass on an image of the run's size (a backbone whose patches do not fit the
    images fails here) and the memory the expert masks need. None on the other processes."""
    if not (procs.main or procs.world == 1):
        return None
    vit = resolve_backbone(cfg)
    with torch.no_grad():
        vit(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
    rundir.check_memory(cfg, sum(p.numel() for p in vit.parameters()), procs.device)
    return vit


def initial_model(cfg: Config, state: dict | None, procs: Processes,
                  vit: backbones.VisionTransformer | None = None) -> tuple[SMAT, dict]:
    """(model, backbone spec): from the checkpoint, or SMAT on θ_pre from `vit` (checked_backbone; the
    other processes take it from rank 0)."""
    torch.manual_seed(cfg.seed)
    if state is not None:
        model = build_model(cfg, state["backbone_spec"])
        model.load_state_dict(state["model"])  # checked by rundir.read_checkpoint
        return model, state["backbone_spec"]
    if vit is None:
        vit = checked_backbone(cfg, procs)
    if procs.world > 1:
        box = [vit.state_dict() if procs.main else None, dataclasses.asdict(vit.spec) if procs.main else None]
        dist.broadcast_object_list(box, src=0)
        vit = backbones.VisionTransformer(backbones.ViTSpec(**box[1]))
        vit.load_state_dict(box[0])
        rundir.check_memory(cfg, sum(p.numel() for p in vit.parameters()), procs.device)  # this process's device
    torch.manual_seed(cfg.seed)  # the same experts and router whatever loading the backbone drew
    return SMAT(vit, cfg), dataclasses.asdict(vit.spec)


@dataclass
class Run:
    """A run in progress: the model, its optimisers, and where the run stands. The loop advances
    `step`; the plumbing below reads it to log, validate and write checkpoints."""

    cfg: Config
    out_dir: Path
    model: SMAT
    optimizer: smat.MetaOptimizer
    scaler: torch.amp.GradScaler | None
    backbone_spec: dict
    total_steps: int  # optimiser steps of the whole run
    last_step: int  # where this process stops (--stop-after), resumable
    step: int = 0
    best_val: float = -1.0
    best_episode: int = -1

    @property
    def episodes_done(self) -> int:
        return self.step * self.cfg.meta_batch

    def validation_due(self) -> bool:
        return self.episodes_done % self.cfg.val_every < self.cfg.meta_batch or self.step == self.total_steps

    def checkpoint_due(self) -> bool:
        return (self.episodes_done % self.cfg.checkpoint_every < self.cfg.meta_batch
                or self.step in (self.last_step, self.total_steps))

    def last_good(self) -> str:
        path = self.out_dir / "checkpoint.pt"
        return f"the last good checkpoint is {path}" if path.is_file() else "no checkpoint had been written yet"

    @contextmanager
    def naming_the_step(self):
        try:
            yield
        except NonFiniteLoss as error:
            raise NonFiniteLoss(f"{error} at step {self.step} (episode {self.episodes_done}); "
                                f"{self.last_good()}") from None

    def snapshot(self) -> dict:
        """The model and where the run stands: all of best.pt, and checkpoint.pt without the optimiser."""
        return {"format": CHECKPOINT_FORMAT, "config": rundir.config_record(self.cfg), "backbone_spec": self.backbone_spec,
                "model": self.model.state_dict(), "step": self.step, "episode": self.episodes_done,
                "best_val": self.best_val, "best_episode": self.best_episode}


def start_run(cfg: Config, out_dir: Path, claim: rundir.RunDirectory | None, state: dict | None, procs: Processes,
              stop_after: int | None, sources: list, precision: str,
              vit: backbones.VisionTransformer | None = None) -> Run:
    """The model on its device, the optimisers (restored when resuming), and the run's first files
    written: data.json (the classes of every partition, for a run that starts from episode 0) and
    config.json. `precision` is the resolved autocast choice (resolve_precision)."""
    model, backbone_spec = initial_model(cfg, state, procs, vit)
    model = model.to(procs.device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None  # fp16 needs loss scaling
    total_steps = math.ceil(cfg.episodes / cfg.meta_batch)
    last_step = total_steps if stop_after is None else min(total_steps, math.ceil(stop_after / cfg.meta_batch))
    run = Run(cfg, out_dir, model, smat.MetaOptimizer(model), scaler, backbone_spec, total_steps, last_step)
    if state is not None:
        rundir.restore_optimizer(run.optimizer, state, str(out_dir / "checkpoint.pt"))
        if scaler is not None and state.get("scaler"):
            try:
                scaler.load_state_dict(state["scaler"])
            except Exception as error:
                raise RunError(f"{out_dir / 'checkpoint.pt'}: the gradient scaler state does not fit "
                               f"({rundir.reason(error)})") from None
        run.step, run.best_val, run.best_episode = state["step"], state["best_val"], state["best_episode"]
    if procs.main:
        if state is not None:  # every check passed: say which fields an older run's config.json lacked
            rundir.note_filled_fields(out_dir)
        files = {"config.json": json.dumps(rundir.config_record(cfg), indent=2) + "\n"}
        if state is None and not (out_dir / "data.json").exists():
            files = {"data.json": rundir.manifest_text(sources)} | files  # config.json last: it marks a run
        claim.start(files)
    return run


def save_checkpoint(run: Run) -> None:
    """checkpoint.pt (resumable: with the optimisers), never replacing the last good one by a broken model."""
    bad = [key for key, p in run.model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteLoss(f"non-finite {bad[0]} at step {run.step} (after the optimiser step); {run.last_good()}")
    atomic_save(run.snapshot() | {"optimizer": run.optimizer.state_dict(),
                                  "scaler": run.scaler.state_dict() if run.scaler else None},
                run.out_dir / "checkpoint.pt")


def validate_and_keep_best(run: Run, id_sources: list, device, progress: evaluate.Announce | None = None) -> float:
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
    ID and OOD domain; write results.json / results.md, then print both with their paired difference."""
    model, cfg, _ = load_run(out_dir, device)
    run = {}
    with evaluate.episode_bar(console) as bar:
        for name, baseline in ((cfg.method, "model"), ("Pre", "pretrained")):
            with evaluate.Stages(bar, f"{name}: ", log=console) as stages:  # seed 0, as evaluate.py
                run[name] = evaluate.evaluate_model(model, sources, cfg, partition="test", episodes=cfg.test_episodes,
                                                    seed=0, device=device, baseline=baseline, progress=stages)
    evaluate.write_results(out_dir, run[cfg.method], {"Pre": run["Pre"]})
    results = evaluate.with_baselines(run[cfg.method], {"Pre": run["Pre"]})
    evaluate.print_table([run["Pre"], run[cfg.method]], ["Pre", rundir.variant_label(cfg)], console, results["paired"])
    return results


# --- the command line: parse, build a Config, call meta_train ------------------------------------

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
# --help shows each profile's defaults; a flag left out keeps the profile's value (or, with --resume, the run's)
PROFILES = {"cpu": Config(), "paper": Config.paper()}


CONFIG_FIELDS = [f.name for f in dataclasses.fields(Config)]


def option(*names: str, help: str, **kwargs):
    """A flag of `main`; where its parameter is named after a Config field, `config_flags` adds that
    field's default in each profile to its help and `main` passes its value on as an override."""
    return typer.Option(*names, help=help, show_default=False, **kwargs)


def config_flags(command):
    """The one place that ties a flag to a Config field: the parameter's name. `--experts` is the
    parameter `n_experts`, so its --help shows n_experts' defaults (`profile_defaults`), and
    `given_fields` hands its value to the Config."""
    for name, parameter in inspect.signature(command).parameters.items():
        if name in CONFIG_FIELDS:
            info = parameter.annotation.__metadata__[0]
            info.help = f"{info.help} {escape(f'[default: {profile_defaults(name)}]')}"  # brackets as text
    return command


def given_fields(flags: dict) -> dict:
    """The Config fields among `main`'s parameters that the command line set (a flag left out is None)."""
    return {name: value for name, value in flags.items() if name in CONFIG_FIELDS and value is not None}


def profile_defaults(field: str) -> str:
    """A field's default for --help: "0.9" where the profiles agree, else "cpu 800, paper 50000";
    then its value under --method pmf where PMF switches it ("1 with --method pmf")."""

    def shown(value) -> str:
        text = ("on" if value else "off") if isinstance(value, bool) else str(value)
        return text if len(text) <= 40 else text[:36] + "…"  # the paper's ten data sources

    values = {name: shown(getattr(cfg, field)) for name, cfg in PROFILES.items()}
    text = values["cpu"] if len(set(values.values())) == 1 else ", ".join(f"{k} {v}" for k, v in values.items())
    if field in smat.PMF_SWITCHES and field != "method":
        text += f"; {shown(smat.PMF_SWITCHES[field])} with --method pmf"
    if field in smat.PMF_CPU_LRS:
        text += f"; cpu {shown(smat.PMF_CPU_LRS[field])} with --method pmf"
    return text


@app.command(cls=cli.OneLineCommand)
@config_flags
def main(
    sparsity: Annotated[Optional[float], option(help="target fraction of zeros per expert, τ in [0, 1)")] = None,
    n_experts: Annotated[Optional[int], option("--experts", help=f"number of experts in [1, {smat.MAX_EXPERTS}]")] = None,
    episodes: Annotated[Optional[int], option(help="meta-training episodes (tasks), a multiple of the meta-batch")] = None,
    method: Annotated[Optional[smat.Method], option(help="smat, or pmf (dense ProtoNet meta-tuning)")] = None,
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
        "--config", help="JSON or TOML file of Config fields (a run's config.json works); under --set and the flags")] = None,
    settings: Annotated[Optional[list[str]], typer.Option(
        "--set", help="KEY=VALUE for any Config field, e.g. --set inner_lr=0.01 (repeatable); under the named flags")] = None,
    workers: Annotated[Optional[int], typer.Option(min=0, help=escape("data worker processes (0: episodes made in the training process) [default: CPUs - 1, at most 16]"))] = None,
    compile_model: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the backbone's forward (first steps slower while it compiles; turns shape checks off)")] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard/--no-tensorboard", help="also write the metrics as TensorBoard scalars into RUN/tensorboard/ (needs the tensorboard extra)")] = False,
) -> None:
    """Meta-train SMAT (or PMF), then evaluate on ID and OOD test domains."""
    overrides = given_fields(locals())  # the named flags: parameters named after Config fields
    try:
        check_flags(resume, out, profile)
        overrides = config_overrides(config_file, settings or []) | overrides
        cfg = make_config(profile or "cpu", overrides, resume)
        if not check_shapes or compile_model:  # dynamo cannot trace the shape checks
            import jaxtyping

            jaxtyping.config.update("jaxtyping_disable", True)
        meta_train(cfg, resume or out, device, resume=resume is not None, evaluate_at_end=evaluate_at_end,
                   stop_after=stop_after, workers=workers, compile_model=compile_model, tensorboard=tensorboard)
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


def check_flags(resume: Path | None, out: Path | None, profile: str | None) -> None:
    """Flags that contradict each other: never silently ignore one."""
    if resume is not None and out is not None and Path(out).resolve() != Path(resume).resolve():
        raise RunError(f"--resume {resume} continues the run in its own directory; drop --out {out}")
    if resume is not None and profile is not None:
        raise RunError("--resume keeps the run's configuration; drop --profile")


def config_overrides(config_file: Path | None, settings: list[str]) -> dict:
    """Config fields from --config FILE (JSON, or TOML by its .toml suffix) and then --set KEY=VALUE
    (each value converted by its field's type), checked as config.json is (rundir.check_fields:
    unknown keys, types, choices); Config itself checks the ranges. A problem is one RunError line."""
    values: dict = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            text = path.read_text()
            if path.suffix.lower() == ".toml":
                import tomllib

                values = tomllib.loads(text)
            else:
                values = json.loads(text)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise RunError(f"--config {path}: not a readable {'TOML' if path.suffix.lower() == '.toml' else 'JSON'} "
                           f"file of Config fields ({rundir.reason(error)})") from None
        values = rundir.check_fields(Config, rundir.config_fields(values, f"--config {path}"), f"--config {path}")
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    for setting in settings:
        key, equals, raw = (part.strip() for part in setting.partition("="))
        if not equals or not key:
            raise RunError(f"--set {setting!r}: use KEY=VALUE with a Config field as KEY, e.g. --set inner_lr=0.01")
        if key not in fields:
            raise RunError(f"--set {key}: unknown Config field; valid keys are the fields of smat.Config "
                           f"(e.g. {', '.join(list(fields)[:6])} ...)" + rundir.closest_field(key, list(fields)))
        kind = fields[key]
        try:
            if kind is bool:
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                value: object = raw.lower() in ("true", "1", "yes")
            else:
                value = int(raw) if kind is int else float(raw) if kind is float else raw
        except ValueError:
            raise RunError(f"--set {key}={raw}: not a valid {getattr(kind, '__name__', kind)}") from None
        values[key] = rundir.check_fields(Config, {key: value}, "--set")[key]
    return values


def make_config(profile: Literal["cpu", "paper"], overrides: dict, resume: Path | None) -> Config:
    """The run's Config: the profile's values with `overrides`, or with --resume the run's own (where
    only `episodes` may change). Config checks every value (ranges, choices)."""
    if resume is not None:
        if not (resume / "config.json").is_file():
            raise RunError(f"--resume {resume}: not a run directory (no config.json); pass a directory made by train.py")
        saved = read_config(resume)
        changed = {k: v for k, v in overrides.items() if k != "episodes" and getattr(saved, k) != v}
        if changed:
            raise RunError(f"--resume keeps the run's configuration; drop {', '.join(changed)} (only --episodes may change)")
        return dataclasses.replace(saved, **overrides)
    if overrides.get("method") == "pmf":
        overrides = smat.PMF_SWITCHES | (smat.PMF_CPU_LRS if profile == "cpu" else {}) | overrides
    return Config(**overrides) if profile == "cpu" else Config.paper(**overrides)


if __name__ == "__main__":
    cli.run_cli(app)
