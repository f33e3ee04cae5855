"""evaluate.py: the CI formula, the shared episodes, the results files, fine-tuning, LoRA, the lr
search on validation classes, expert statistics, pictures and the command line, on a tiny ViT and two
small in-memory domains the tests draw themselves."""

import dataclasses
import io
import json
import math
import re
import statistics
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

import backbone as backbones
import benchmark
import data
import evaluate
import finetuning
import monitor
import pictures
import readers
import resultfiles
import rundir
import smat
import tables
from smat import SMAT, Config

SPEC = backbones.ViTSpec(patch_size=8, dim=16, depth=2, heads=2, mlp_ratio=2.0, grid_size=2)
PROTOCOL = dict(image_size=16, test_ways=3, test_shots=2, test_queries=3)


def make_cfg(**overrides) -> Config:
    return Config(**{"n_experts": 2, **PROTOCOL, **overrides})


def make_model(cfg: Config | None = None, seed: int = 0) -> SMAT:
    """A tiny ViT with a non-zero δ, so the meta-tuned model differs from θ_pre."""
    torch.manual_seed(seed)
    model = SMAT(backbones.VisionTransformer(SPEC), cfg or make_cfg())
    with torch.no_grad():
        model.delta.normal_(0, 0.05)
    return model


def make_sources() -> list[data.Source]:
    """Two domains (one ID, one OOD) of 20 classes × 8 images: a template per class plus noise.
    20 classes split 13 / 3 / 4 into train / val / test, enough for 3-way episodes."""
    g = torch.Generator().manual_seed(0)

    def images() -> torch.Tensor:
        templates = torch.randint(0, 256, (20, 1, 3, 16, 16), generator=g)
        noise = torch.randint(-60, 61, (20, 8, 3, 16, 16), generator=g)
        return (templates + noise).clamp(0, 255).to(torch.uint8)

    return [benchmark.EmbeddedSource("glyphs", images(), "id"), benchmark.EmbeddedSource("rosettes", images(), "ood")]


def episode(seed: int = 0) -> data.Episode:
    protocol = data.protocol(make_cfg(), "test")
    return next(data.evaluation_episodes(make_sources()[0], "test", protocol, 1, seed, 16))


def run(model=None, sources=None, pre: bool = False, **kwargs) -> evaluate.Results:
    """The model's results (with `pre`, its Pre baseline's) on a few episodes of the small sources."""
    model = model or make_model()
    kwargs = {"episodes": 4, "seed": 0, **kwargs}
    return evaluate.evaluate_model(evaluate.Tested(model, pre), sources or make_sources(), model.cfg, **kwargs)


# --- mean and 95% confidence interval ---------------------------------------------------------------


def test_confidence_interval_matches_a_hand_computation():
    # accuracies 60, 80, 100, 80 %: mean 80, unbiased variance (400 + 0 + 400 + 0) / 3, CI = t(0.975, 3)·std/√4
    mean, ci95 = tables.confidence_interval(torch.tensor([60.0, 80.0, 100.0, 80.0]))

    assert mean == pytest.approx(80.0)
    assert ci95 == pytest.approx(3.1824 * (800 / 3) ** 0.5 / 2)


@pytest.mark.parametrize("df, quantile", [(1, 12.706), (2, 4.303), (3, 3.182), (9, 2.262), (10, 2.228), (29, 2.045),
                                          (30, 2.042), (60, 2.000), (120, 1.980), (599, 1.964)])
def test_the_t_quantile_matches_the_published_table_to_three_decimals(df, quantile):
    assert round(tables.t_975(df), 3) == quantile


def test_the_t_quantile_at_600_episodes_is_1_964_and_tends_to_the_normal():
    assert tables.t_975(599) == pytest.approx(1.96393, abs=1e-5)  # 600 episodes: 0.2% wider than 1.96
    assert tables.t_975(10**7) == pytest.approx(1.959964, abs=1e-6)
    assert all(tables.t_975(df) > tables.t_975(df + 1) for df in range(1, 200))  # falls with df, no jump at 10


def test_three_values_get_the_t_interval_not_the_normal_one():
    # sd 10 over n = 3: 4.303·10/√3 = 24.84, where 1.96 gave 11.32
    mean, ci95 = tables.confidence_interval(torch.tensor([40.0, 50.0, 60.0]))

    assert (mean, round(ci95, 2)) == (50.0, 24.84)
    assert tables.t_interval([40.0, 50.0, 60.0]) == (mean, ci95) and tables.t_interval([1.0]) is None


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=2, max_size=40))
def test_confidence_interval_is_the_unbiased_formula(correct):
    accuracies = [100 * c / 15 for c in correct]

    mean, ci95 = tables.confidence_interval(torch.tensor(accuracies))

    assert mean == pytest.approx(statistics.fmean(accuracies), abs=1e-4)
    t = tables.t_975(len(accuracies) - 1)
    assert ci95 == pytest.approx(t * statistics.stdev(accuracies) / len(accuracies) ** 0.5, abs=1e-4)


