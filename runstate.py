"""Plumbing: a training run's state — its directory claimed, started or resumed (checked), its checkpoints.

train.meta_train calls these around its loop: `claim_run_directory` before anything is written,
`previous_state` (what --resume continues, every file checked), `start_run` (the model on its device,
the optimisers, the run's first files) and `save_checkpoint`; `Run` is where the run stands. What a
killed, interrupted or refused run leaves is in docs/reliability.md.
"""

import dataclasses
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import backbone as backbones
import cli
import configs
import devices
import rundir
import smat
from cli import RunError
from configs import config_from_dict
from devices import Processes
from rundir import CHECKPOINT_FORMAT, atomic_save, build_model, read_checkpoint
from smat import SMAT, Config, NonFiniteLoss


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
                        procs: Processes) -> tuple[rundir.RunDirectory | None, Path]:
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
    stopped before its first checkpoint (it starts again from episode 0). A resumed run keeps its whole
    configuration, `episodes` too (the learning-rate schedule spans them), and its classes (data.json),
    and must have something left to do: episodes to train, or the final test of a run killed before
    writing its results. Nothing a finished run holds is written over."""
    if not resume:
        return None
    rundir.check_run_files(out_dir)
    rundir.check_classes(out_dir, sources, every_source=True)
    if not any((out_dir / name).exists() for name in ("checkpoint.pt", "best.pt")):
        return None
    state = read_checkpoint(out_dir / "checkpoint.pt")
    if config_from_dict(state["config"]) != cfg:
        raise RunError(f"{out_dir} was trained with another configuration; resume it with its own (config.json)")
    rundir.check_resumable(state, out_dir / "checkpoint.pt")
    if (out_dir / "best.pt").exists():  # read at the end of the run: a damaged one fails now, not then
        best = read_checkpoint(out_dir / "best.pt")
        # earlier versions let --resume change `episodes`: a best.pt from before such a resume differs there
        if dataclasses.replace(config_from_dict(best["config"]), episodes=cfg.episodes) != cfg:
            raise RunError(f"{out_dir / 'best.pt'} was trained with another configuration than {out_dir}")
    done = state["episode"]  # within cfg.episodes (rundir.check_resumable)
    if stop_after is not None and stop_after <= done:
        raise RunError(f"--stop-after {stop_after}: {out_dir} has already trained {done} episodes; pass a larger one")
    results = [name for name in ("results.json", "results.md", "results.csv") if (out_dir / name).exists()]
    if done == cfg.episodes and (results or not evaluate_at_end):
        held = f" and holds its test results ({results[0]})" if results else ""
        test = (f"test it again with python evaluate.py {out_dir} (its results go beside these, never over them)"
                if results else f"test it with python evaluate.py {out_dir}")
        raise RunError(f"{out_dir} has trained all its {done} episodes{held}; nothing is left to resume: {test}, "
                       f"or train longer in a new run: python train.py --config {out_dir / 'config.json'} "
                       f"--episodes MORE")
    if results and evaluate_at_end:  # left by earlier versions, whose --resume could add episodes to a tested run
        raise RunError(f"{out_dir} holds test results ({results[0]}) that its final test would write over; resume it "
                       f"with --no-evaluate, then test it with python evaluate.py {out_dir}")
    return state


@contextmanager
def interrupted_says_where(out_dir: Path, claim: rundir.RunDirectory | None, resume: bool):
    """Ctrl-C in the block becomes cli.Interrupted: one line on what was kept, and how to go on."""
    try:
        yield
    except KeyboardInterrupt:
        if not resume and (claim is None or not claim.started):
            raise cli.Interrupted("interrupted (Ctrl-C) before the run started; nothing was written") from None
        checkpoint = out_dir / "checkpoint.pt"
        kept = f"{checkpoint} holds the last checkpoint" if checkpoint.is_file() else "no checkpoint was written yet"
        raise cli.Interrupted(f"interrupted (Ctrl-C); {kept}: continue with python train.py --resume {out_dir}") from None


def checked_backbone(cfg: Config, procs: Processes) -> backbones.VisionTransformer | None:
    """The backbone read (rank 0 reads or downloads it) and checked against the run before anything is
    written: one forward pass on an image of the run's size (a backbone whose patches do not fit the
    images fails here) and the memory the expert masks need. None on the other processes."""
    if not (procs.main or procs.world == 1):
        return None
    vit = backbones.resolve_backbone(cfg.backbone)
    with torch.no_grad():
        vit(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
    devices.check_memory(cfg, sum(p.numel() for p in vit.parameters()), procs.device)
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
        devices.check_memory(cfg, sum(p.numel() for p in vit.parameters()), procs.device)  # this process's device
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
        return {"format": CHECKPOINT_FORMAT, "config": configs.config_record(self.cfg), "backbone_spec": self.backbone_spec,
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
                               f"({cli.reason(error)})") from None
        run.step, run.best_val, run.best_episode = state["step"], state["best_val"], state["best_episode"]
    if procs.main:
        if state is not None:  # every check passed: say which fields an older run's config.json lacked
            configs.note_filled_fields(out_dir)
        rundir.cut_log(out_dir / "metrics.jsonl", run.episodes_done)  # a killed run logged past its checkpoint
        files = {"config.json": json.dumps(configs.config_record(cfg), indent=2) + "\n"}
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
