"""Run directories and the command-line contract, shared by train.py and evaluate.py.

A run directory (made by train.py) holds config.json, checkpoint.pt (the last state, resumable),
best.pt (the best model on validation), metrics.jsonl and, after testing, results.json / results.md.
This module writes and reads the first three, and owns what both command lines promise on bad input:
one line `error: ...` on stderr and exit code 2, never a traceback. It imports neither command line,
so imports run one way: train.py -> evaluate.py -> rundir.py -> smat.py, data.py, backbone.py.
"""

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Literal

import torch
import typer
import typer.core

import backbone as backbones
import data
import smat
from smat import SMAT, Config

CHECKPOINT_FORMAT = "smat-run/1"  # the "format" entry of every checkpoint.pt and best.pt


class RunError(ValueError):
    """A run directory or checkpoint that cannot be used; the message is one line."""


# The exceptions that mean "bad input" (a flag, a file, a folder): one line and exit code 2.
USER_ERRORS: tuple[type[Exception], ...] = (smat.ConfigError, data.DataError, backbones.BackboneError, RunError)


# --- writing files so that a killed process never leaves half of one ----------------------------


def atomic_save(obj: object, path: Path) -> None:
    """torch.save to a temporary file in the same directory, then rename: a reader (or a resumed run)
    sees the old file or the new one, never half of one, whenever the process is killed."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- reading a run back -----------------------------------------------------------------------------


def read_checkpoint(path: Path) -> dict:
    """torch.load with weights_only=True: tensors and plain data only, never code."""
    if not path.is_file():
        raise RunError(f"{path} does not exist; a run directory holds checkpoint.pt (or best.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated file, foreign pickle, anything torch refuses
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise RunError(f"{path} is not a readable checkpoint ({first}); expected a file written by train.py")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path} is not a SMAT run checkpoint; expected format {CHECKPOINT_FORMAT!r}")
    return state


def config_from_dict(values: dict) -> Config:
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise RunError(f"unknown configuration keys {unknown[:5]}; valid keys are the fields of smat.Config")
    return Config(**values)


def read_config(run_dir: Path) -> Config:
    """The Config in a run's config.json; a missing or unparsable file is one RunError line."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a run directory; it must contain config.json (made by train.py)")
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RunError(f"{path} is not readable JSON ({error}); expected the config.json written by train.py")
    if not isinstance(values, dict):
        raise RunError(f"{path} holds a {type(values).__name__}, not the JSON object written by train.py")
    return config_from_dict(values)


def build_model(cfg: Config, backbone_spec: dict) -> SMAT:
    """The SMAT module for `cfg` on a ViT of `backbone_spec`, ready for a checkpoint's state dict
    (which holds θ_pre, so the ViT's own random weights are overwritten)."""
    return SMAT(backbones.VisionTransformer(backbones.ViTSpec(**backbone_spec)), cfg)


def load_run(run_dir: Path, device: str | torch.device = "cpu", which: Literal["best", "last"] = "best"):
    """(model, config, checkpoint) of a run: best.pt if present (and asked for), else checkpoint.pt."""
    run_dir = Path(run_dir)
    saved = read_config(run_dir).to_dict()
    path = run_dir / "best.pt" if which == "best" and (run_dir / "best.pt").is_file() else run_dir / "checkpoint.pt"
    state = read_checkpoint(path)
    cfg = config_from_dict(state["config"])
    # --resume may change only `episodes`, so best.pt from before a resume may differ from config.json there
    changed = [k for k, v in cfg.to_dict().items() if k != "episodes" and saved[k] != v]
    if changed:
        raise RunError(f"{path} was trained with another {', '.join(changed[:3])} than {run_dir / 'config.json'}; "
                       f"it is not this run's checkpoint")
    model = build_model(cfg, state["backbone_spec"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise RunError(f"{path} does not match its configuration ({str(error).splitlines()[0][:120]})")
    return model.to(device), cfg, state


# --- what a run's flags mean ------------------------------------------------------------------------


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"device {device!r} asked for but CUDA is not available; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise RunError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def protocol(cfg: Config, stage: Literal["train", "test"]) -> data.Protocol:
    """The episode shape of meta-training ("train") or of validation and testing ("test")."""
    if stage == "train":
        return data.Protocol(cfg.train_protocol, cfg.train_ways, cfg.train_shots, cfg.train_queries)
    return data.Protocol(cfg.test_protocol, cfg.test_ways, cfg.test_shots, cfg.test_queries)


# --- the command-line contract: one line and an exit code ------------------------------------------


def fail(message: str, code: int = 2) -> None:
    """One line on stderr and an exit code: the contract for bad input (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# click's UsageError (a missing or malformed value), whether typer vendors click or uses it: the base
# class of typer.BadParameter in both cases.
USAGE_ERROR = typer.BadParameter.__bases__[0]


class OneLineCommand(typer.core.TyperCommand):
    """A Typer command whose usage errors (an unknown flag, a missing value, `--experts two`, a value
    outside a flag's choices) are one line and exit code 2, like every other bad input, instead of
    click's multi-line usage box: `@app.command(cls=OneLineCommand)`."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except USAGE_ERROR as error:
            fail(error.format_message())


def run_cli(application: typer.Typer) -> None:
    """Run a Typer app from the shell: its exit code (2 for bad input, through `fail` and
    OneLineCommand), and 130 on Ctrl-C instead of click's "Aborted!"."""
    try:
        code = application(standalone_mode=False)
    except typer.Abort:
        code = 130
    sys.exit(code if isinstance(code, int) else 0)
