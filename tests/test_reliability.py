"""Reliability (docs/reliability.md): a catalogue of bad inputs through the command lines (flags,
data, damaged run files, paths the system refuses, runs in use), runs killed with SIGKILL or
interrupted and resumed, two runs in one directory, checkpoints that would run code, non-finite
values, corrupt caches, closed or full stdout, and run directories damaged at random (Hypothesis).

The data are two small image-folder domains drawn here and a small random ViT saved as a backbone
file, as in tests/test_train.py; every case runs in its own tmp_path with SMAT_CACHE pointing inside it,
so "nothing written" is checked on everything a command could touch.
"""

import ast
import dataclasses
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

import backbone as backbones
import benchmark
import cli
import evaluate
import flags
import readers
import rundir
import train
from data import DataError
from smat import Config

ROOT = Path(__file__).resolve().parents[1]
SPEC = backbones.ViTSpec(patch_size=8, dim=16, depth=1, heads=2, grid_size=2)


def draw_domain(folder: Path, n_classes: int, n_images: int, rng: np.random.Generator) -> None:
    for c in range(n_classes):
        (folder / f"class{c}").mkdir(parents=True)
        colour = rng.integers(0, 256, 3)
        for i in range(n_images):
            image = np.clip(colour + rng.normal(0, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / f"class{c}" / f"{i}.png")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """alpha (ID) and beta (OOD): 30 classes of 20 images, enough for the command line's default
    protocols; a random ViT file; and a trained 2-expert run (config.json, checkpoint.pt, best.pt)."""
    base = tmp_path_factory.mktemp("assets")
    rng = np.random.default_rng(0)
    for domain in ("alpha", "beta"):
        draw_domain(base / domain, 30, 20, rng)
    torch.manual_seed(0)
    backbones.save_backbone(backbones.VisionTransformer(SPEC), base / "vit.pt", {"note": "random test backbone"})
    train.meta_train(small_config(base), base / "run", device="cpu", evaluate_at_end=False,
                     cache_dir=base / "cache")
    return base


def data_flag(assets: Path) -> str:
    return f"folder:{assets / 'alpha'}@id,folder:{assets / 'beta'}@ood"


def small_config(assets: Path, **overrides) -> Config:
    values = dict(data=data_flag(assets), backbone=str(assets / "vit.pt"), image_size=16, n_experts=2, episodes=4,
                  meta_batch=2, train_ways=3, train_shots=2, train_queries=2, test_ways=3, test_shots=2,
                  test_queries=2, val_every=4, val_episodes=2, test_episodes=2, checkpoint_every=2)
    return Config(**{**values, **overrides})


def save_checkpoint(path: Path, cfg: Config, spec: backbones.ViTSpec = SPEC) -> None:
    """A checkpoint in train.py's format for a freshly built model of `cfg` (another run's, swapped in)."""
    model = rundir.build_model(cfg, dataclasses.asdict(spec))
    rundir.atomic_save({"format": rundir.CHECKPOINT_FORMAT, "config": cfg.to_dict(),
                       "backbone_spec": dataclasses.asdict(spec), "model": model.state_dict()}, path)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with its content hash and mtime: any new, removed or rewritten file shows."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else
            f"{hashlib.sha256(p.read_bytes()).hexdigest()} {p.stat().st_mtime_ns}" for p in root.rglob("*")}


def copy_run(assets: Path, to: Path) -> Path:
    shutil.copytree(assets / "run", to)  # copy2: contents and mtimes
    return to


# --- 1. the catalogue of bad inputs ----------------------------------------------------------------------
# Each case builds its inputs in `ws` (the case's workspace) and returns (app, arguments, words the one
# error line must contain). tests/test_train.py and tests/test_evaluate.py hold further cases (sparsity 1.5,
# 0 experts, 0 episodes, --method maml, a nowhere: source, a missing folder, --backbone resnet,
# --resume /tmp, a garbage checkpoint, tensors that do not fit the config); none is repeated here.


def train_args(assets: Path, ws: Path, *flags: str, data_spec: str | None = None) -> list[str]:
    return ["--data", data_spec or data_flag(assets), "--backbone", str(assets / "vit.pt"), "--experts", "2",
            "--episodes", "4", "--device", "cpu", "--no-evaluate", "--out", str(ws / "run"), *flags]


def edited_domain(assets: Path, ws: Path, edit) -> str:
    """--data with a copy of alpha changed by `edit(folder)` as the ID domain."""
    shutil.copytree(assets / "alpha", ws / "data" / "alpha")
    edit(ws / "data" / "alpha")
    return f"folder:{ws / 'data' / 'alpha'}@id,folder:{assets / 'beta'}@ood"


def small_ood_domain(ws: Path, bad: bytes) -> str:
    """3 classes of 4 images, one of them `bad`: a 3-way 2-shot 2-query test episode reads every file."""
    draw_domain(ws / "data" / "gamma", 3, 4, np.random.default_rng(1))
    (ws / "data" / "gamma" / "class1" / "2.png").write_bytes(bad)
    return f"folder:{ws / 'data' / 'gamma'}@ood"


def evaluate_args(run: Path, *flags: str) -> list[str]:
    return [str(run), "--episodes", "2", "--no-baselines", "--device", "cpu", *flags]


def remove_classes(folder: Path) -> None:
    for c in range(4, 30):
        shutil.rmtree(folder / f"class{c}")


def thin_class(folder: Path) -> None:
    for i in range(3, 20):
        (folder / "class7" / f"{i}.png").unlink()


def wrong_keys_backbone(ws: Path) -> Path:
    state = {k.replace("blocks.", "layers."): v for k, v in backbones.VisionTransformer(SPEC).state_dict().items()}
    torch.save({"spec": dataclasses.asdict(SPEC), "preset": None, "meta": {}, "state_dict": state}, ws / "wrong.pt")
    return ws / "wrong.pt"


def bare_state_dict(ws: Path) -> Path:
    torch.save(backbones.VisionTransformer(SPEC).state_dict(), ws / "bare.pt")
    return ws / "bare.pt"


def not_a_run(ws: Path) -> Path:
    (ws / "notes").mkdir()
    (ws / "notes" / "todo.txt").write_text("not a run\n")
    return ws / "notes"