# --- the same episodes for every method ---------------------------------------------------------------


def test_the_same_seed_gives_every_method_the_same_episodes_and_numbers(monkeypatch):
    seen = []
    predict = smat.predict

    def recording_predict(model, xs, ys, xq, n_way, pretrained=False, gates=None):
        seen.append((pretrained, xs.sum().item(), xq.sum().item(), ys.tolist()))
        return predict(model, xs, ys, xq, n_way, pretrained, gates)

    monkeypatch.setattr(smat, "predict", recording_predict)
    model = make_model()

    first = run(model)
    again = run(model)
    pre = run(model, pre=True)
    run(model, seed=1)

    episodes = [s[1:] for s in seen]
    n = len(episodes) // 4
    assert episodes[:n] == episodes[n:2 * n] == episodes[2 * n:3 * n] != episodes[3 * n:]
    assert [s[0] for s in seen[2 * n:3 * n]] == [True] * n  # Pre ran on those episodes
    assert first["domains"] == again["domains"]
    assert first["domains"] != pre["domains"]  # a real difference between the two methods
    assert pre["method"] == "pre" and first["method"] == "smat"


# --- results.json / results.md ------------------------------------------------------------------------


def test_results_json_matches_the_design_schema(tmp_path):
    results = run(episodes=3)
    pre = run(episodes=3, pre=True)

    resultfiles.write_results(tmp_path, results, {"Pre": pre})

    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["domains"]) == {"glyphs", "rosettes"}
    for name, split in (("glyphs", "id"), ("rosettes", "ood")):
        domain = saved["domains"][name]
        assert domain["split"] == split and domain["episodes"] == 3
        assert 0 <= domain["mean"] <= 100 and domain["ci95"] >= 0
        assert len(domain["router_weights"]) == 2
        assert sum(domain["router_weights"]) == pytest.approx(1, abs=1e-5)
    assert saved["id_avg"] == pytest.approx(saved["domains"]["glyphs"]["mean"])
    assert saved["ood_avg"] == pytest.approx(saved["domains"]["rosettes"]["mean"])
    assert (saved["method"], saved["finetune"]) == ("smat", "none")
    assert saved["baselines"]["Pre"]["method"] == "pre"
    table = (tmp_path / "results.md").read_text()
    assert "| glyphs | id |" in table and "| OOD avg |" in table and "Pre" in table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json", "results.md"]  # no temporaries


def test_pmf_runs_report_a_single_dense_expert_and_no_mask_statistics():
    results = run(make_model(Config.pmf(**PROTOCOL)), episodes=2)

    assert results["method"] == "pmf" and "experts" not in results
    assert results["domains"]["glyphs"]["router_weights"] == [1.0]


def test_too_few_episodes_an_unknown_finetune_mode_or_a_negative_lr_is_one_clear_error():
    with pytest.raises(evaluate.EvaluateError, match="episodes = 1"):
        run(episodes=1)
    with pytest.raises(evaluate.EvaluateError, match="none, full or lora"):
        run(finetune="partial")
    with pytest.raises(evaluate.EvaluateError, match="learning rate >= 0"):
        run(finetune="full", finetune_lr=-1e-3)


# --- fine-tuning -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_finetuning_with_lr_zero_equals_zero_shot(mode):
    model, e = make_model(), episode()
    zero_shot = smat.predict(model, e.support_images, e.support_labels, e.query_images, e.n_way)

    logits, weights = finetuning.finetune_logits(model, e.support_images, e.support_labels, e.query_images,
                                               e.n_way, mode, lr=0.0, steps=3)

    torch.testing.assert_close(logits, zero_shot.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(weights, zero_shot.weights)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_finetuning_with_a_positive_lr_lowers_the_support_loss_and_changes_predictions(mode):
    model, e = make_model(), episode()
    zero_shot = smat.predict(model, e.support_images, e.support_labels, e.support_images, e.n_way).logits

    tuned, _ = finetuning.finetune_logits(model, e.support_images, e.support_labels, e.support_images, e.n_way,
                                        mode, lr=1e-2, steps=5)

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits, e.support_labels).item()

    assert loss(tuned) < loss(zero_shot)


