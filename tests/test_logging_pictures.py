"""What a person reads of a run: metrics.jsonl's units, the pictures of --plots and --curves, and the
TensorBoard and Weights & Biases loggers, checked on fabricated records and results (no training)."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

import monitor
import pictures
import smat
import train
from assets import make_assets
from smat import Config
from test_train import data_flag, small_config


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


# --- pictures: each says what it shows, on a scale that does not exaggerate ------------------------------


def fabricated_results(method: str = "smat", experts: int = 3) -> dict:
    """A results dict as evaluate.evaluate_model writes one: two domains, and for SMAT the experts' masks
    (kept fraction per tensor, pooled overlap, parameter counts, hard sparsity)."""
    weights = [[round((m + 1 + d) / sum(range(1 + d, experts + 1 + d)), 4) for m in range(experts)] for d in (0, 1)]
    results = {"method": method, "domains": {
        "glyphs": {"split": "id", "mean": 70.0, "ci95": 1.0, "router_weights": weights[0],
                   "accuracies": [68.0, 70.0, 72.0]},
        "rosettes": {"split": "ood", "mean": 60.0, "ci95": 1.2, "router_weights": weights[1],
                     "accuracies": [58.0, 60.0, 62.0]}}}
    if method == "smat":
        kept = {"blocks.0.attn.qkv.weight": [0.12, 0.2, 0.33][:experts], "blocks.0.mlp.fc1.weight": [0.1, 0.15, 0.3][:experts]}
        overlap = [[1.0 if a == b else 0.25 for b in range(experts)] for a in range(experts)]
        results["experts"] = {"kept_fraction": kept, "overlap": overlap,
                              "parameters": {"blocks.0.attn.qkv.weight": 300, "blocks.0.mlp.fc1.weight": 100}}
        results["sparsity"] = {"per_expert": [0.9, 0.8, 0.7][:experts]}
    return results


def colour_bar_labels(figure) -> list[str]:
    return [a.get_ylabel() for a in figure.axes if a.get_label() == "<colorbar>"]


@pytest.mark.parametrize("method, experts", [("pmf", 1), ("smat", 1)])
def test_a_model_without_a_router_gets_no_router_heat_map_but_one_line_saying_why(method, experts, figures,
                                                                               tmp_path, capsys):
    pictures.plot_router_weights(fabricated_results(method, experts), tmp_path / "router_weights.png")

    assert figures == [] and not (tmp_path / "router_weights.png").exists()
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "no router_weights.png" in said[0] and ("pmf has no router" in said[0]) == (method == "pmf")


def test_the_router_heat_map_labels_its_colour_bar_with_the_uniform_weight(figures, tmp_path):
    pictures.plot_router_weights(fabricated_results(), tmp_path / "router_weights.png")

    (figure,) = figures
    assert colour_bar_labels(figure) == ["mean merging weight w (uniform: 1/3 = 0.333)"]


def test_chance_overlap_is_what_independent_masks_with_those_keep_rates_share():
    generator = torch.Generator().manual_seed(0)
    keep = torch.tensor([0.1, 0.3], dtype=torch.float64)
    masks = torch.rand(2, 200_000, generator=generator, dtype=torch.float64) < keep[:, None]
    jaccard = (masks[0] & masks[1]).sum() / (masks[0] | masks[1]).sum()

    chance = pictures.chance_overlap(keep)

    assert chance[0, 1].item() == pytest.approx(0.03 / 0.37) and chance[1, 0] == chance[0, 1]
    assert jaccard.item() == pytest.approx(chance[0, 1].item(), abs=0.003)


def test_mask_overlap_is_coloured_against_chance_on_the_whole_possible_range(figures, tmp_path):
    results = fabricated_results()

    pictures.plot_mask_overlap(results, tmp_path / "mask_overlap.png")

    (figure,) = figures
    axes = figure.axes[0]
    (image,) = axes.get_images()
    chance = pictures.chance_overlap(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    assert image.get_clim() == (-1, 1)
    assert image.get_array()[0, 1] == pytest.approx(0.25 - chance[0, 1].item())
    assert colour_bar_labels(figure) == ["overlap − chance"]
    assert f"{chance[0, 1].item():.3f}-{chance[1, 2].item():.3f}" in axes.get_title()
    assert sorted(t.get_text() for t in axes.texts) == ["0.25"] * 6  # the overlap itself, diagonal blank


def test_kept_fraction_uses_a_colour_scale_fitted_to_its_values_and_says_so(figures, tmp_path):
    pictures.plot_kept_fraction(fabricated_results(), tmp_path / "kept_fraction.png")

    (figure,) = figures
    images = [image for axes in figure.axes for image in axes.get_images()]
    assert len(images) == 3 and all(image.get_clim() == (0.1, 0.35) for image in images)
    assert colour_bar_labels(figure) == ["kept fraction (z > 0); scale 0.1-0.35, fitted to the data"]


def test_sweep_labels_sit_in_the_margin_beside_the_points_not_on_them(figures, tmp_path):
    sweep = {0.5: fabricated_results(), 0.9: fabricated_results()}

    pictures.plot_sparsity_sweep(sweep, tmp_path / "sweep.png", references={"Pre": fabricated_results()})

    (figure,) = figures
    figure.canvas.draw()
    axes = figure.axes[0]
    labels = [text for text in axes.texts if text.get_text().startswith("Pre")]
    assert len(labels) == 2
    assert all(label.get_window_extent().x0 > axes.get_window_extent().x1 for label in labels)


def training_records(smat_run: bool, lines: int = 20) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    records = [{"episode": 0, "start": {"device": "cpu"}, "metrics_format": monitor.METRICS_FORMAT}]
    for k in range(1, lines + 1):
        noise = torch.rand(2, generator=generator).tolist()
        record = {"step": k, "episode": 4 * k, "loss": 1.5 - k / 40 + noise[0], "ce": 1.4 - k / 40,
                  "accuracy": 50 + k + 20 * noise[1], "pretrained_accuracy": 50.0}
        if smat_run:
            record |= {"sparsity": [min(0.9, 0.05 * k)] * 2, "multiplier_mean": 0.01 * k, "router_entropy": 0.69}
        records.append(record)
    return records + [{"episode": 4 * lines, "val_accuracy": 61.0}]


@pytest.mark.parametrize("smat_run, titles", [
    (False, ["loss (nats)", "query accuracy %", "validation accuracy %"]),
    (True, ["loss (nats)", "query accuracy %", "sparsity per expert", "mean λ (multiplier_mean)",
            "router entropy (nats)", "validation accuracy %"])])
def test_training_curves_draw_only_the_panels_the_run_logged(smat_run, titles, figures, tmp_path):
    pictures.plot_curves(training_records(smat_run), tmp_path / "curves.png", target=0.9)

    (figure,) = figures
    assert [a.get_title().split("\n")[0] for a in figure.axes] == titles
    assert not any("not logged" in t.get_text() for a in figure.axes for t in a.texts)


def test_noisy_training_curves_are_a_moving_average_over_the_faint_raw_values(figures, tmp_path):
    records = training_records(smat_run=False)

    pictures.plot_curves(records, tmp_path / "curves.png")

    accuracy = next(a for a in figures[0].axes if a.get_title().startswith("query accuracy %"))
    raw, smooth = [line for line in accuracy.get_lines() if line.get_color() == "tab:blue"]
    values = [r["accuracy"] for r in records if "accuracy" in r]
    assert list(raw.get_ydata()) == values and raw.get_alpha() < 0.5
    assert list(smooth.get_ydata()) == pytest.approx([sum(values[:5]) / 5, sum(values[:6]) / 6]
                                                     + pictures.moving_average(values)[2:])
    assert smooth.get_ydata()[10] == pytest.approx(sum(values[6:15]) / 9)
    assert f"moving average of {pictures.WINDOW} log lines" in accuracy.get_title()


def test_missing_matplotlib_names_the_install_from_the_repository_root(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)

    with pytest.raises(pictures.EvaluateError, match=r"pip install -e '\.\[plots\]' from the repository root"):
        pictures.pyplot()


# --- TensorBoard and Weights & Biases --------------------------------------------------------------------


def test_the_final_test_is_one_scalar_per_domain_and_average_under_test():
    results = {"domains": {"alpha": {"mean": 71.5}, "beta": {"mean": 60.25}}, "id_avg": 71.5, "ood_avg": 60.25,
               "near_ood_avg": None}

    assert monitor.test_scalars(results) == {"test/alpha": 71.5, "test/beta": 60.25, "test/id_avg": 71.5,
                                             "test/ood_avg": 60.25}


def test_hparams_are_every_config_field_as_a_scalar():
    cfg = Config(n_experts=2)

    values = monitor.hparams(cfg)

    assert values.keys() == cfg.to_dict().keys() and values["n_experts"] == 2
    assert all(isinstance(v, (bool, int, float, str)) for v in values.values())


class FakeWandb:
    """What train.py asks of the wandb package, recorded: init's arguments, each log and the finish."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.summary: dict = {}

    def init(self, **kwargs) -> "FakeWandb":
        self.calls.append(("init", kwargs))
        return self

    def log(self, data: dict, step: int) -> None:
        self.calls.append(("log", data, step))

    def finish(self, exit_code: int = 0) -> None:
        self.calls.append(("finish", exit_code))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


