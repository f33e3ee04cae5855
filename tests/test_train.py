"""train.py: the run directory, resume, multi-process equivalence, PMF, failure behaviour, bad flags."""

import contextlib
import dataclasses
import inspect
import io
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import jaxtyping
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import backbone as backbones
import configs
import devices
import evaluate
import flags
import monitor
import rundir
import smat
import train
from assets import make_assets
from smat import Config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Two small image-folder domains (one ID, one OOD; 30 classes of 20 images, enough for the default
    5-way 5-shot 15-query test episodes) and a small random ViT saved as a backbone file."""
    return make_assets(tmp_path_factory.mktemp("assets"))


def data_flag(assets: Path) -> str:
    return f"folder:{assets / 'alpha'}@id,folder:{assets / 'beta'}@ood"


def small_config(assets: Path, **overrides) -> Config:
    values = dict(data=data_flag(assets), backbone=str(assets / "vit.pt"),
                  image_size=16, n_experts=2, episodes=8, meta_batch=2, train_ways=3, train_shots=2,
                  train_queries=2, test_ways=3, test_shots=2, test_queries=2, val_every=4, val_episodes=2,
                  test_episodes=3, checkpoint_every=2, delta_lr=0.01, mask_lr=10.0)
    return Config(**{**values, **overrides})


def parameters(run: Path, name: str = "checkpoint.pt") -> dict:
    return torch.load(run / name, weights_only=True)["model"]


def test_a_run_directory_holds_config_metrics_checkpoints_and_results(assets, tmp_path):
    run = train.meta_train(small_config(assets), tmp_path / "run", device="cpu", cache_dir=tmp_path / "cache")

    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl", "checkpoint.pt", "best.pt",
                                               "results.json", "results.md"}
    assert json.loads((run / "config.json").read_text())["n_experts"] == 2
    assert torch.load(run / "checkpoint.pt", weights_only=True)["episode"] == 8
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("sparsity_mean" in line for line in lines) and any("val_accuracy" in line for line in lines)
    assert lines[0]["metrics_format"] == monitor.METRICS_FORMAT  # its accuracies are in percent
    results = json.loads((run / "results.json").read_text())
    assert set(results["domains"]) == {"alpha", "beta"}
    assert set(results["baselines"]["Pre"]["domains"]) == {"alpha", "beta"}  # Pre on the same episodes
    assert set(results["paired"]["smat - Pre"]["domains"]) == {"alpha", "beta"}
    assert len(results["domains"]["alpha"]["accuracies"]) == 3
    sparsity = results["sparsity"]
    assert len(sparsity["per_expert"]) == 2 and 0 <= sparsity["binary_fraction"] <= 1
    assert 0 <= sparsity["task_update_density"] <= 1


def test_resuming_an_interrupted_run_reaches_the_same_parameters(assets, tmp_path):
    cfg = small_config(assets)
    whole = train.meta_train(cfg, tmp_path / "whole", device="cpu", evaluate_at_end=False)

    part = train.meta_train(cfg, tmp_path / "part", device="cpu", evaluate_at_end=False, stop_after=4)
    assert torch.load(part / "checkpoint.pt", weights_only=True)["episode"] == 4
    train.meta_train(cfg, part, device="cpu", resume=True, evaluate_at_end=False)

    for name, tensor in parameters(whole).items():
        torch.testing.assert_close(parameters(part)[name], tensor, rtol=0, atol=0, msg=name)


def test_pmf_trains_its_dense_delta_through_the_same_loop(assets, tmp_path):
    cfg = Config.pmf(**{k: v for k, v in dataclasses.asdict(small_config(assets)).items()
                        if k not in ("method", "n_experts", "teacher", "kl_to_pretrained", "inner_step")})

    run = train.meta_train(cfg, tmp_path / "pmf", device="cpu", evaluate_at_end=False)

    state = parameters(run)
    assert "log_alpha" not in state and state["delta"].abs().sum() > 0


def test_a_non_finite_loss_stops_the_run_naming_the_term_and_keeps_the_last_checkpoint(assets, tmp_path, monkeypatch):
    calls, real_step = [], train.smat.meta_train_step

    def poisoned_step(*args, **kwargs):  # from the 5th task on, the query loss is NaN
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) > 4:
            out.loss, out.terms["ce"] = out.loss * float("nan"), out.terms["ce"] * float("nan")
        return out

    monkeypatch.setattr(train.smat, "meta_train_step", poisoned_step)

    with pytest.raises(train.NonFiniteLoss, match=r"non-finite ce at step 2 "):
        train.meta_train(small_config(assets), tmp_path / "nan", device="cpu", evaluate_at_end=False)

    checkpoint = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert checkpoint["episode"] == 4 and torch.isfinite(checkpoint["model"]["delta"]).all()


def test_two_gloo_processes_reach_the_parameters_of_one_process(assets, tmp_path):
    flags = ["train.py", "--data", data_flag(assets), "--backbone", str(assets / "vit.pt"), "--episodes", "4",
             "--experts", "2", "--no-evaluate", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

    for name, launcher in [("one", [sys.executable]), ("two", torchrun)]:
        result = subprocess.run([*launcher, *flags, "--out", str(tmp_path / name)], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr[-2000:]

    for key, tensor in parameters(tmp_path / "one").items():
        torch.testing.assert_close(parameters(tmp_path / "two")[key], tensor, rtol=1e-4, atol=1e-6, msg=key)
    for name, processes in (("one", 1), ("two", 2)):  # the start line says how many processes trained
        assert json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["start"]["processes"] == processes


def test_the_command_line_runs_a_small_job_end_to_end(assets, tmp_path):
    result = CliRunner().invoke(train.app, ["--data", data_flag(assets), "--backbone", str(assets / "vit.pt"),
                                            "--episodes", "4", "--experts", "2", "--test-episodes", "2",
                                            "--out", str(tmp_path / "cli"), "--device", "cpu"])

    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert results["domains"]["beta"]["split"] == "ood" and results["domains"]["alpha"]["episodes"] == 2
    for stage in ("smat: test alpha", "Pre: test beta"):  # no terminal: a line per finished test domain
        assert f"{stage}: 2 episodes in " in result.stdout


@pytest.mark.parametrize("flags, words", [
    (["--sparsity", "1.5"], "sparsity"),
    (["--experts", "0"], "experts"),
    (["--episodes", "0"], "episodes"),
    (["--method", "maml"], "method"),
    (["--data", "nowhere:x"], "data source"),
    (["--data", "folder:/does/not/exist"], "/does/not/exist"),
    (["--backbone", "resnet"], "backbone"),
    (["--resume", "/tmp"], "not a run directory"),
    (["--mask-sampling", "sometimes"], "--mask-sampling"),
    (["--precision", "fp8"], "'fp8' is not one of 'auto', 'bf16', 'fp16', 'fp32'"),
    (["--workers", "-1"], "--workers"),
    (["--profile", "gpu"], "--profile"),
    (["--test-episodes", "1"], "test_episodes"),
    (["--constraint-gates", "both"], "--constraint-gates"),
    (["--constraint-gates", "sampled", "--sparsity", "0.96"], "cannot be reached"),
])
def test_bad_flags_exit_with_code_2_and_one_line(flags, words, tmp_path):
    out = [] if "--resume" in flags else ["--out", str(tmp_path / "never")]  # --resume takes no --out
    result = CliRunner().invoke(train.app, [*flags, *out])

    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "never").exists()


def test_a_malformed_flag_value_is_one_line_and_exit_code_2_from_the_shell():
    result = subprocess.run([sys.executable, "train.py", "--experts", "two"], cwd=ROOT, capture_output=True, text=True)

    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--experts" in result.stderr and not result.stdout


def test_a_run_whose_output_is_not_a_terminal_prints_one_plain_line_per_log_step_and_validation(assets, tmp_path):
    result = CliRunner().invoke(train.app, ["--data", data_flag(assets), "--backbone", str(assets / "vit.pt"),
                                            "--episodes", "4", "--experts", "2", "--no-evaluate",
                                            "--out", str(tmp_path / "run"), "--device", "cpu"])

    assert result.exit_code == 0, result.output
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in result.stdout.splitlines() if " loss " in line]
    validations = [line for line in result.stdout.splitlines() if "validation accuracy" in line]
    assert len(steps) == sum("loss" in r for r in logged) >= 1
    assert len(validations) == sum("val_accuracy" in r for r in logged) >= 1
    last = steps[-1]
    assert last.startswith("smat episode 4/4 (100%)") and " ETA 0:00:00 " in last
    assert all(word in last for word in (" ce ", " acc ", " sparsity ", " λ ", " ep/s"))
    assert "━" not in result.stdout  # no frame of a progress bar


def test_in_a_terminal_validation_and_the_final_test_show_their_progress(assets, tmp_path):
    console = Console(file=io.StringIO(), force_terminal=True, width=120)

    train.meta_train(small_config(assets), tmp_path / "run", device="cpu", cache_dir=tmp_path / "cache",
                     console=console)

    shown = console.file.getvalue()
    assert all(stage in shown for stage in ("smat: val alpha", "smat: test alpha", "smat: test beta",
                                            "Pre: test alpha", "Pre: test beta"))


def test_tensorboard_gets_every_number_of_metrics_jsonl_at_its_episode(assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train.meta_train(small_config(assets), tmp_path / "run", device="cpu", cache_dir=tmp_path / "cache",
                           evaluate_at_end=False, tensorboard=True)

    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = {(tag, r["episode"]): value for r in records for tag, value in monitor.tensorboard_scalars(r).items()}
    written = {(tag, e.step): e.value for tag in board.Tags()["scalars"] for e in board.Scalars(tag)}
    assert written.keys() == expected.keys()
    assert all(written[key] == pytest.approx(value, rel=1e-6) for key, value in expected.items())
    assert {"train/loss", "val/accuracy", "train/sparsity/expert_1", "train/router_entropy"} <= {tag for tag, _ in written}


def test_tensorboard_scalars_are_grouped_name_each_expert_and_skip_the_axis_and_session_records():
    record = {"step": 3, "episode": 12, "loss": 1.5, "sparsity": [0.5, 0.75], "episodes_per_second": 2}

    assert monitor.tensorboard_scalars(record) == {"train/loss": 1.5, "train/sparsity/expert_0": 0.5,
                                                 "train/sparsity/expert_1": 0.75, "system/episodes_per_second": 2.0}
    assert monitor.tensorboard_scalars({"episode": 4, "val_accuracy": 61.5}) == {"val/accuracy": 61.5}
    start = {"episode": 0, "start": {"device": "cpu"}, "metrics_format": monitor.METRICS_FORMAT}
    assert monitor.tensorboard_scalars(start) == {}


def test_tensorboard_without_its_package_is_one_line_and_nothing_is_written(assets, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the extra were not installed

    result = CliRunner().invoke(train.app, ["--data", data_flag(assets), "--backbone", str(assets / "vit.pt"),
                                            "--episodes", "4", "--tensorboard", "--out", str(tmp_path / "never")])

    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install -e '.[tensorboard]'" in lines[0]
    assert not (tmp_path / "never").exists()


# --- --config FILE and --set KEY=VALUE ---------------------------------------------------------------------


def test_a_runs_config_json_given_to_config_gives_back_the_same_config(tmp_path):
    cfg = Config(n_experts=3, inner_lr=0.02, teacher=False, test_protocol="variable", data="embedded@ood")
    (tmp_path / "config.json").write_text(json.dumps(configs.config_record(cfg)))

    assert flags.make_config("cpu", flags.config_overrides(tmp_path / "config.json", []), None) == cfg


def test_set_values_are_converted_by_field_type_and_win_over_the_config_file(tmp_path):
    (tmp_path / "c.toml").write_text('n_experts = 3\ninner_lr = 0.02\nmethod = "smat"\n')

    values = flags.config_overrides(tmp_path / "c.toml", ["inner_lr=0.5", "teacher=false", "test_ways=10"])

    assert values == {"n_experts": 3, "inner_lr": 0.5, "method": "smat", "teacher": False, "test_ways": 10}


def test_config_and_set_reach_the_run_and_named_flags_win(assets, tmp_path):
    (tmp_path / "c.toml").write_text("n_experts = 3\ninner_lr = 0.02\nval_every = 4\n")
    result = CliRunner().invoke(train.app, ["--data", data_flag(assets), "--backbone", str(assets / "vit.pt"),
                                            "--episodes", "4", "--no-evaluate", "--out", str(tmp_path / "run"),
                                            "--device", "cpu", "--config", str(tmp_path / "c.toml"),
                                            "--set", "inner_lr=0.03", "--experts", "2"])

    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["n_experts"], saved["inner_lr"], saved["val_every"]) == (2, 0.03, 4)


@pytest.mark.parametrize("flags, files, words", [
    (["--set", "no_such_field=1"], {}, "--set no_such_field: unknown Config field"),
    (["--set", "experts=4"], {}, "unknown Config field; valid keys are the fields of smat.Config (e.g. method"),
    (["--set", "experts=4"], {}, "(did you mean n_experts?)"),
    (["--config", "c.json"], {"c.json": '{"inner-lr": 0.1}'}, "(did you mean inner_lr?)"),
    (["--set", "inner_lr"], {}, "use KEY=VALUE"),
    (["--set", "n_experts=two"], {}, "--set n_experts=two: not a valid int"),
    (["--set", "method=maml"], {}, "method = \"maml\" is not valid; it must be one of smat, pmf"),
    (["--set", "sparsity=1.5"], {}, "sparsity"),
    (["--config", "c.toml"], {"c.toml": "n_experts = "}, "not a readable TOML file"),
    (["--config", "c.json"], {"c.json": '{"n_experts": 3, "colour": "red"}'}, "unknown keys ['colour']"),
    (["--config", "c.json"], {"c.json": '{"n_experts": "3"}'}, 'n_experts = "3" is not valid'),
    (["--config", "missing.json"], {}, "not a readable JSON file"),
])
def test_bad_config_files_and_settings_are_one_line_and_nothing_is_written(flags, files, words, tmp_path):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    flags = [str(tmp_path / f) if f.endswith((".json", ".toml")) else f for f in flags]

    result = CliRunner().invoke(train.app, [*flags, "--out", str(tmp_path / "never")])

    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines
    assert not (tmp_path / "never").exists()


def test_train_help_lists_config_set_and_tensorboard_and_every_default_in_brackets():
    text = CliRunner().invoke(train.app, ["--help"], env={"COLUMNS": "250"}).output

    assert "--config" in text and "--set" in text and "--tensorboard" in text
    shown = f"[default: {flags.profile_defaults('episodes')}]"  # brackets survive rich's markup
    assert shown in text and "[default: CPUs - 1, at most 16]" in text


def test_help_defaults_name_each_profile_where_they_differ_and_what_pmf_switches():
    cpu, paper = Config(), Config.paper()

    assert flags.profile_defaults("sparsity") == str(cpu.sparsity)  # the same in both profiles
    assert flags.profile_defaults("episodes") == f"cpu {cpu.episodes}, paper {paper.episodes}"
    assert flags.profile_defaults("n_experts") == f"{cpu.n_experts}; 1 with --method pmf"
    assert flags.profile_defaults("teacher") == "on; off with --method pmf"
    # PMF's δ lr was chosen on ID validation classes for the CPU profile only
    assert flags.profile_defaults("delta_lr").endswith(f"; cpu {Config.pmf().delta_lr} with --method pmf")
    assert flags.make_config("paper", {"method": "pmf", "n_experts": 1}, None).delta_lr == paper.delta_lr
    assert flags.make_config("cpu", {"method": "pmf", "n_experts": 1}, None) == Config.pmf()
    assert len(flags.profile_defaults("data")) < 60  # the paper's ten sources, shortened


def test_precision_auto_is_bf16_on_cards_with_native_bf16_else_fp16_and_fp32_on_cpu(monkeypatch):
    assert {devices.resolve_precision(p, torch.device("cpu")) for p in ("auto", "bf16", "fp16", "fp32")} == {"fp32"}
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(devices.torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(devices.torch.cuda, "get_device_name", lambda device=None: "an old card")
    for native, auto in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(devices.torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: native or including_emulation)  # emulation: always
        assert devices.resolve_precision("auto", cuda) == auto
        assert devices.resolve_precision("fp16", cuda) == "fp16" and devices.resolve_precision("fp32", cuda) == "fp32"

    with pytest.raises(rundir.RunError, match="an old card has no native bf16; use --precision auto or fp16"):
        devices.resolve_precision("bf16", cuda)


def test_a_compiled_backbone_gives_the_eager_step(assets, monkeypatch):
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)  # as --compile runs: no shape checks
    cfg = small_config(assets)
    torch.manual_seed(0)
    eager = train.SMAT(backbones.load_backbone(assets / "vit.pt")[0], cfg)
    compiled = train.SMAT(backbones.load_backbone(assets / "vit.pt")[0], cfg)  # its own backbone module
    compiled.load_state_dict(eager.state_dict())
    devices.compile_backbone(compiled, backend="aot_eager")  # dynamo and AOTAutograd; inductor is only codegen
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()

    for ways in (3, 4):  # two episode shapes, one compiled graph (dynamic batch size)
        images, labels = torch.randn(ways * 4, 3, 16, 16), torch.arange(ways).repeat(4)
        losses = []
        for model in (eager, compiled):
            model.zero_grad()
            out = train.smat.meta_train_step(model, images[: ways * 2], labels[: ways * 2], images[ways * 2:],
                                             labels[ways * 2:], ways, torch.Generator().manual_seed(ways))
            out.loss.backward()
            losses.append(out.loss.detach())
        torch.testing.assert_close(losses[1], losses[0])
        torch.testing.assert_close(compiled.delta.grad, eager.delta.grad)
        torch.testing.assert_close(compiled.log_alpha.grad, eager.log_alpha.grad)
    assert counters["stats"]["unique_graphs"] >= 2  # compiled with and without gradients, not run eagerly


@pytest.mark.skipif(os.environ.get("SMAT_TEST_COMPILE") != "1",
                    reason="inductor compiles C++ for about 30 s on a 2-core CPU; SMAT_TEST_COMPILE=1 runs it")
def test_the_command_line_trains_with_compile(assets, tmp_path, monkeypatch):
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", False)  # restored afterwards: --compile turns it on
    result = CliRunner().invoke(train.app, ["--data", data_flag(assets), "--backbone", str(assets / "vit.pt"),
                                            "--episodes", "8", "--experts", "2", "--no-evaluate", "--compile",
                                            "--workers", "0", "--out", str(tmp_path / "compiled"), "--device", "cpu"])

    assert result.exit_code == 0, result.output
    start = json.loads((tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()[0])["start"]
    assert start["compile"] is True and torch.load(tmp_path / "compiled" / "checkpoint.pt", weights_only=True)["episode"] == 8


# --- runs written by earlier versions ------------------------------------------------------------------


def written_before(run: Path, *fields: str) -> None:
    """Make `run` look written before `fields` existed (and before config_format was recorded)."""
    dropped = {"config_format", *fields}
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k not in dropped}))
    for name in ("checkpoint.pt", "best.pt"):
        state = torch.load(run / name, weights_only=True)
        state["config"] = {k: v for k, v in state["config"].items() if k not in dropped}
        torch.save(state, run / name)


def test_a_run_written_before_a_field_was_added_resumes_with_its_default_and_one_note(assets, tmp_path):
    cfg = small_config(assets, constraint_gates="test", router_logit_penalty=1e-4)  # both their defaults
    train.meta_train(cfg, tmp_path / "run", device="cpu", stop_after=4, evaluate_at_end=False,
                     cache_dir=tmp_path / "cache")
    train.meta_train(cfg, tmp_path / "whole", device="cpu", evaluate_at_end=False, cache_dir=tmp_path / "cache")
    written_before(tmp_path / "run", "constraint_gates", "router_logit_penalty")

    result = CliRunner().invoke(train.app, ["--resume", str(tmp_path / "run"), "--device", "cpu", "--no-evaluate"])

    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "constraint_gates, router_logit_penalty" in notes[0], result.output
    assert 'constraint_gates = "test"' in notes[0] and "router_logit_penalty = 0.0001" in notes[0]
    resumed, whole = parameters(tmp_path / "run"), parameters(tmp_path / "whole")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)  # the same run as one never interrupted
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["config_format"] == configs.CONFIG_FORMAT and saved["constraint_gates"] == "test"


def test_a_config_json_records_its_format_and_every_field(assets, tmp_path):
    run = train.meta_train(small_config(assets), tmp_path / "run", device="cpu", stop_after=2, evaluate_at_end=False,
                           cache_dir=tmp_path / "cache")

    saved = json.loads((run / "config.json").read_text())

    assert saved == {"config_format": configs.CONFIG_FORMAT, **small_config(assets).to_dict()}
    assert configs.read_config(run) == small_config(assets)


def test_a_renamed_field_reads_under_its_new_name(tmp_path):
    old = {k: v for k, v in Config().to_dict().items() if k != "router_anneal_fraction"}
    (tmp_path / "config.json").write_text(json.dumps(old | {"router_anneal_tasks": 200, "episodes": 800}))

    assert configs.read_config(tmp_path).router_anneal_fraction == 0.25


@pytest.mark.parametrize("change, words", [
    ({"colour": "red"}, "has unknown keys ['colour']"),
    ({"n_experts": "8"}, 'n_experts = "8" is not valid; it must be an integer'),
    ({"config_format": 99}, "config_format = 99 is not valid; this version of train.py reads formats 1 to"),
    ({"config_format": "2"}, 'config_format = "2" is not valid'),
])
def test_unknown_fields_wrong_types_and_newer_formats_are_still_refused_in_one_line(change, words, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(configs.config_record(Config()) | change))

    with pytest.raises(rundir.RunError) as error:
        configs.read_config(tmp_path)

    assert words in str(error.value) and "\n" not in str(error.value)


def test_default_runs_are_named_by_their_method_and_variants_by_the_settings_they_change():
    assert rundir.variant(Config()) == {} and rundir.variant(Config.pmf()) == {}
    assert rundir.variant(Config.paper()) == {}  # the nearer profile's defaults
    assert rundir.variant(Config(n_experts=16, teacher=False)) == {"n_experts": 16, "teacher": False}
    assert rundir.variant(Config(seed=3, episodes=400, data="embedded@id")) == {}  # not settings of the method

    assert rundir.variant_label(Config()) == "smat" and rundir.variant_label(Config.pmf()) == "pmf"
    assert rundir.variant_label(Config(n_experts=16, teacher=False)) == "smat-n_experts16-no_teacher"
    assert rundir.default_run_name(Config(sparsity=0.7)).startswith("smat-sparsity0.7-")


def test_results_record_the_variant_and_its_table_names_it(assets, tmp_path):
    run = train.meta_train(small_config(assets, sparsity=0.7), tmp_path / "run", device="cpu",
                           cache_dir=tmp_path / "cache", console=Console(file=io.StringIO()))

    results = json.loads((run / "results.json").read_text())

    assert results["variant"] == {"n_experts": 2, "sparsity": 0.7}
    assert results["baselines"]["Pre"]["variant"] == {}
    assert "n_experts = 2, sparsity = 0.7" in (run / "results.md").read_text()


def test_each_named_flag_is_one_parameter_named_after_its_config_field_and_none_is_hidden():
    parameters = inspect.signature(train.main).parameters
    options = {name: p.annotation.__metadata__[0] for name, p in parameters.items()}

    command_only = {"out", "device", "resume", "profile", "stop_after", "evaluate_at_end", "check_shapes",
                    "config_file", "settings", "workers", "compile_model", "tensorboard", "wandb"}
    assert set(parameters) - set(flags.CONFIG_FIELDS) == command_only
    assert [name for name, info in options.items() if info.hidden] == []
    assert all("[default: " in options[name].help for name in set(parameters) & set(flags.CONFIG_FIELDS))
    assert flags.given_fields({"n_experts": 4, "seed": None, "out": "x"}) == {"n_experts": 4}


def test_the_method_flags_help_names_every_method_and_what_pmf_switches():
    help_text = flags.METHOD_HELP

    assert all(method in help_text for method in typing.get_args(smat.Method))
    assert all(f"{field} {flags.shown(value)}" in help_text for field, value in smat.PMF_SWITCHES.items() if field != "method")


def test_router_top_k_from_the_command_line_reaches_the_run_and_names_it(assets, tmp_path):
    result = CliRunner().invoke(train.app, ["--data", data_flag(assets), "--backbone", str(assets / "vit.pt"),
                                            "--experts", "3", "--router-top-k", "2", "--episodes", "4", "--no-evaluate",
                                            "--out", str(tmp_path / "run"), "--device", "cpu"])

    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["router_top_k"] == 2


def test_evaluate_reads_a_run_written_before_a_field_was_added_and_notes_it_once_after_its_table(assets, tmp_path):
    run = train.meta_train(small_config(assets), tmp_path / "run", device="cpu", evaluate_at_end=False,
                           cache_dir=tmp_path / "cache")
    written_before(run, "router_logit_penalty")

    result = CliRunner().invoke(evaluate.app, [str(run), "--episodes", "2", "--no-baselines", "--device", "cpu"])

    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "router_logit_penalty = 0.0001" in notes[0]
    assert len(list(run.glob("results-*.json"))) == 1