def test_lora_with_zero_initialised_b_leaves_theta_unchanged_and_touches_only_query_and_value():
    model = make_model()
    params = model.layout.unflatten(model.theta_pre)
    lora = finetuning.FlatLoRA(model.layout, torch.Generator().manual_seed(0))

    before = lora(params)
    with torch.no_grad():
        lora.b.normal_()
    after = lora(params)

    assert lora.targets == ["blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight"]
    assert all(torch.equal(before[name], params[name]) for name in params)
    for name in params:
        changed = after[name] != params[name]
        changed = changed.any(dim=-1) if changed.dim() == 2 else changed  # per row of a matrix
        if name in lora.targets:  # rows 0..15 query, 16..31 key, 32..47 value
            assert changed[:16].all() and not changed[16:32].any() and changed[32:].all()
        else:
            assert not changed.any()


def test_augmentation_keeps_shapes_and_is_reproducible_from_its_generator():
    images = episode().support_images

    a = finetuning.augment(images, torch.Generator().manual_seed(3))
    b = finetuning.augment(images, torch.Generator().manual_seed(3))

    assert a.shape == images.shape and torch.equal(a, b) and not torch.equal(a, images)


def test_the_lr_search_reads_validation_episodes_only(monkeypatch):
    requested = []
    episodes = data.evaluation_episodes

    def recording_episodes(source, partition, *args):
        requested.append(partition)
        return episodes(source, partition, *args)

    monkeypatch.setattr(data, "evaluation_episodes", recording_episodes)
    model = make_model()

    lrs, search = evaluate.select_finetune_lr(evaluate.Tested(model), make_sources(), model.cfg, "full", seed=0,
                                              device="cpu", steps=2, episodes=2)
    assert requested == ["val", "val"]
    assert set(lrs) == {"glyphs", "rosettes"} and all(lr in evaluate.LR_CANDIDATES for lr in lrs.values())
    assert search["partition"] == "val" and len(search["accuracy"]["glyphs"]) == len(evaluate.LR_CANDIDATES)

    requested.clear()
    results = run(model, episodes=2, finetune="full", finetune_steps=2)
    assert requested == ["val", "val", "test", "test"]  # the search ends before any test episode
    assert results["domains"]["glyphs"]["finetune_lr"] == results["finetune_lr_search"]["chosen"]["glyphs"]


def test_an_evaluation_announces_each_stage_and_ticks_once_per_episode():
    announced, ticks = [], []

    def progress(stage: str, total: int):
        announced.append((stage, total))
        return lambda: ticks.append(stage)

    run(episodes=2, finetune="full", finetune_steps=1, progress=progress)

    search = len(evaluate.LR_CANDIDATES) * evaluate.LR_SEARCH_EPISODES
    assert announced == [("lr search glyphs", search), ("lr search rosettes", search),
                         ("test glyphs", 2), ("test rosettes", 2)]
    assert [ticks.count(stage) for stage, _ in announced] == [total for _, total in announced]


def test_stages_draw_one_line_for_the_stage_under_way_in_a_terminal_and_no_bar_elsewhere():
    def draw(terminal: bool) -> str:
        console = Console(file=io.StringIO(), force_terminal=terminal, width=100)
        with monitor.episode_bar(console) as bar, monitor.Stages(bar, "smat: ", log=console) as stages:
            for stage in ("lr search glyphs", "test glyphs"):
                tick = stages(stage, 3)
                tick()
                assert [task.description for task in bar.tasks] == [f"smat: {stage}"]  # the last one replaced
                assert bar.tasks[0].completed == 1 and bar.tasks[0].total == 3
            bar.refresh()
        assert not bar.tasks  # the last line goes with the stages
        return console.file.getvalue()

    shown = draw(terminal=True)
    assert "smat: test glyphs" in shown and "episodes in" not in shown  # the bar, no plain lines
    assert "━" not in draw(terminal=False)  # a log file gets plain lines, not frames of a bar


def test_without_a_bar_each_finished_stage_is_one_plain_line_and_a_failed_one_none():
    log = Console(file=io.StringIO(), force_terminal=False, width=40)
    with monitor.episode_bar(log) as bar:
        with monitor.Stages(bar, "pmf: ", log=log) as stages:
            for _ in range(3):
                stages("lr search a very long domain name", 2)()
        with pytest.raises(RuntimeError), monitor.Stages(bar, "pmf: ", log=log) as stages:
            stages("test b", 4)()
            raise RuntimeError("an episode failed")

    lines = log.file.getvalue().splitlines()
    assert len(lines) == 3 and all(line.startswith("pmf: lr search a very long domain name: 1 episodes in ")
                                   for line in lines)  # whole lines, never wrapped at 40 columns