def swapped_in(assets: Path, ws: Path, names: tuple[str, ...], **changes) -> Path:
    """A copy of the trained run whose `names` checkpoints come from another run (other `changes`)."""
    run = copy_run(assets, ws / "run")
    for name in names:
        save_checkpoint(run / name, small_config(assets, **changes))
    return run


def other_backbone(assets: Path, ws: Path) -> Path:
    spec = dataclasses.replace(SPEC, dim=32)
    backbones.save_backbone(backbones.VisionTransformer(spec), ws / "vit32.pt", {})
    run = copy_run(assets, ws / "run")
    for name in ("checkpoint.pt", "best.pt"):
        save_checkpoint(run / name, small_config(assets, backbone=str(ws / "vit32.pt")), spec)
    return run


def without_checkpoints(assets: Path, ws: Path) -> Path:
    run = copy_run(assets, ws / "run")
    (run / "checkpoint.pt").unlink()
    (run / "best.pt").unlink()
    return run


def with_config_text(assets: Path, ws: Path, text: str) -> Path:
    run = copy_run(assets, ws / "run")
    (run / "config.json").write_text(text)
    return run


def with_bad_config(assets: Path, ws: Path) -> Path:
    return with_config_text(assets, ws, '{"n_experts": 2,')


def with_truncated_checkpoint(assets: Path, ws: Path) -> Path:
    run = copy_run(assets, ws / "run")
    blob = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(blob[: len(blob) // 2])
    return run


def edit_json(run: Path, name: str, **values) -> Path:
    path = run / name
    path.write_text(json.dumps(json.loads(path.read_text()) | values))
    return run


def edit_checkpoints(run: Path, edit, names: tuple[str, ...] = ("checkpoint.pt", "best.pt")) -> Path:
    for name in names:
        state = torch.load(run / name, weights_only=True)
        edit(state)
        torch.save(state, run / name)
    return run


def damaged(assets: Path, ws: Path, edit, names: tuple[str, ...] = ("checkpoint.pt", "best.pt")) -> Path:
    """A copy of the trained run whose checkpoints `edit` changed."""
    return edit_checkpoints(copy_run(assets, ws / "run"), edit, names)


def with_a_folder(assets: Path, ws: Path, name: str) -> Path:
    """A copy of the trained run where `name` is a folder instead of a file."""
    run = copy_run(assets, ws / "run")
    if (run / name).exists():
        (run / name).unlink()
    (run / name).mkdir()
    return run


def nan_backbone(ws: Path) -> Path:
    vit = backbones.VisionTransformer(SPEC)
    with torch.no_grad():
        vit.pos_embed[0, 0, 0] = float("nan")
    backbones.save_backbone(vit, ws / "nan.pt", {})
    return ws / "nan.pt"


def big_patch_backbone(ws: Path) -> Path:
    """A ViT with 64-px patches: the default 32-px images are smaller than one patch."""
    backbones.save_backbone(backbones.VisionTransformer(dataclasses.replace(SPEC, patch_size=64)), ws / "p64.pt", {})
    return ws / "p64.pt"


def decompression_bomb() -> bytes:
    """A PNG whose header claims 20000 x 20000 pixels, more than PIL opens (it refuses it as a
    decompression bomb before decoding anything, so the file itself can be tiny)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = (20_000).to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def run_on_own_data(assets: Path, ws: Path, edit) -> Path:
    """A run trained on a copy of alpha (ID) and beta (OOD) in `ws`; then `edit(alpha folder)`."""
    shutil.copytree(assets / "alpha", ws / "data" / "alpha")
    cfg = small_config(assets, data=f"folder:{ws / 'data' / 'alpha'}@id,folder:{assets / 'beta'}@ood")
    train.meta_train(cfg, ws / "run", device="cpu", evaluate_at_end=False, cache_dir=ws / "cache")
    edit(ws / "data" / "alpha")
    return ws / "run"


def add_class(folder: Path) -> None:
    shutil.copytree(folder / "class0", folder / "class30")


def split_file_listing_a_class_twice(folder: Path) -> None:
    names = [f"class{c}" for c in range(30)]
    (folder / "splits.json").write_text(json.dumps({"train": names[:20], "val": names[20:25], "test": names[24:]}))


HELD: list[int] = []  # lock files held open by a case, as a live run would (closed after the case)


def in_use(run: Path) -> Path:
    """`run` with its lock taken, as by a train.py that is still running (flock is per open file, so
    this process holding it blocks a claim from this process too)."""
    run.mkdir(exist_ok=True)
    fd = os.open(run / rundir.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"4242\n")
    HELD.append(fd)
    return run


def cache_entry_folder(ws: Path) -> None:
    key = f"v{benchmark.EMBEDDED_VERSION}-seed{benchmark.EMBEDDED_SEED}-res32-100x20.pt"
    (ws / "cache" / "embedded" / key).mkdir(parents=True)


T, E = train.app, evaluate.app
RESUME = ("--device", "cpu")  # the assets run has trained its 4 episodes; what is left is its final test
CASES = {
    "sparsity 1 (the interval is open)": lambda a, ws: (T, train_args(a, ws, "--sparsity", "1.0"), "[0, 1)"),
    "negative sparsity": lambda a, ws: (T, train_args(a, ws, "--sparsity", "-0.1"), "sparsity"),
    "negative experts": lambda a, ws: (T, train_args(a, ws, "--experts", "-1"), "in [1, 1024]"),
    "negative episodes": lambda a, ws: (T, train_args(a, ws, "--episodes", "-5"), "episodes"),
    "more ways than classes": lambda a, ws: (T, train_args(a, ws, data_spec=edited_domain(a, ws, remove_classes)),
                                             "use at most"),
    "shots + queries above a class's images": lambda a, ws: (
        T, train_args(a, ws, data_spec=edited_domain(a, ws, thin_class)), "shots + queries <= 3"),
    "unknown torchvision dataset": lambda a, ws: (T, train_args(a, ws, data_spec=f"torchvision:imagenet21k:{ws}@ood"),
                                                  "unknown torchvision dataset"),
    "unknown split mark": lambda a, ws: (T, train_args(a, ws, data_spec=f"folder:{a / 'alpha'}@test"),
                                         "use @id or @ood"),
    "missing h5 source": lambda a, ws: (T, train_args(a, ws, data_spec=f"h5:{ws / 'md' / 'omniglot'}@id"),
                                        "does not exist"),
    "missing DINO weights file": lambda a, ws: (
        T, train_args(a, ws, "--backbone", f"vit_small_patch16:{ws / 'dino.pth'}"), "does not exist"),
    "unknown backbone name": lambda a, ws: (T, train_args(a, ws, "--backbone", "vit_large_patch16"),
                                            "unknown backbone"),
    "backbone file with wrong keys": lambda a, ws: (T, train_args(a, ws, "--backbone", str(wrong_keys_backbone(ws))),
                                                    "missing"),
    "backbone file without a spec": lambda a, ws: (T, train_args(a, ws, "--backbone", str(bare_state_dict(ws))),
                                                   "not a backbone file"),
    "empty class folder": lambda a, ws: (
        T, train_args(a, ws, data_spec=edited_domain(a, ws, lambda d: (d / "class30").mkdir())), "has no images"),
    "zero-byte image": lambda a, ws: (E, evaluate_args(copy_run(a, ws / "run"), "--data", small_ood_domain(ws, b"")),
                                      "is empty"),
    "unreadable image": lambda a, ws: (
        E, evaluate_args(copy_run(a, ws / "run"), "--data", small_ood_domain(ws, b"\x89PNG garbage")),
        "cannot read image"),
    "an image PIL refuses as a decompression bomb": lambda a, ws: (
        E, evaluate_args(copy_run(a, ws / "run"), "--data", small_ood_domain(ws, decompression_bomb())),
        "DecompressionBombError"),
    "a backbone whose 64-px patches do not fit the 32-px images": lambda a, ws: (
        T, train_args(a, ws, "--backbone", str(big_patch_backbone(ws))), "do not fit this ViT"),
    "--resume of a folder that is not a run": lambda a, ws: (T, ["--resume", str(not_a_run(ws))],
                                                             "not a run directory"),
    "--resume with an unparsable config.json": lambda a, ws: (T, ["--resume", str(with_bad_config(a, ws))],
                                                              "not readable JSON"),
    "--resume with a truncated checkpoint": lambda a, ws: (
        T, ["--resume", str(with_truncated_checkpoint(a, ws)), "--device", "cpu"], "not a readable checkpoint"),
    "--resume with a 3-expert checkpoint swapped in": lambda a, ws: (
        T, ["--resume", str(swapped_in(a, ws, ("checkpoint.pt",), n_experts=3)), "--device", "cpu"],
        "another configuration"),
    "--resume with a changed flag": lambda a, ws: (T, ["--resume", str(copy_run(a, ws / "run")), "--experts", "3"],
                                                   "drop n_experts"),
    "evaluate a run with no checkpoint": lambda a, ws: (E, evaluate_args(without_checkpoints(a, ws)),
                                                        "does not exist"),
    "evaluate a run with a 3-expert checkpoint swapped in": lambda a, ws: (
        E, evaluate_args(swapped_in(a, ws, ("checkpoint.pt", "best.pt"), n_experts=3)), "another n_experts"),
    "evaluate a run with another backbone's checkpoint": lambda a, ws: (
        E, evaluate_args(other_backbone(a, ws)), "another backbone"),
    "evaluate a run with an unparsable config.json": lambda a, ws: (E, evaluate_args(with_bad_config(a, ws)),
                                                                    "not readable JSON"),
    # class 1: two runs in one directory
    "train into a directory a live run holds": lambda a, ws: (
        T, train_args(a, ws) if in_use(ws / "run") else [], "in use by process 4242"),
    "--resume of a run a live run holds": lambda a, ws: (
        T, ["--resume", str(in_use(copy_run(a, ws / "run"))), *RESUME], "in use by process"),
    "evaluate a run train.py still holds": lambda a, ws: (
        E, evaluate_args(in_use(copy_run(a, ws / "run"))), "in use by process"),
    "train into a finished run's directory": lambda a, ws: (
        T, train_args(a, ws) if copy_run(a, ws / "run") else [], "already holds files"),
    # class 2: changed data after training
    "--resume after a class folder was added": lambda a, ws: (
        T, ["--resume", str(run_on_own_data(a, ws, add_class)), *RESUME], "classes differ from those recorded"),
    "evaluate after a class folder was added": lambda a, ws: (
        E, evaluate_args(run_on_own_data(a, ws, add_class)), "classes differ from those recorded"),
    "evaluate the trained ID domain marked @ood": lambda a, ws: (
        E, evaluate_args(copy_run(a, ws / "run"), "--data", f"folder:{a / 'alpha'}@ood"), "was @id"),
    "a splits.json listing a class in two partitions": lambda a, ws: (
        T, train_args(a, ws, data_spec=edited_domain(a, ws, split_file_listing_a_class_twice)),
        "lists class class24 more than once (in val and test)"),
    "evaluate a run whose data.json is damaged": lambda a, ws: (
        E, evaluate_args(edit_json(copy_run(a, ws / "run"), "data.json", sources=[])), "data.json of format"),
    # class 3: damaged run files
    "evaluate: config.json holds the string \"0.9\" for sparsity": lambda a, ws: (
        E, evaluate_args(edit_json(copy_run(a, ws / "run"), "config.json", sparsity="0.9")),
        'sparsity = "0.9" is not valid; it must be a finite number'),
    "evaluate: config.json holds null for a number": lambda a, ws: (
        E, evaluate_args(edit_json(copy_run(a, ws / "run"), "config.json", seed=None)), "seed = null"),
    "evaluate: config.json gives a key twice": lambda a, ws: (
        E, evaluate_args(with_config_text(a, ws, '{"n_experts": 2, "n_experts": 3}')), "'n_experts' is given twice"),
    "--resume: config.json holds true for an integer": lambda a, ws: (
        T, ["--resume", str(edit_json(copy_run(a, ws / "run"), "config.json", n_experts=True)), *RESUME],
        "n_experts = true is not valid; it must be an integer"),
    "--resume: a checkpoint without its model": lambda a, ws: (
        T, ["--resume", str(damaged(a, ws, lambda s: s.pop("model"))), *RESUME], "lacks its model"),
    "evaluate: checkpoints without their config": lambda a, ws: (
        E, evaluate_args(damaged(a, ws, lambda s: s.pop("config"))), "lacks its config"),
    "evaluate: checkpoints without their backbone spec": lambda a, ws: (
        E, evaluate_args(damaged(a, ws, lambda s: s.pop("backbone_spec"))), "lacks its backbone_spec"),
    "--resume: a tensor of the wrong shape": lambda a, ws: (
        T, ["--resume", str(damaged(a, ws, lambda s: s["model"].update(delta=torch.zeros(3)))), *RESUME],
        "model tensor delta is torch.float32 (3,)"),
    "--resume: an empty optimiser state": lambda a, ws: (
        T, ["--resume", str(damaged(a, ws, lambda s: s.update(optimizer={}))), *RESUME], "optimiser state"),
    "--resume: a string where the step belongs": lambda a, ws: (
        T, ["--resume", str(damaged(a, ws, lambda s: s.update(step="2"))), *RESUME], 'step = "2" is not valid'),
    "evaluate: best.pt is a folder": lambda a, ws: (E, evaluate_args(with_a_folder(a, ws, "best.pt")),
                                                    "best.pt is not a file"),
    "evaluate --plots: mask_overlap.png is a folder": lambda a, ws: (
        E, evaluate_args(with_a_folder(a, ws, "mask_overlap.png"), "--plots"), "mask_overlap.png is not a file"),
    "--resume: metrics.jsonl is a folder": lambda a, ws: (
        T, ["--resume", str(with_a_folder(a, ws, "metrics.jsonl")), *RESUME], "metrics.jsonl is not a file"),
    # class 4: non-finite values
    "evaluate a checkpoint holding NaN": lambda a, ws: (
        E, evaluate_args(damaged(a, ws, lambda s: s["model"]["delta"].__setitem__(0, float("nan")))), "non-finite"),
    "--resume of a checkpoint holding infinity": lambda a, ws: (
        T, ["--resume", str(damaged(a, ws, lambda s: s["model"]["delta"].__setitem__(0, float("inf")))), *RESUME],
        "non-finite"),
    "a backbone file holding NaN": lambda a, ws: (T, train_args(a, ws, "--backbone", str(nan_backbone(ws))),
                                                  "non-finite"),
    "--finetune-lr inf": lambda a, ws: (E, evaluate_args(copy_run(a, ws / "run"), "--finetune", "full",
                                                         "--finetune-lr", "inf"), "finite learning rate"),
    "--finetune-lr 1e30": lambda a, ws: (E, evaluate_args(copy_run(a, ws / "run"), "--finetune", "lora",
                                                          "--finetune-lr", "1e30"), "<= 1.0"),
    # class 6: operating-system errors
    "--out naming a file": lambda a, ws: (T, train_args(a, ws, "--out", str(a / "vit.pt")), "not a directory"),
    "--out under a file": lambda a, ws: (T, train_args(a, ws, "--out", str(a / "vit.pt" / "run")),
                                         "vit.pt is a file"),
    "--out /dev/null": lambda a, ws: (T, train_args(a, ws, "--out", "/dev/null"), "/dev/null exists and is not"),
    "--out under /proc": lambda a, ws: (T, train_args(a, ws, "--out", "/proc/smat-run"), "/proc/smat-run"),
    "--out with a 300-character name": lambda a, ws: (T, train_args(a, ws, "--out", str(ws / ("r" * 300))),
                                                      "more than the 255"),
    "SMAT_CACHE naming a file": lambda a, ws: (
        T, train_args(a, ws, data_spec="embedded") if (ws / "cache").write_text("") == 0 else [], "Not a directory"),
    "a cache entry replaced by a folder": lambda a, ws: (
        T, train_args(a, ws, data_spec="embedded") if cache_entry_folder(ws) is None else [], "not a file"),
    "evaluate --out naming a file": lambda a, ws: (E, evaluate_args(copy_run(a, ws / "run"), "--out", str(a / "vit.pt")),
                                                   "not a directory"),
    "evaluate --out under a file": lambda a, ws: (
        E, evaluate_args(copy_run(a, ws / "run"), "--out", str(a / "vit.pt" / "x")), "vit.pt is a file"),
    # class 7: flags checked late or ignored
    "--seed -1": lambda a, ws: (T, train_args(a, ws, "--seed", "-1"), "seed = -1 is out of range"),
    "--seed 2e13": lambda a, ws: (T, train_args(a, ws, "--seed", "2e13"), "--seed"),
    "--seed 2**40": lambda a, ws: (T, train_args(a, ws, "--seed", str(2**40)), "[0, 4294967295]"),
    "--device meta": lambda a, ws: (T, train_args(a, ws, "--device", "meta"), "unknown device 'meta'"),
    "--device mps": lambda a, ws: (T, train_args(a, ws, "--device", "mps"), "unknown device 'mps'"),
    "--experts 100000": lambda a, ws: (T, train_args(a, ws, "--experts", "100000"), "in [1, 1024]"),
    "--stop-after 0": lambda a, ws: (T, train_args(a, ws, "--stop-after", "0"), "--stop-after 0 is not valid"),
    "--stop-after beyond --episodes": lambda a, ws: (T, train_args(a, ws, "--stop-after", "8"), "beyond --episodes"),
    "--episodes 5 (not a multiple of the meta-batch)": lambda a, ws: (
        T, train_args(a, ws, "--episodes", "5"), "a multiple of meta_batch 4, such as 4 or 8"),
    "--resume with another --episodes": lambda a, ws: (
        T, ["--resume", str(copy_run(a, ws / "run")), "--episodes", "2", "--device", "cpu"],
        "decays to 0 at episode 4"),
    "--resume of a finished run with nothing to do": lambda a, ws: (
        T, ["--resume", str(copy_run(a, ws / "run")), "--device", "cpu", "--no-evaluate"], "nothing is left"),
    "--resume with a --stop-after already passed": lambda a, ws: (
        T, ["--resume", str(copy_run(a, ws / "run")), *RESUME, "--stop-after", "4"], "already trained 4"),
    "--resume RUN --out OTHER": lambda a, ws: (
        T, ["--resume", str(copy_run(a, ws / "run")), "--out", str(ws / "other"), *RESUME], "drop --out"),
    "--resume with --profile": lambda a, ws: (
        T, ["--resume", str(copy_run(a, ws / "run")), "--profile", "paper", *RESUME], "drop --profile"),
    "--backbone tiny:xyz": lambda a, ws: (T, train_args(a, ws, "--backbone", "tiny:xyz"), "takes no :WEIGHTS part"),
    "evaluate --episodes 0": lambda a, ws: (E, [str(copy_run(a, ws / "run")), "--episodes", "0", "--device", "cpu"],
                                            "episodes = 0 is too few"),
    "evaluate --seed -1": lambda a, ws: (E, evaluate_args(copy_run(a, ws / "run"), "--seed", "-1"), "seed = -1"),
    "evaluate --finetune-lr without --finetune": lambda a, ws: (
        E, evaluate_args(copy_run(a, ws / "run"), "--finetune-lr", "0.01"), "finetune is none"),
    "evaluate one run twice": lambda a, ws: (E, evaluate_args(copy_run(a, ws / "run"), str(ws / "run")),
                                             "given twice"),
    "evaluate --device mps": lambda a, ws: (E, evaluate_args(copy_run(a, ws / "run"), "--device", "mps"),
                                            "unknown device"),
    "evaluate two runs of one name into one --out": lambda a, ws: (
        E, evaluate_args(copy_run(a, ws / "a" / "run"), str(copy_run(a, ws / "b" / "run")), "--out", str(ws / "out")),
        "two runs are named run"),
    "--no-kl-pretrained (an old spelling, no longer a flag)": lambda a, ws: (
        T, train_args(a, ws, "--no-kl-pretrained"), "No such option: --no-kl-pretrained"),
    "--router-top-k beyond the experts": lambda a, ws: (
        T, train_args(a, ws, "--router-top-k", "3"), "router_top_k = 3 is out of range; it must be an integer in [0, 2]"),
    # class 8: messages
    "a path with a newline": lambda a, ws: (T, train_args(a, ws, data_spec=f"folder:{ws}/no\nwhere@id"),
                                            "no where does not exist"),
    "--out with a newline under a file": lambda a, ws: (T, train_args(a, ws, "--out", f"{a / 'vit.pt'}/x\ny"),
                                                        "vit.pt is a file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_code_2_and_nothing_written(assets, tmp_path, monkeypatch, case):
    monkeypatch.setenv("SMAT_CACHE", str(tmp_path / "cache"))
    app, args, words = CASES[case](assets, tmp_path)
    before = snapshot(tmp_path)

    try:
        result = CliRunner().invoke(app, args)
    finally:
        while HELD:
            os.close(HELD.pop())

    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert snapshot(tmp_path) == before


def test_an_image_that_breaks_mid_run_stops_training_with_one_line_and_complete_files(assets, tmp_path, monkeypatch):
    """Images are decoded when first read, so training has begun; the run directory then holds only
    complete files (no temporary file, every checkpoint loadable). See docs/reliability.md."""
    monkeypatch.setenv("SMAT_CACHE", str(tmp_path / "cache"))

    def corrupt(folder: Path) -> None:
        for c in range(30):
            for i in range(20):
                (folder / f"class{c}" / f"{i}.png").write_bytes(b"GIF89a broken")

    result = CliRunner().invoke(train.app, train_args(assets, tmp_path, data_spec=edited_domain(assets, tmp_path,
                                                                                                corrupt)))

    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot read image" in result.stderr
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp" in p.name]
    for path in (tmp_path / "run").glob("*.pt"):
        rundir.read_checkpoint(path)


# --- 2. interrupted runs -------------------------------------------------------------------------------------


def launch(assets: Path, run: Path, cache: Path, resume: bool) -> subprocess.Popen:
    flags = ["--data", data_flag(assets), "--backbone", str(assets / "vit.pt"), "--experts", "2", "--episodes", "24",
             "--checkpoint-every", "4", "--device", "cpu", "--no-evaluate", "--resume" if resume else "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SMAT_CACHE": str(cache)}
    return subprocess.Popen([sys.executable, "train.py", *flags], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, poll: float = 0.01, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"train.py ended before the kill point: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "kill point not reached"
        time.sleep(poll)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def mtime(path: Path) -> int:
    return path.stat().st_mtime_ns if path.exists() else 0


def kill_during_a_checkpoint_write(process: subprocess.Popen, run: Path) -> None:
    """Freeze the process (SIGSTOP) as soon as a temporary checkpoint file appears; if the file is still
    there, the write has not been renamed into place yet: kill it frozen. Otherwise try the next write."""
    temporary = run / f".checkpoint.pt.tmp{process.pid}"  # rundir.atomic_save's name for it
    while True:
        wait_for(temporary.exists, process, poll=0.0002)  # the write lasts milliseconds
        process.send_signal(signal.SIGSTOP)
        if temporary.exists():
            return kill(process)
        process.send_signal(signal.SIGCONT)


def test_runs_killed_at_random_moments_resume_to_the_parameters_of_an_uninterrupted_run(assets, tmp_path):
    overrides = {"data": data_flag(assets), "backbone": str(assets / "vit.pt"), "n_experts": 2, "episodes": 24,
                 "checkpoint_every": 4}
    whole = train.meta_train(flags.make_config("cpu", overrides, None), tmp_path / "whole", device="cpu",
                             evaluate_at_end=False, cache_dir=tmp_path / "cache")
    run, chance, episodes_at_kill = tmp_path / "run", random.Random(7), []

    def check_checkpoint() -> None:  # after every kill: never truncated, always readable
        state = rundir.read_checkpoint(run / "checkpoint.pt")
        assert torch.load(run / "checkpoint.pt", weights_only=True)["format"] == rundir.CHECKPOINT_FORMAT
        episodes_at_kill.append(state["episode"])

    # Kill 1: a random moment after the first checkpoint.
    process = launch(assets, run, tmp_path / "cache", resume=False)
    wait_for(lambda: (run / "checkpoint.pt").exists(), process)
    time.sleep(chance.uniform(0.0, 0.5))
    kill(process)
    check_checkpoint()
    # Kill 2: during a checkpoint write (the temporary file exists, the rename has not happened).
    process = launch(assets, run, tmp_path / "cache", resume=True)
    kill_during_a_checkpoint_write(process, run)
    assert list(run.glob(".checkpoint.pt.tmp*"))  # the half-written file is left beside the intact checkpoint
    check_checkpoint()
    # Kill 3: a random moment between two checkpoints of the resumed run.
    process, previous = launch(assets, run, tmp_path / "cache", resume=True), mtime(run / "checkpoint.pt")
    wait_for(lambda: mtime(run / "checkpoint.pt") != previous, process)
    time.sleep(chance.uniform(0.0, 0.3))
    kill(process)
    check_checkpoint()
    # Then let it finish.
    process = launch(assets, run, tmp_path / "cache", resume=True)
    assert process.wait(timeout=300) == 0, process.stderr.read()[-2000:]

    assert episodes_at_kill == sorted(episodes_at_kill) and episodes_at_kill[-1] < 24
    final, reference = (torch.load(r / "checkpoint.pt", weights_only=True) for r in (run, whole))
    assert final["episode"] == reference["episode"] == 24
    for name, tensor in reference["model"].items():
        torch.testing.assert_close(final["model"][name], tensor, rtol=0, atol=0, msg=name)


# --- 3. untrusted checkpoints ----------------------------------------------------------------------------------


class RunsCode:
    """Unpickling this calls os.system: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile(path: Path, marker: Path, **fields) -> None:
    torch.save({"format": rundir.CHECKPOINT_FORMAT, **fields, "payload": RunsCode(marker)}, path)


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("SMAT_CACHE", str(tmp_path / "cache"))
    hostile(tmp_path / "live.pt", tmp_path / "live")
    torch.load(tmp_path / "live.pt", weights_only=False)  # the payload is live: plain unpickling runs it
    assert (tmp_path / "live").exists()
    run, marker = copy_run(assets, tmp_path / "run"), tmp_path / "marker"
    for name in ("checkpoint.pt", "best.pt"):
        hostile(run / name, marker, config=small_config(assets).to_dict())
    before = snapshot(tmp_path)

    with pytest.raises(rundir.RunError, match="not a readable checkpoint") as error:
        rundir.load_run(run)
    assert "\n" not in str(error.value)
    with pytest.raises(backbones.BackboneError, match="cannot read"):
        backbones.load_backbone(run / "best.pt")
    for app, args in ((evaluate.app, evaluate_args(run)), (train.app, ["--resume", str(run), "--device", "cpu"])):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert "not a readable checkpoint" in result.output

    assert not marker.exists() and snapshot(tmp_path) == before


def test_a_hostile_embedded_cache_is_rebuilt_without_running_it(tmp_path):
    small = dict(seed=0, n_classes=4, n_images=2, resolution=16, cache_dir=tmp_path)
    reference = benchmark.build_embedded(**small)
    (path,) = (tmp_path / "embedded").glob("*.pt")
    torch.save({"key": path.stem, "domains": RunsCode(tmp_path / "marker")}, path)

    rebuilt = benchmark.build_embedded(**small)

    assert not (tmp_path / "marker").exists()
    assert all(torch.equal(rebuilt[name], reference[name]) for name in reference)
    assert torch.load(path, weights_only=True)["sha256"] == benchmark._digest(reference)


def test_every_torch_load_in_the_project_passes_weights_only_true():
    files = [*ROOT.glob("*.py"), *ROOT.glob("benchmarks/**/*.py"), *ROOT.glob("tests/*.py")]
    files.remove(Path(__file__).resolve())  # this file unpickles a hostile file on purpose, to show it is live
    loads = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "load", "load_state_dict_from_url") and ast.unparse(node.func.value) in ("torch", "torch.hub"):
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                loads.append((f"{path.name}:{node.lineno}", keywords.get("weights_only")))
    assert len(loads) >= 5  # train, backbone (file and URL), data, and the tests
    assert [where for where, flag in loads if flag != "True"] == []


# --- 4. numerical faults -------------------------------------------------------------------------------------


def test_a_huge_learning_rate_stops_the_command_with_the_term_and_step_and_keeps_the_checkpoint(assets, tmp_path,
                                                                                              monkeypatch):
    real = flags.make_config
    monkeypatch.setattr(flags, "make_config", lambda *a: dataclasses.replace(real(*a), delta_lr=1e30))

    result = CliRunner().invoke(train.app, train_args(assets, tmp_path, "--episodes", "16", "--checkpoint-every", "4"))

    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert "non-finite ce at step 1 " in line and "checkpoint.pt" in line
    state = rundir.read_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["episode"] == 4 and all(torch.isfinite(t).all() for t in state["model"].values())


# --- 5. corrupt caches ---------------------------------------------------------------------------------------


def test_the_shipped_stand_in_weights_load_and_match_their_recorded_hash():
    model = backbones.load_shipped("tiny")

    assert model.spec == backbones.PRESETS["tiny"]
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())


