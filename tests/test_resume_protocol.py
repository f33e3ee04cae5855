"""--resume continues a run exactly and writes over nothing: metrics.jsonl cut back to the checkpoint a
killed run resumes from (each episode logged once, in order, as in an uninterrupted run), and a
resume that would change the learning-rate schedule or write over a finished run's results refused in
one line (exit code 2) with every file of the run as it was.

The data are tests/assets.py's two small image-folder domains and random ViT, as in tests/test_train.py.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import rundir
import runstate
import train
from assets import make_assets
from smat import Config
from test_reliability import snapshot

TIMING = ("episodes_per_second", "peak_memory_gib")  # measured, so never equal between two runs


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


def small_config(assets: Path, **overrides) -> Config:
    values = dict(data=f"folder:{assets / 'alpha'}@id,folder:{assets / 'beta'}@ood", backbone=str(assets / "vit.pt"),
                  image_size=16, n_experts=2, episodes=12, meta_batch=2, train_ways=3, train_shots=2,
                  train_queries=2, test_ways=3, test_shots=2, test_queries=2, val_every=4, val_episodes=2,
                  test_episodes=2, checkpoint_every=4)
    return Config(**{**values, **overrides})


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- metrics.jsonl after a kill and a resume ------------------------------------------------------------


class Killed(BaseException):
    """The process ends here, as under SIGKILL: no handler of the program catches it."""


def test_a_run_killed_after_logging_past_its_checkpoint_resumes_to_the_log_of_an_uninterrupted_run(
        assets, tmp_path, monkeypatch):
    cfg = small_config(assets)
    whole = train.meta_train(cfg, tmp_path / "whole", device="cpu", evaluate_at_end=False, workers=0)
    real = runstate.save_checkpoint

    def dies_at_episode_8(run: runstate.Run) -> None:  # after logging and validating episodes 6 and 8
        if run.episodes_done == 8:
            raise Killed
        real(run)

    with monkeypatch.context() as patch:
        patch.setattr(runstate, "save_checkpoint", dies_at_episode_8)
        with pytest.raises(Killed):
            train.meta_train(cfg, tmp_path / "run", device="cpu", evaluate_at_end=False, workers=0)
    run = tmp_path / "run"
    assert [r["episode"] for r in records(run) if "step" in r] == [2, 4, 6, 8]  # past the checkpoint at 4
    assert torch.load(run / "checkpoint.pt", weights_only=True)["episode"] == 4
    with open(run / "metrics.jsonl", "a") as log:
        log.write('{"step": 5, "epi')  # and a line the kill cut short

    train.meta_train(cfg, run, device="cpu", resume=True, evaluate_at_end=False, workers=0)

    resumed = records(run)
    assert [r["episode"] for r in resumed if "step" in r] == [2, 4, 6, 8, 10, 12]  # once each, in order
    assert [r["episode"] for r in resumed if "val_accuracy" in r] == [4, 8, 12]
    assert [r["episode"] for r in resumed if "start" in r] == [0, 4]  # the session and the resumed one
    assert [r["episode"] for r in resumed] == sorted(r["episode"] for r in resumed)

    def logged(rs: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rs if "start" not in r]

    assert logged(resumed) == logged(records(whole))  # bit-exact resume, so the same numbers too


def test_cut_log_keeps_each_episode_once_and_every_other_line_byte_for_byte(tmp_path):
    """A log from before the cut existed: session 1 logged to 8 and was killed (checkpoint at 4); session 2
    resumed at 4 and logged 6 to 10, and was killed mid-line (checkpoint at 8)."""
    lines = ['{"episode": 0, "start": {}}', '{"step": 1, "episode": 2}', '{"step": 2, "episode": 4}',
             '{"episode": 4, "val_accuracy": 50.0}', '{"step": 3, "episode": 6}', '{"step": 4, "episode": 8}',
             'a line no program wrote', '[1, 2]',
             '{"episode": 4, "start": {}}', '{"step": 3, "episode": 6}', '{"step": 4, "episode": 8}',
             '{"step": 5, "episode": 10}']
    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(lines) + '\n{"step": 6, "epi')

    rundir.cut_log(log, 8)

    kept = [0, 1, 2, 3, 6, 7, 8, 9, 10]  # session 1 past 4 is superseded; session 2 past 8 and the half line go
    assert log.read_text() == "".join(lines[i] + "\n" for i in kept)
    before = log.stat().st_mtime_ns
    rundir.cut_log(log, 8)  # nothing to cut: the file is not rewritten
    assert log.stat().st_mtime_ns == before
    rundir.cut_log(tmp_path / "missing.jsonl", 0)
    assert not (tmp_path / "missing.jsonl").exists()


# --- resumes that would change the schedule or write over results: refused, nothing written --------------


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """A run that trained all its 4 episodes and wrote results.json / results.md."""
    base = tmp_path_factory.mktemp("finished")
    return train.meta_train(small_config(assets, episodes=4), base / "run", device="cpu", workers=0,
                            cache_dir=base / "cache")


@pytest.fixture(scope="module")
def unfinished(assets, tmp_path_factory):
    """A run of 8 episodes stopped (resumably) after 4."""
    base = tmp_path_factory.mktemp("unfinished")
    return train.meta_train(small_config(assets, episodes=8), base / "run", device="cpu", workers=0, stop_after=4,
                            evaluate_at_end=False, cache_dir=base / "cache")


def refused(run: Path, tmp_path: Path, monkeypatch, *flags: str) -> str:
    """`train.py --resume RUN FLAGS` on a copy of `run`: its one error line, after checking exit code 2 and
    every file of the copy (checkpoint.pt, results.json, results.md ...) byte for byte and mtime as it was."""
    monkeypatch.setenv("SMAT_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "run"
    shutil.copytree(run, copy)  # contents and mtimes
    before = snapshot(copy)
    result = CliRunner().invoke(train.app, ["--resume", str(copy), "--device", "cpu", *flags])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    (line,) = result.stderr.strip().splitlines()
    assert snapshot(copy) == before
    return line.replace(str(copy), "RUN")


@pytest.mark.parametrize("flags", [(), ("--episodes", "4")], ids=["no --episodes", "its own --episodes"])
def test_resuming_a_finished_and_tested_run_is_refused_and_its_results_stay(finished, tmp_path, monkeypatch, flags):
    line = refused(finished, tmp_path, monkeypatch, *flags)

    assert line == ("error: RUN has trained all its 4 episodes and holds its test results (results.json); nothing is "
                    "left to resume: test it again with python evaluate.py RUN (its results go beside these, never "
                    "over them), or train longer in a new run: python train.py --config RUN/config.json "
                    "--episodes MORE")


def test_more_episodes_for_a_finished_run_are_refused_instead_of_restarting_its_schedule(finished, tmp_path,
                                                                                          monkeypatch):
    line = refused(finished, tmp_path, monkeypatch, "--episodes", "8")

    assert line == ("error: --resume RUN --episodes 8: the run's learning rate warms up, then decays to 0 at episode "
                    "4 (a cosine over its 4 episodes), and another length would change the rate of every episode "
                    "left, or restart it on a finished run; resume without --episodes, or train 8 episodes in a new "
                    "run: python train.py --config RUN/config.json --episodes 8")


@pytest.mark.parametrize("episodes", ["4", "12"])
def test_other_episodes_for_an_unfinished_run_are_refused_instead_of_bending_its_schedule(unfinished, tmp_path,
                                                                                          monkeypatch, episodes):
    line = refused(unfinished, tmp_path, monkeypatch, "--episodes", episodes)

    assert line.startswith(f"error: --resume RUN --episodes {episodes}: the run's learning rate warms up, then "
                           f"decays to 0 at episode 8 ")


def test_results_an_earlier_version_left_in_an_unfinished_run_are_not_written_over(unfinished, tmp_path,
                                                                                   monkeypatch):
    run = tmp_path / "earlier"
    shutil.copytree(unfinished, run)
    (run / "results.json").write_text("{}\n")  # as a run tested at 4 episodes, then given 8 by an earlier --resume

    line = refused(run, tmp_path / "copy", monkeypatch)

    assert line == ("error: RUN holds test results (results.json) that its final test would write over; resume it "
                    "with --no-evaluate, then test it with python evaluate.py RUN")


def test_a_run_killed_in_its_final_test_is_resumed_to_that_test_alone(finished, tmp_path, monkeypatch):
    monkeypatch.setenv("SMAT_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for name in ("results.json", "results.md", "results.csv"):
        (run / name).unlink()
    checkpoint = (run / "checkpoint.pt").read_bytes()

    result = CliRunner().invoke(train.app, ["--resume", str(run), "--device", "cpu"])

    assert result.exit_code == 0, result.output
    assert (run / "checkpoint.pt").read_bytes() == checkpoint  # nothing trained
    tested, original = (json.loads((r / "results.json").read_text()) for r in (run, finished))
    assert tested["domains"] == original["domains"]