def test_ties_in_the_lr_search_go_to_lr_zero():
    model = make_model()
    # With 0 steps every candidate predicts exactly as zero-shot, so every accuracy ties.
    lrs, search = evaluate.select_finetune_lr(evaluate.Tested(model), make_sources(), model.cfg, "lora", seed=0,
                                              device="cpu", steps=0, episodes=2)

    assert lrs == {"glyphs": 0.0, "rosettes": 0.0}
    assert len(set(search["accuracy"]["glyphs"])) == 1


def test_a_domain_without_validation_classes_takes_the_pooled_lr(monkeypatch):
    sources = make_sources()
    monkeypatch.setattr(sources[1], "class_sizes", lambda partition: [] if partition == "val" else [8] * 4)
    model = make_model()

    lrs, search = evaluate.select_finetune_lr(evaluate.Tested(model), sources, model.cfg, "full", seed=0, device="cpu",
                                              steps=2, episodes=2)

    assert list(search["accuracy"]) == ["glyphs"] and lrs["rosettes"] == search["pooled_lr"]


# --- paired differences, averages over runs, the tested model's sparsity ----------------------------------


def fake_results(accuracies: dict[str, list[float]], splits: dict[str, str], seed: int = 0) -> dict:
    """A results dict of per-episode accuracies given as fractions (stored in percent, as evaluate does)."""
    domains = {d: {"split": splits[d], "mean": 100 * sum(a) / len(a), "ci95": 0.0, "episodes": len(a),
                   "accuracies": [100 * x for x in a]} for d, a in accuracies.items()}
    return {"results_format": tables.RESULTS_FORMAT, "domains": domains, "id_avg": None, "ood_avg": None, "method": "x", "finetune": "none",
            "partition": "test", "seed": seed, "protocol": {"kind": "fixed"}}


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 12), st.integers(0, 1000))
def test_the_paired_difference_matches_a_slow_loop_over_episodes(n, seed):
    g = torch.Generator().manual_seed(seed)
    splits = {"a": "id", "b": "id", "c": "ood"}
    draw = lambda: {d: (torch.randint(0, 16, (n,), generator=g) / 15).tolist() for d in splits}  # noqa: E731
    first, second = fake_results(draw(), splits), fake_results(draw(), splits)

    paired = tables.paired_difference(first, second)

    def slow(diffs):  # mean and t(0.975, n-1)·s/√n, written out
        mean = sum(diffs) / len(diffs)
        std = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1))
        return mean, tables.t_975(len(diffs) - 1) * std / math.sqrt(len(diffs))

    for d in splits:
        mean, ci = slow([x - y for x, y in zip(first["domains"][d]["accuracies"], second["domains"][d]["accuracies"])])
        assert paired["domains"][d]["mean"] == pytest.approx(mean, abs=1e-9)
        assert paired["domains"][d]["ci95"] == pytest.approx(ci, abs=1e-9)
    per_episode = [(first["domains"]["a"]["accuracies"][i] - second["domains"]["a"]["accuracies"][i]
                    + first["domains"]["b"]["accuracies"][i] - second["domains"]["b"]["accuracies"][i]) / 2
                   for i in range(n)]
    mean, ci = slow(per_episode)
    assert paired["id_avg"]["mean"] == pytest.approx(mean, abs=1e-9)
    assert paired["id_avg"]["ci95"] == pytest.approx(ci, abs=1e-9)


def test_near_and_far_ood_get_their_own_paired_averages_and_table_rows():
    splits = {"a": "id", "n1": "ood", "n2": "ood", "f": "ood"}
    first = fake_results({"a": [1.0, 0.5], "n1": [1.0, 0.0], "n2": [0.5, 0.5], "f": [0.0, 0.5]}, splits)
    second = fake_results({"a": [0.5, 0.5], "n1": [0.5, 0.0], "n2": [0.5, 0.0], "f": [0.5, 0.5]}, splits)
    for results in (first, second):
        for name, distance in (("n1", "near"), ("n2", "near"), ("f", "far")):
            results["domains"][name]["distance"] = distance
        results |= tables.averages(results["domains"])

    paired = tables.paired_difference(first, second)

    # near: episode 1 (+50 + 0)/2 = +25, episode 2 (0 + 50)/2 = +25; far: -50 and 0
    assert paired["near_ood_avg"]["mean"] == pytest.approx(25.0) and paired["near_ood_avg"]["ci95"] == pytest.approx(0.0)
    assert paired["far_ood_avg"]["mean"] == pytest.approx(-25.0)
    assert first["near_ood_avg"] == pytest.approx(50.0) and first["far_ood_avg"] == pytest.approx(25.0)
    rows = {row[0]: row for row in tables._rows([first, second], [paired])}
    assert rows["near OOD avg"][-1] == tables.difference_cell(paired["near_ood_avg"])
    assert rows["far OOD avg"][2:4] == ["25.00", "50.00"] and rows["n1"][1] == "ood near"
    plain = fake_results({"a": [1.0, 0.5]}, {"a": "id"})  # without distances: no near/far rows
    assert [row[0] for row in tables._rows([plain])] == ["a", "ID avg", "OOD avg"]


