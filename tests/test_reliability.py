"""Reliability (docs/reliability.md): a catalogue of bad inputs through the command lines,
runs killed with SIGKILL and resumed, checkpoints that would run code, a non-finite loss, corrupt caches.

The data are two small image-folder domains drawn here and a small random ViT saved as a backbone
file, as in tests/test_train.py; every case runs in its own tmp_path with SMAT_CACHE pointing inside it,
so "nothing written" is checked on everything a command could touch.
"""

import ast
import dataclasses
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import backbone as backbones
import benchmark
import evaluate
import rundir
import train
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


def with_bad_config(assets: Path, ws: Path) -> Path:
    run = copy_run(assets, ws / "run")
    (run / "config.json").write_text('{"n_experts": 2,')
    return run


def with_truncated_checkpoint(assets: Path, ws: Path) -> Path:
    run = copy_run(assets, ws / "run")
    blob = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(blob[: len(blob) // 2])
    return run


T, E = train.app, evaluate.app
CASES = {
    "sparsity 1 (the interval is open)": lambda a, ws: (T, train_args(a, ws, "--sparsity", "1.0"), "[0, 1)"),
    "negative sparsity": lambda a, ws: (T, train_args(a, ws, "--sparsity", "-0.1"), "sparsity"),
    "negative experts": lambda a, ws: (T, train_args(a, ws, "--experts", "-1"), "in [1, 1024]"),
    "negative episodes": lambda a, ws: (T, train_args(a, ws, "--episodes", "-5"), "episodes"),
    "more ways than classes": lambda a, ws: (T, train_args(a, ws, data_spec=edited_domain(a, ws, remove_classes)),
                                             "use at most"),
    "shots + queries above a class's images": lambda a, ws: (
        T, train_args(a, ws, data_spec=edited_domain(a, ws, thin_class)), "shots + queries <= 3"),
    "unknown torchvision dataset": lambda a, ws: (T, train_args(a, ws, data_spec=f"torchvision:imagenet21k:{ws}"),
                                                  "unknown torchvision dataset"),
    "unknown split mark": lambda a, ws: (T, train_args(a, ws, data_spec=f"folder:{a / 'alpha'}@test"),
                                         "use @id or @ood"),
    "missing h5 source": lambda a, ws: (T, train_args(a, ws, data_spec=f"h5:{ws / 'md' / 'omniglot'}"),
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
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_code_2_and_nothing_written(assets, tmp_path, monkeypatch, case):
    monkeypatch.setenv("SMAT_CACHE", str(tmp_path / "cache"))
    app, args, words = CASES[case](assets, tmp_path)
    before = snapshot(tmp_path)

    result = CliRunner().invoke(app, args)

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
    whole = train.meta_train(train.make_config("cpu", overrides, None), tmp_path / "whole", device="cpu",
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
                flags = {k.arg: ast.unparse(k.value) for k in node.keywords}
                loads.append((f"{path.name}:{node.lineno}", flags.get("weights_only")))
    assert len(loads) >= 5  # train, backbone (file and URL), data, and the tests
    assert [where for where, flag in loads if flag != "True"] == []


# --- 4. numerical faults -------------------------------------------------------------------------------------


def test_a_huge_learning_rate_stops_the_command_with_the_term_and_step_and_keeps_the_checkpoint(assets, tmp_path,
                                                                                              monkeypatch):
    real = train.make_config
    monkeypatch.setattr(train, "make_config", lambda *a: dataclasses.replace(real(*a), delta_lr=1e30))

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
        train.resolve_backbone(Config())

    assert len(str(error.value).splitlines()) == 1
    assert ("missing" if damage == "missing" else "SHA-256") in str(error.value)
