"""--resume continues a run exactly: metrics.jsonl cut back to the checkpoint a killed run resumes
from, so each episode is logged once, in order, as in an uninterrupted run.

The data are tests/assets.py's two small image-folder domains and random ViT, as in tests/test_train.py.
"""

import json
from pathlib import Path

import pytest
import torch

import rundir
import runstate
import train
from assets import make_assets
from smat import Config

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