def test_a_paired_difference_refuses_results_from_different_episodes():
    splits = {"a": "id"}
    with pytest.raises(evaluate.EvaluateError, match="same episodes"):
        tables.paired_difference(fake_results({"a": [0.5, 1.0]}, splits),
                                   fake_results({"a": [0.5, 1.0]}, splits, seed=1))
    with pytest.raises(evaluate.EvaluateError, match="same episodes"):
        tables.paired_difference(fake_results({"a": [0.5, 1.0]}, splits), fake_results({"a": [0.5]}, splits))
    here, there = ({**fake_results({"a": [0.5, 1.0]}, splits), "data": f"folder:{root}/glyphs@ood"} for root in "xy")
    with pytest.raises(evaluate.EvaluateError, match="folder:x/glyphs@ood and the other --data folder:y/glyphs@ood"):
        tables.paired_difference(here, there)  # one domain name, two folders of images
    assert tables.paired_difference(here, {**here})["domains"]["a"]["mean"] == 0  # the same --data pairs


def test_the_average_of_runs_is_the_per_episode_mean_and_keeps_each_runs_mean():
    splits = {"a": "id", "b": "ood"}
    one = fake_results({"a": [1.0, 0.0, 0.5], "b": [0.2, 0.4, 0.6]}, splits)
    two = fake_results({"a": [0.0, 0.0, 0.5], "b": [0.4, 0.4, 0.8]}, splits)

    mean = tables.average_runs([one, two])

    assert mean["domains"]["a"]["accuracies"] == [50.0, 0.0, 50.0]
    assert mean["domains"]["b"]["accuracies"] == pytest.approx([30.0, 40.0, 70.0])
    assert mean["domains"]["a"]["run_means"] == [50.0, pytest.approx(100 / 6)]
    assert mean["id_avg"] == pytest.approx(100 / 3) and mean["runs"] == 2


def test_the_split_average_ci_is_over_episode_averages_of_the_splits_domains():
    results = fake_results({"a": [1.0, 0.0], "b": [0.0, 0.0], "c": [0.5, 0.5]}, {"a": "id", "b": "id", "c": "ood"})

    (id_mean, id_ci), (ood_mean, ood_ci) = tables.split_average(results, "id"), tables.split_average(results, "ood")

    assert id_mean == pytest.approx(25.0) and id_ci == pytest.approx(12.7062 * math.sqrt(2 * 25.0**2) / math.sqrt(2))
    assert (ood_mean, ood_ci) == (pytest.approx(50.0), pytest.approx(0.0))


def test_the_sparsity_report_counts_exact_zeros_exact_binaries_and_the_merged_density():
    gates = torch.tensor([[0.0, 0.0, 1.0, 0.5], [0.0, 1.0, 0.0, 0.0]])

    report = evaluate.sparsity_report(gates, task_update_density=0.75, target=0.5)

    assert report["per_expert"] == [0.5, 0.75]
    assert report["binary_fraction"] == 7 / 8
    assert report["task_update_density"] == 0.75 and report["target"] == 0.5


def test_the_task_update_density_is_the_share_of_parameters_the_merged_mask_touches():
    model = make_model()
    with torch.no_grad():  # expert 0 keeps the first half of θ, expert 1 nothing: every task, half of θ
        half = model.layout.n_params // 2
        model.log_alpha.fill_(-10.0)
        model.log_alpha[0, :half] = 10.0

    results = run(model)

    assert results["sparsity"]["task_update_density"] == pytest.approx(half / model.layout.n_params)
    assert results["sparsity"]["per_expert"] == [pytest.approx(1 - half / model.layout.n_params), 1.0]
    assert results["sparsity"]["binary_fraction"] == 1.0
    assert all(len(d["accuracies"]) == 4 for d in results["domains"].values())