@pytest.mark.parametrize("damage", ["missing", "changed"])
def test_missing_or_changed_shipped_weights_are_one_line_naming_the_file(tmp_path, monkeypatch, damage):
    path, expected = backbones.SHIPPED_WEIGHTS["tiny"]
    copy = tmp_path / "tiny.pt"
    if damage == "changed":
        copy.write_bytes(path.read_bytes()[:-1] + b"x")
    monkeypatch.setitem(backbones.SHIPPED_WEIGHTS, "tiny", (copy, expected))

    with pytest.raises(backbones.BackboneError, match="shipped tiny weights .*tiny.pt") as error:
        backbones.resolve_backbone(Config().backbone)

    assert len(str(error.value).splitlines()) == 1
    assert ("missing" if damage == "missing" else "SHA-256") in str(error.value)


# --- 6. two runs, one directory -------------------------------------------------------------------------


@pytest.fixture
def start_long_run(assets):
    """start(run, cache): train.py for far more episodes than a test waits for, a checkpoint every
    meta-batch, with Ctrl-C as at a terminal (SIGINT's default, even where the tests were started with
    it ignored, as by nohup or `&`); killed when the test ends, however it ends."""
    started: list[subprocess.Popen] = []

    def start(run: Path, cache: Path) -> subprocess.Popen:
        flags = ["--data", data_flag(assets), "--backbone", str(assets / "vit.pt"), "--experts", "2", "--episodes",
                 "20000", "--checkpoint-every", "4", "--device", "cpu", "--no-evaluate", "--out", str(run)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SMAT_CACHE": str(cache)}
        started.append(subprocess.Popen([sys.executable, "train.py", *flags], cwd=ROOT, env=env, text=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)))
        return started[-1]

    yield start
    for process in started:
        process.kill()  # a no-op for one that has ended
        process.wait()


