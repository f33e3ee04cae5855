"""What a person reads of a run: metrics.jsonl's units, the pictures of --plots and --curves, and the
TensorBoard and Weights & Biases loggers, checked on fabricated records and results (no training)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import monitor
import pictures
import smat
from smat import Config


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures the pictures module draws, kept for inspection instead of written as PNGs."""
    kept = []
    monkeypatch.setattr(pictures, "_save", lambda figure, path: kept.append(figure))
    yield kept
    for figure in kept:
        pictures.pyplot().close(figure)


def pmf_run(step: int = 1) -> SimpleNamespace:
    """What log_record reads of a run: its config, the model's device (through δ) and where it stands."""
    cfg = Config.pmf()
    return SimpleNamespace(cfg=cfg, model=SimpleNamespace(delta=torch.zeros(1)), step=step,
                           episodes_done=step * cfg.meta_batch, total_steps=10)


def meta_batch(**stats: float) -> smat.MetaBatch:
    return smat.MetaBatch({k: torch.tensor(v) for k, v in stats.items()}, torch.zeros(1), torch.zeros(1),
                          torch.ones(2, 1))


# --- units: every accuracy a person reads is in percent -------------------------------------------------


def test_training_accuracies_are_logged_in_percent_as_validation_and_test_are():
    batch = meta_batch(loss=1.25, ce=1.0, accuracy=0.75, teacher_accuracy=0.8, teacher_lead=0.05,
                       pretrained_accuracy=0.5)

    record = monitor.log_record(pmf_run(), batch, rate=2.0, lr=1.0)

    assert record["accuracy"] == 75.0 and record["teacher_accuracy"] == 80.0
    assert record["teacher_lead"] == pytest.approx(5.0) and record["pretrained_accuracy"] == 50.0
    assert record["loss"] == 1.25 and record["ce"] == 1.0  # not accuracies: as smat.py computed them
    assert "acc 75.0% teacher 80.0%" in monitor.short_stats(record)


def old_and_new_sessions() -> list[dict]:
    """A run started before accuracies were logged in percent (no start record at all, as the oldest
    files) and resumed by format 2: its second session's start record carries the marker."""
    return [{"step": 1, "episode": 4, "loss": 1.0, "accuracy": 0.5, "teacher_lead": 0.02},
            {"episode": 4, "val_accuracy": 60.0},
            {"episode": 4, "start": {"device": "cpu"}, "metrics_format": monitor.METRICS_FORMAT},
            {"step": 2, "episode": 8, "loss": 0.9, "accuracy": 62.5, "teacher_lead": 1.5}]


def test_old_fraction_records_read_back_in_percent_session_by_session():
    records = monitor.in_percent(old_and_new_sessions())

    assert [r.get("accuracy") for r in records] == [50.0, None, None, 62.5]
    assert records[0]["teacher_lead"] == pytest.approx(2.0) and records[3]["teacher_lead"] == 1.5
    assert records[1]["val_accuracy"] == 60.0  # always percent: never scaled
    old_start = [{"episode": 0, "start": {"device": "cpu"}}, {"step": 1, "episode": 4, "accuracy": 0.25}]
    assert monitor.in_percent(old_start)[1]["accuracy"] == 25.0


def test_curves_of_an_old_run_draw_its_accuracy_in_percent(tmp_path, figures):
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, old_and_new_sessions())) + "\n")

    pictures.plot_curves(pictures.read_metrics(tmp_path), tmp_path / "curves.png")

    (accuracy,) = [a for a in figures[0].axes if a.get_title().startswith("query accuracy")]
    values = [y for line in accuracy.get_lines() for y in line.get_ydata()]
    assert min(values) == 50.0 and max(values) == 62.5