def test_kept_fraction_and_mask_overlap_match_hand_built_masks():
    model = make_model()
    n = model.layout.n_params
    keep = torch.zeros(2, n, dtype=torch.bool)
    keep[0, : n // 2] = True  # expert 0: first half
    keep[1, n // 4: n // 2 + n // 4] = True  # expert 1: the middle half -> overlap n/4 of union 3n/4
    with torch.no_grad():
        model.log_alpha.copy_(torch.where(keep, 4.6, -4.6))

    kept = evaluate.kept_fraction(model)
    overlap = evaluate.mask_overlap(model)

    assert kept["cls_token"] == [1.0, 0.0]  # the first tensor lies in expert 0's half only
    sizes = dict(zip(model.layout.names, model.layout.numels))
    total = [sum(kept[name][m] * sizes[name] for name in kept) for m in range(2)]
    assert total == pytest.approx([n // 2, n // 2], abs=1)
    torch.testing.assert_close(overlap, torch.tensor([[1.0, 1 / 3], [1 / 3, 1.0]]), atol=1e-4, rtol=0)


def test_every_picture_is_written_as_a_png(tmp_path):
    results = run(episodes=2)

    pictures.plot_router_weights(results, tmp_path / "router.png")
    pictures.plot_kept_fraction(results, tmp_path / "kept.png")
    pictures.plot_mask_overlap(results, tmp_path / "overlap.png")
    pictures.plot_sparsity_sweep({0.9: results, 0.5: run(episodes=2, seed=1)}, tmp_path / "sweep.png")

    for name in ("router", "kept", "overlap", "sweep"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(tmp_path.iterdir())) == 4


def test_missing_matplotlib_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError

    with pytest.raises(evaluate.EvaluateError, match="pip install"):
        pictures.pyplot()


# --- the command line -------------------------------------------------------------------------------------


def save_run(run_dir, cfg: Config, model: SMAT) -> None:
    """A run directory as train.py writes it (config.json + a checkpoint in its format)."""
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    rundir.atomic_save({"format": rundir.CHECKPOINT_FORMAT, "config": cfg.to_dict(),
                       "backbone_spec": dataclasses.asdict(SPEC), "model": model.state_dict()},
                      run_dir / "checkpoint.pt")


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "parse_data_spec", lambda *args, **kwargs: make_sources())
    smat_cfg, pmf_cfg = make_cfg(test_episodes=2), Config.pmf(**PROTOCOL, test_episodes=2)
    save_run(tmp_path / "smat-run", smat_cfg, make_model(smat_cfg))
    save_run(tmp_path / "pmf-run", pmf_cfg, make_model(pmf_cfg))
    return tmp_path


def test_cli_evaluates_several_runs_into_one_table_and_writes_their_results(runs):
    args = [str(runs / "smat-run"), str(runs / "pmf-run"), "--device", "cpu", "--plots",
            "--sweep-plot", str(runs / "sweep.png")]

    result = CliRunner().invoke(evaluate.app, args, env={"COLUMNS": "250"})

    assert result.exit_code == 0, result.output
    assert "Pre" in result.stdout and "smat-run" in result.stdout and "pmf-run" in result.stdout
    smat_results, pmf_results = (json.loads(next((runs / r).glob("results-*.json")).read_text())
                                 for r in ("smat-run", "pmf-run"))
    assert smat_results["method"] == "smat" and "Pre" in smat_results["baselines"]
    assert pmf_results["method"] == "pmf" and pmf_results["baselines"]["Pre"] == smat_results["baselines"]["Pre"]
    assert "smat-run − Pre" in result.stdout  # the paired difference column
    assert smat_results["domains"]["glyphs"]["episodes"] == 2  # the run's test_episodes
    assert (runs / "smat-run" / "mask_overlap.png").is_file() and (runs / "sweep.png").is_file()
    assert not (runs / "pmf-run" / "mask_overlap.png").exists()
    for stage in ("smat-run: test glyphs", "Pre: test rosettes", "pmf-run: test rosettes"):  # no terminal:
        assert f"{stage}: 2 episodes in " in result.stderr  # a plain line per finished stage on stderr


@pytest.mark.parametrize("case", ["missing", "not-a-run", "bad-checkpoint", "other-config", "bad-flag",
                                  "bad-sweep-plot"])
def test_bad_run_directories_and_flags_give_one_line_and_exit_code_2(runs, case):
    args = [str(runs / "smat-run")]
    if case == "missing":
        args = [str(runs / "nowhere")]
    elif case == "not-a-run":
        (runs / "empty").mkdir()
        args = [str(runs / "empty")]
    elif case == "bad-checkpoint":
        (runs / "smat-run" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    elif case == "other-config":  # 3 experts in the config, 2 in the saved tensors
        state = torch.load(runs / "smat-run" / "checkpoint.pt", weights_only=True)
        state["config"]["n_experts"] = 3
        torch.save(state, runs / "smat-run" / "checkpoint.pt")
    elif case == "bad-flag":
        args += ["--finetune", "partial"]
    else:
        args += ["--sweep-plot", str(runs / "no-such-dir" / "sweep.png")]
    before = sorted(p.name for p in (runs / "smat-run").iterdir())

    result = CliRunner().invoke(evaluate.app, [*args, str(runs / "pmf-run"), "--device", "cpu"])

    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.output
    assert sorted(p.name for p in (runs / "smat-run").iterdir()) == before
    assert not list((runs / "pmf-run").glob("results*"))  # nothing written for the good run either


# --- results are append-only, stamped and comparable later ---------------------------------------------


def test_each_evaluation_writes_its_own_named_file_and_never_replaces_another(runs):
    run = runs / "smat-run"
    (run / "results.json").write_text('{"written by": "train.py"}\n')
    args = [str(run), "--device", "cpu", "--no-baselines"]

    for extra in ([], ["--episodes", "3"], []):  # the third repeats the first
        assert CliRunner().invoke(evaluate.app, args + extra).exit_code == 0

    names = sorted(p.name for p in run.glob("results*"))
    shape = resultfiles.results_name(json.loads(next(run.glob("results-*.json")).read_text())).split("-")[2]
    digest = resultfiles.results_name({"data": "embedded", "finetune": "none", "seed": 0,
                                    "domains": {"d": {"episodes": 2}}}).split("-")[4]
    first = f"results-zeroshot-{shape}-embedded-{digest}-seed0-2ep"
    stems = [first, f"{first}-2", f"results-zeroshot-{shape}-embedded-{digest}-seed0-3ep"]
    assert names == sorted(["results.json"] + [f"{stem}{suffix}" for stem in stems for suffix in (".json", ".md", ".csv")])
    assert json.loads((run / "results.json").read_text()) == {"written by": "train.py"}


def test_results_files_record_code_torch_python_device_and_data(runs):
    assert CliRunner().invoke(evaluate.app, [str(runs / "smat-run"), "--device", "cpu", "--no-baselines"]).exit_code == 0

    results = json.loads(next((runs / "smat-run").glob("results-*.json")).read_text())

    stamp = results["provenance"]
    assert stamp["torch"] == torch.__version__ and stamp["device"] == "cpu" and stamp["python"].count(".") == 2
    assert stamp["git_commit"] is None or len(stamp["git_commit"]) == 40
    assert results["data"] == "embedded" and results["protocol"]["kind"] in ("fixed", "variable")


def test_a_data_string_becomes_a_short_safe_name_that_tells_strings_apart():
    name = {"finetune": "full", "seed": 3, "domains": {"d": {"episodes": 600}},
            "protocol": {"kind": "fixed", "ways": 5, "shots": 1, "queries": 15}}
    a = resultfiles.results_name(name | {"data": "folder:/very/long/path/to/My Glyphs@ood,torchvision:cifar10:/x"})
    b = resultfiles.results_name(name | {"data": "folder:/very/long/path/to/My Glyphs@ood,torchvision:cifar10:/y"})

    assert a != b and a.startswith("results-full-5w1s15q-") and a.endswith("-seed3-600ep")
    assert re.fullmatch(r"[a-z0-9-]+", a) and len(a) < 80


def test_compare_prints_stored_results_and_their_paired_difference_without_evaluating(runs, monkeypatch):
    for run in ("smat-run", "pmf-run"):
        assert CliRunner().invoke(evaluate.app, [str(runs / run), "--device", "cpu", "--no-baselines"]).exit_code == 0
    files = [str(next((runs / run).glob("results-*.json"))) for run in ("smat-run", "pmf-run")]
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *a, **k: pytest.fail("--compare evaluated a model"))

    result = CliRunner().invoke(evaluate.app, ["--compare", *files], env={"COLUMNS": "250"})

    assert result.exit_code == 0, result.output
    assert "smat-run" in result.stdout and "pmf-run − smat-run" in result.stdout


@pytest.mark.parametrize("content, message", [
    ("not json", "cannot read results file"), ('{"domains": {}}', "is not a results file")])
def test_compare_refuses_a_file_that_is_not_results_in_one_line(runs, content, message):
    (runs / "bad.json").write_text(content)
    assert CliRunner().invoke(evaluate.app, [str(runs / "smat-run"), "--device", "cpu", "--no-baselines"]).exit_code == 0
    good = next((runs / "smat-run").glob("results-*.json"))

    result = CliRunner().invoke(evaluate.app, ["--compare", str(good), str(runs / "bad.json")])

    assert result.exit_code == 2 and result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1


# --- training curves ------------------------------------------------------------------------------------


def test_curves_draws_metrics_jsonl_into_the_run_without_evaluating(runs, monkeypatch):
    records = [{"step": k, "episode": 4 * k, "loss": 1.5 / k, "ce": 1.4 / k, "accuracy": 0.5 + k / 20,
                "pretrained_accuracy": 0.5, "sparsity": [0.1 * k, 0.08 * k], "multiplier_mean": 0.01 * k,
                "router_entropy": 0.69} for k in range(1, 5)] + [{"episode": 16, "val_accuracy": 61.0}]
    (runs / "smat-run" / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + '\n{"cut sho')
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *a, **k: pytest.fail("--curves evaluated a model"))

    result = CliRunner().invoke(evaluate.app, ["--curves", str(runs / "smat-run"), "--out", str(runs / "pictures")])

    assert result.exit_code == 0, result.output
    assert (runs / "pictures" / "smat-run" / "training_curves.png").stat().st_size > 10_000
    assert not (runs / "smat-run" / "training_curves.png").exists()


def test_curves_of_a_run_without_metrics_is_one_line(runs):
    result = CliRunner().invoke(evaluate.app, ["--curves", str(runs / "pmf-run")])

    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "metrics.jsonl" in result.stderr
    assert result.stderr.count("\n") == 1


# --- pictures researchers read ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, where", [
    ("blocks.3.attn.qkv.weight", ("block 3", "qkv")), ("blocks.3.attn.proj.bias", ("block 3", "proj")),
    ("blocks.11.mlp.fc1.weight", ("block 11", "fc1")), ("blocks.0.mlp.fc2.bias", ("block 0", "fc2")),
    ("blocks.0.norm2.weight", ("block 0", "norms")), ("patch_embed.proj.weight", ("embeddings", "embed")),
    ("cls_token", ("embeddings", "embed")), ("pos_embed", ("embeddings", "embed")), ("norm.bias", ("final norm", "norms")),
])
def test_each_backbone_tensor_belongs_to_a_block_and_a_module_type(name, where):
    assert pictures.module_of(name) == where