def test_wandb_gets_the_config_the_same_grouped_records_as_tensorboard_and_the_test(assets, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = small_config(assets)

    run = train.meta_train(cfg, tmp_path / "run", device="cpu", cache_dir=tmp_path / "cache", wandb="smat-tests")

    (init, *logs, finish) = fake.calls
    assert init[0] == "init" and init[1]["project"] == "smat-tests" and init[1]["config"] == monitor.hparams(cfg)
    assert init[1]["dir"] == str(run) and init[1]["name"] == "run" and finish == ("finish", 0)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [(monitor.tensorboard_scalars(r), r["episode"]) for r in records if monitor.tensorboard_scalars(r)]
    results = json.loads((run / "results.json").read_text())
    assert [(data, step) for _, data, step in logs] == expected + [(monitor.test_scalars(results), cfg.episodes)]
    assert fake.summary == monitor.test_scalars(results) and "test/alpha" in fake.summary


def test_wandb_without_its_package_is_one_line_and_nothing_is_written(assets, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the extra were not installed

    result = CliRunner().invoke(train.app, ["--data", data_flag(assets), "--backbone", str(assets / "vit.pt"),
                                            "--episodes", "4", "--wandb", "smat", "--out", str(tmp_path / "never")])

    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install -e '.[wandb]'" in lines[0]
    assert not (tmp_path / "never").exists()


def test_wandb_with_an_empty_project_name_is_one_line_not_a_run_without_wandb(assets, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())

    result = CliRunner().invoke(train.app, ["--data", data_flag(assets), "--backbone", str(assets / "vit.pt"),
                                            "--episodes", "4", "--wandb", " ", "--out", str(tmp_path / "never")])

    assert result.exit_code == 2 and "--wandb needs a Weights & Biases project name" in result.output, result.output
    assert not (tmp_path / "never").exists()


def board_scalars(run: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    return {(tag, e.step): e.value for tag in board.Tags()["scalars"] for e in board.Scalars(tag)}


@pytest.mark.parametrize("first_session", ["fresh", "resumed"])
def test_tensorboard_gets_the_final_test_and_the_config_as_hparams(assets, tmp_path, first_session):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    cfg, resume = small_config(assets), first_session == "resumed"
    if resume:  # a run that first asks for TensorBoard when it is resumed gets its hparams then
        train.meta_train(cfg, tmp_path / "run", device="cpu", cache_dir=tmp_path / "cache", stop_after=4)
    run = train.meta_train(cfg, tmp_path / "run", device="cpu", cache_dir=tmp_path / "cache", tensorboard=True,
                           resume=resume)

    results = json.loads((run / "results.json").read_text())
    written = board_scalars(run)
    assert all(written[(tag, 8)] == pytest.approx(value) for tag, value in monitor.test_scalars(results).items())
    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    content = board.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["n_experts"].number_value == 2 and start.hparams["method"].string_value == "smat"


@pytest.mark.parametrize("checkpoint", [True, False])
def test_a_resumed_run_drops_the_tensorboard_events_a_killed_session_wrote_after_its_checkpoint(assets, tmp_path,
                                                                                              checkpoint):
    cfg = small_config(assets)
    run = train.meta_train(cfg, tmp_path / "run", device="cpu", cache_dir=tmp_path / "cache", evaluate_at_end=False,
                           stop_after=4, tensorboard=True)
    if not checkpoint:  # as a run killed before its first checkpoint: the resume starts again from episode 0
        for name in ("checkpoint.pt", "best.pt"):
            (run / name).unlink()
    killed = monitor.summary_writer()(str(run / "tensorboard"))  # what a session killed after episode 4 left
    for episode in (6, 7):
        killed.add_scalar("train/loss", 999.0, global_step=episode)
    killed.close()

    train.meta_train(cfg, run, device="cpu", cache_dir=tmp_path / "cache", evaluate_at_end=False, resume=True,
                     tensorboard=True)

    losses = {step: value for (tag, step), value in board_scalars(run).items() if tag == "train/loss"}
    assert sorted(losses) == [2, 4, 6, 8] and 999.0 not in losses.values()


def test_wandb_offline_writes_its_run_into_the_run_directory(assets, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")

    run = train.meta_train(small_config(assets, episodes=4), tmp_path / "run", device="cpu",
                           cache_dir=tmp_path / "cache", wandb="smat-tests")

    (offline,) = (run / "wandb").glob("offline-run-*")
    assert (run / "results.json").is_file() and list(offline.glob("*.wandb"))


def test_wandb_that_cannot_start_a_run_is_one_line_naming_the_way_out(assets, tmp_path, monkeypatch):
    fake = FakeWandb()
    fake.init = lambda **kwargs: (_ for _ in ()).throw(RuntimeError("api_key not configured (no-tty)"))
    monkeypatch.setitem(sys.modules, "wandb", fake)

    result = CliRunner().invoke(train.app, ["--data", data_flag(assets), "--backbone", str(assets / "vit.pt"),
                                            "--episodes", "4", "--wandb", "smat", "--out", str(tmp_path / "run")])

    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert "api_key not configured" in lines[-1] and "WANDB_MODE=offline" in lines[-1]