def test_a_second_train_py_into_a_running_runs_directory_is_refused_and_a_killed_runs_lock_is_taken_over(
        assets, tmp_path, monkeypatch, start_long_run):
    monkeypatch.setenv("SMAT_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    first = start_long_run(run, tmp_path / "cache")
    wait_for(lambda: (run / "checkpoint.pt").exists(), first)

    second = CliRunner().invoke(train.app, train_args(assets, tmp_path, "--episodes", "20000"))  # the same --out

    assert second.exit_code == 2 and "Traceback" not in second.output, second.output
    (line,) = second.stderr.strip().splitlines()
    assert f"{run} is in use by process {first.pid} " in line
    kill(first)  # SIGKILL: its lock file stays behind, but the kernel has dropped its lock
    assert (run / rundir.LOCK_FILE).read_text().strip() == str(first.pid)
    done = rundir.read_checkpoint(run / "checkpoint.pt")["episode"]

    resumed = CliRunner().invoke(train.app, ["--resume", str(run), "--device", "cpu", "--no-evaluate",
                                             "--stop-after", str(done + 4)])

    assert resumed.exit_code == 0, resumed.output
    assert rundir.read_checkpoint(run / "checkpoint.pt")["episode"] == done + 4
    assert not (run / rundir.LOCK_FILE).exists()  # a run that ends removes its lock file


def test_runs_started_in_the_same_second_without_out_get_a_directory_each(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("SMAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir, "default_run_name", lambda cfg: f"{cfg.method}-20260101-120000")  # one second
    args = train_args(assets, tmp_path)[:-2]  # without --out

    results = [CliRunner().invoke(train.app, args) for _ in range(2)]

    assert [r.exit_code for r in results] == [0, 0], results[1].output
    runs = sorted((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == ["smat-20260101-120000", "smat-20260101-120000-2"]
    assert all(rundir.read_checkpoint(r / "checkpoint.pt")["episode"] == 4 for r in runs)


# --- 7. what a run leaves: temporaries, a full disk, Ctrl-C, a run stopped before its first checkpoint -------


def test_the_stale_temporary_sweep_removes_only_this_programs_temporaries(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("SMAT_CACHE", str(tmp_path / "cache"))
    run = copy_run(assets, tmp_path / "run")
    ours = [".checkpoint.pt.tmp999999", ".config.json.tmp12", ".results.md.tmp7", ".mask_overlap.png.tmp3",
            ".training_curves.png.tmp8", ".results-zeroshot-5w5s15q-embedded-3f2a1c-seed0-600ep.json.tmp5",
            ".comparison-zeroshot-var-embedded-3f2a1c-seed0-600ep-2.csv.tmp6"]
    users = [".notes.tmp1", ".config.json.tmpx", ".checkpoint.pt.tmp12.bak", ".mine.tmp", "draft.tmp3", ".tmp4",
             ".results-mine.txt.tmp3", ".results-.json.tmp4"]
    for name in ours + users:
        (run / name).write_text("x")

    result = CliRunner().invoke(train.app, ["--resume", str(run), *RESUME])

    assert result.exit_code == 0, result.output
    assert [n for n in ours if (run / n).exists()] == [] and all((run / n).exists() for n in users)
    # every writer of a run directory names its temporary file rundir.temporary(path), which the sweep knows
    assert all(rundir.is_temporary(rundir.temporary(run / name).name) for name in rundir.RUN_FILES)


def test_a_full_disk_at_the_first_config_json_is_one_line_and_leaves_no_directory(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("SMAT_CACHE", str(tmp_path / "cache"))
    real = Path.write_text

    def full_disk(self: Path, text: str, *args, **kwargs):
        if self.name.startswith(".config.json.tmp"):
            real(self, text[:10])  # half of it reaches the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, text, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", full_disk)
        result = CliRunner().invoke(train.app, train_args(assets, tmp_path))

    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert f"{tmp_path / 'run' / 'config.json'}" in line and "No space left on device" in line
    assert not (tmp_path / "run").exists()  # nothing half-made: a re-run starts cleanly
    assert CliRunner().invoke(train.app, train_args(assets, tmp_path)).exit_code == 0


def test_ctrl_c_is_one_line_saying_how_to_resume_and_exit_code_130(assets, tmp_path, start_long_run):
    run = tmp_path / "run"
    process = start_long_run(run, tmp_path / "cache")
    wait_for(lambda: (run / "checkpoint.pt").exists(), process)

    process.send_signal(signal.SIGINT)

    assert process.wait(timeout=180) == 130  # generous: a loaded CI machine is slow to unwind
    lines = process.stderr.read().strip().splitlines()
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith("error: interrupted (Ctrl-C)") and f"python train.py --resume {run}" in line
    assert rundir.read_checkpoint(run / "checkpoint.pt")["episode"] > 0 and not (run / rundir.LOCK_FILE).exists()


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_episode_0_to_the_same_parameters(
        assets, tmp_path, monkeypatch):
    monkeypatch.setenv("SMAT_CACHE", str(tmp_path / "cache"))
    run = copy_run(assets, tmp_path / "run")
    for name in ("checkpoint.pt", "best.pt", "metrics.jsonl"):  # as a run killed before its first checkpoint
        (run / name).unlink()

    result = CliRunner().invoke(train.app, ["--resume", str(run), "--device", "cpu", "--no-evaluate"])

    assert result.exit_code == 0, result.output
    final, reference = (torch.load(r / "checkpoint.pt", weights_only=True) for r in (run, assets / "run"))
    for name, tensor in reference["model"].items():
        torch.testing.assert_close(final["model"][name], tensor, rtol=0, atol=0, msg=name)


# --- 8. output order and pipes ---------------------------------------------------------------------------


@pytest.mark.parametrize("stream", ["closed pipe", "full device", "ascii only"])
def test_a_closed_or_full_output_or_an_ascii_terminal_never_costs_the_evaluation(assets, tmp_path, monkeypatch,
                                                                                  stream):
    """evaluate.py as the shell runs it (cli.run_cli), its stdout and stderr `2>&1 | head` that has
    stopped reading, `>/dev/full` or an ASCII-only stream (PYTHONIOENCODING=ascii): exit code 0 and the
    results written."""
    run, buffer = copy_run(assets, tmp_path / "run"), io.BytesIO()
    if stream == "closed pipe":
        read_end, write_end = os.pipe()
        os.close(read_end)
        out = open(write_end, "w")
    else:
        out = open("/dev/full", "w") if stream == "full device" else io.TextIOWrapper(buffer, encoding="ascii")
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", out)  # where the progress lines go, as `2>&1 | head`
    monkeypatch.setattr(sys, "argv", ["evaluate.py", str(run), "--episodes", "2", "--device", "cpu"])

    with pytest.raises(SystemExit) as exit:
        cli.run_cli(evaluate.app)

    assert exit.value.code == 0
    (written,) = run.glob("results-*.json")
    results = json.loads(written.read_text())
    assert math.isfinite(results["domains"]["alpha"]["mean"]) and "Pre" in results["baselines"]
    out.flush()  # the closed pipe and the full device now point at /dev/null: nothing is left to fail
    if stream == "ascii only":  # the table laid out in ASCII: +/- for ±, - for −
        table = buffer.getvalue().decode("ascii")
        assert "+/-" in table and "run - Pre" in table
        assert len({len(line) for line in table.splitlines() if line.startswith("|")}) == 1


def test_train_py_whose_reader_has_gone_still_finishes_and_writes_its_results(assets, tmp_path):
    """The shell's `train.py ... | head -1`: the pipe closes before the final table; exit code 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SMAT_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen([sys.executable, "train.py", *train_args(assets, tmp_path)[:-3], "--test-episodes", "2",
                                "--out", str(tmp_path / "run")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()

    _, errors = process.communicate(timeout=300)

    assert process.returncode == 0 and errors == "", errors[-2000:]
    assert "Pre" in json.loads((tmp_path / "run" / "results.json").read_text())["baselines"]


# --- 9. non-finite values are never a result ------------------------------------------------------------


def test_non_finite_logits_stop_the_evaluation_instead_of_scoring_chance(assets):
    model, cfg, _ = rundir.load_run(assets / "run")
    with torch.no_grad():
        model.delta[0] = float("nan")  # what a diverged fine-tuning step leaves in θ
    sources = readers.parse_data_spec(data_flag(assets), cfg.image_size)

    with pytest.raises(evaluate.EvaluateError, match="the logits of 2 of 2 episodes are not finite"):
        evaluate.evaluate_model(model, sources, cfg, episodes=2, seed=0)


def test_an_at_sign_in_a_folder_path_is_no_split_mark(tmp_path):
    draw_domain(tmp_path / "d@v2", 3, 2, np.random.default_rng(0))

    (plain,) = readers.parse_data_spec(f"folder:{tmp_path / 'd@v2'}", image_size=16)
    (marked,) = readers.parse_data_spec(f"folder:{tmp_path / 'd@v2'}@ood", image_size=16)

    assert (plain.name, plain.split, marked.name, marked.split) == ("d@v2", "id", "d@v2", "ood")
    with pytest.raises(DataError, match="if @test was meant as a split mark, use @id or @ood"):
        readers.parse_data_spec(f"folder:{tmp_path / 'd'}@test", image_size=16)


# --- 10. damaged run directories, at random -------------------------------------------------------------

FILES = ("config.json", "data.json", "checkpoint.pt", "best.pt")
ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**40), st.floats(), st.text(max_size=4),
                      st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
TENSORS = st.sampled_from(["nan", "inf", "shape", "dtype", "empty"])


def damaged_tensor(tensor: torch.Tensor, how: str) -> torch.Tensor:
    if how in ("nan", "inf") and tensor.is_floating_point() and tensor.numel():
        tensor = tensor.clone()
        tensor.view(-1)[0] = float(how)
        return tensor
    return {"shape": torch.zeros(3), "dtype": tensor.double() if tensor.is_floating_point() else tensor.float(),
            "empty": torch.zeros(0)}.get(how, torch.zeros(1))


def mutate(run: Path, name: str, draw) -> str:
    """One random damage to the file `name` of `run`; returns its description."""
    path = run / name
    how = draw(st.sampled_from(["delete key", "retype key", "delete nested", "retype nested", "truncate",
                                "garbage", "folder", "remove"]))
    if how == "folder":
        path.unlink()
        path.mkdir()
    elif how == "remove":
        path.unlink()
    elif how in ("truncate", "garbage"):
        blob = path.read_bytes()
        path.write_bytes(blob[: draw(st.integers(0, len(blob) - 1))] if how == "truncate" else draw(st.binary(max_size=64)))
    else:
        state = torch.load(path, weights_only=True) if name.endswith(".pt") else json.loads(path.read_text())
        target = state
        if how.endswith("nested"):
            nested = [k for k, v in state.items() if isinstance(v, dict) and v]
            if not nested:
                return f"{name}: {how} (nothing nested)"
            target = state[draw(st.sampled_from(sorted(nested)))]
        key = draw(st.sampled_from(sorted(target, key=str)))
        if how.startswith("delete"):
            del target[key]
        elif isinstance(target[key], torch.Tensor) and draw(st.booleans()):
            target[key] = damaged_tensor(target[key], draw(TENSORS))
        else:
            target[key] = draw(ANY_VALUE)
        how = f"{how} {key}"
        if name.endswith(".pt"):
            torch.save(state, path)
        else:
            path.write_text(json.dumps(state))
    return f"{name}: {how}"


def finite_numbers(value) -> bool:
    if isinstance(value, dict):
        return all(finite_numbers(v) for v in value.values())
    if isinstance(value, list):
        return all(finite_numbers(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_a_damaged_run_directory_is_evaluated_from_finite_values_or_refused_in_one_line(assets, data):
    with tempfile.TemporaryDirectory() as workspace:
        run = copy_run(assets, Path(workspace) / "run")
        damage = [mutate(run, name, data.draw) for name in data.draw(st.lists(st.sampled_from(FILES), min_size=1,
                                                                              max_size=2, unique=True))]

        result = CliRunner().invoke(evaluate.app, evaluate_args(run))

        assert "Traceback" not in result.output and isinstance(result.exception, (SystemExit, type(None))), (
            damage, result.output, result.exception)
        if result.exit_code == 2:
            (line,) = result.stderr.strip().splitlines()
            assert line.startswith("error: "), (damage, line)
            return
        assert result.exit_code == 0, (damage, result.output)
        used = run / "best.pt" if (run / "best.pt").exists() else run / "checkpoint.pt"
        tensors = torch.load(used, weights_only=True)["model"].values()
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), damage
        (written,) = run.glob("results-*.json")
        results = json.loads(written.read_text())
        assert finite_numbers(results) and set(results["domains"]) == {"alpha", "beta"}, damage