def test_kept_fraction_is_pooled_by_block_and_module_type_weighted_by_parameter_count():
    results = {"experts": {
        "kept_fraction": {"blocks.0.attn.qkv.weight": [1.0, 0.0], "blocks.0.attn.qkv.bias": [0.0, 1.0],
                          "blocks.0.norm1.weight": [0.5, 0.5], "norm.weight": [1.0, 1.0]},
        "parameters": {"blocks.0.attn.qkv.weight": 3, "blocks.0.attn.qkv.bias": 1, "blocks.0.norm1.weight": 2,
                       "norm.weight": 2}}}

    blocks, types, table = pictures.kept_by_module(results)

    assert blocks == ["block 0", "final norm"] and types == ["qkv", "norms"]
    assert table[:, 0, 0].tolist() == [0.75, 0.25] and table[:, 0, 1].tolist() == [0.5, 0.5]
    assert table[:, 1, 1].tolist() == [1.0, 1.0] and table[:, 1, 0].isnan().all()


def test_ways_shots_queries_give_a_fixed_protocol_named_in_the_file_and_test_episodes_is_the_flag(runs):
    result = CliRunner().invoke(evaluate.app, [str(runs / "smat-run"), "--device", "cpu", "--no-baselines",
                                               "--ways", "2", "--shots", "1", "--queries", "2", "--test-episodes", "3"])

    assert result.exit_code == 0, result.output
    (written,) = (runs / "smat-run").glob("results-*.json")
    results = json.loads(written.read_text())
    assert results["protocol"] == {"kind": "fixed", "ways": 2, "shots": 1, "queries": 2}
    assert "-2w1s2q-" in written.name and written.name.endswith("-seed0-3ep.json")
    assert all(d["episodes"] == 3 for d in results["domains"].values())


def test_evaluate_help_lists_the_new_flags():
    text = CliRunner().invoke(evaluate.app, ["--help"], env={"COLUMNS": "200"}).output

    assert all(flag in text for flag in ("--test-episodes", "--episodes", "--ways", "--shots", "--queries",
                                         "--compare", "--curves"))
