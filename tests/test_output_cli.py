"""The command lines' output read anywhere: whole in a file or a pipe, install hints, --data marks, --config."""

import contextlib
import io
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer
from rich.table import Table
from typer.testing import CliRunner

import cli
import configs
import evaluate
import flags
import readers
import train
from assets import make_assets

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


def shell(*args: str, stdout) -> subprocess.CompletedProcess:
    """A command as the shell runs it (cli.run_cli), its stdout a file or a pipe, never a terminal."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    env.pop("COLUMNS", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, text=True, timeout=300)


# --- (1, 4) tables, paths and --help whole off a terminal; train.py says where its run went ---


def test_a_training_run_written_to_a_file_keeps_each_table_row_and_each_path_on_one_line(assets, tmp_path):
    out = tmp_path / ("a-run-directory-whose-name-is-far-longer-than-eighty-columns-" * 2 + "seed0")
    log = tmp_path / "train.log"
    with open(log, "w") as file:
        result = shell("train.py", "--data", f"folder:{assets / 'alpha'}@id,folder:{assets / 'beta'}@ood",
                       "--backbone", str(assets / "vit.pt"), "--episodes", "4", "--experts", "2",
                       "--test-episodes", "2", "--device", "cpu", "--out", str(out), "--sparsity", "0.5",
                       "--router-top-k", "1", "--mask-sampling", "official", "--no-kl-to-pretrained", stdout=file)

    assert result.returncode == 0, result.stderr[-2000:]
    lines = log.read_text().splitlines()
    assert lines[0] == f"run directory: {out}"  # where the run goes, before anything else
    assert lines[-1] == f"wrote {out / 'results'}.json, .md and .csv"
    for domain in ("alpha", "beta"):  # Pre, the variant and their difference: three cells, each whole on its row
        row = [line for line in lines if re.match(rf"\W*{domain}\b", line)]
        assert len(row) == 1 and row[0].count("±") == 3, "\n".join(lines)


def test_off_a_terminal_the_console_takes_a_tables_natural_width_and_never_wraps_a_line(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    monkeypatch.delenv("COLUMNS", raising=False)
    console = cli.console()
    table = Table("domain", *(f"run-{n}-with-a-long-name-of-forty-characters" for n in range(4)))
    table.add_row("constellations", *["71.67 ± 0.86"] * 4)
    path = "runs/" + "a-long-directory-name/" * 8 + "results.json"

    console.print(table)
    console.print(f"wrote {path}")
    cli.print_line(console, f"wrote {path}")

    text = stream.getvalue()
    assert not console.is_terminal and console.soft_wrap
    assert any(line.count("71.67 ± 0.86") == 4 for line in text.splitlines()), text
    assert text.count(f"wrote {path}\n") == 2, text


def test_on_a_terminal_the_console_keeps_the_terminals_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich's own switch: this console is a terminal

    console = cli.console()

    assert console.is_terminal and console.width == 100 and not console.soft_wrap


@pytest.mark.parametrize("script, app", [("train.py", train.app), ("evaluate.py", evaluate.app)])
def test_help_in_a_pipe_shows_every_flag_name_whole(script, app):
    result = shell(script, "--help", stdout=subprocess.PIPE)

    assert result.returncode == 0, result.stderr
    names = [name for param in typer.main.get_command(app).params for name in param.opts + param.secondary_opts]
    cut = [name for name in names if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w…-])", result.stdout)]
    assert len(names) > 10 and cut == [], result.stdout
    assert not re.search(r"--[\w-]*…", result.stdout), result.stdout


def test_help_on_a_terminal_keeps_the_terminals_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setenv("FORCE_COLOR", "1")
    plain = re.compile(r"\x1b\[[0-9;]*m")

    text = CliRunner().invoke(train.app, ["--help"]).output

    assert max(len(plain.sub("", line)) for line in text.splitlines()) == 100


# --- (7) install hints name an extra of pyproject.toml, in the form the README installs with ---


def test_every_install_hint_names_an_extra_of_pyproject_in_the_editable_form():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    sources = sorted(ROOT.glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    hints = [(path.name, line) for path in sources for line in path.read_text().splitlines() if "pip install" in line]

    assert hints, "no install hint found"
    for name, line in hints:
        assert "smat-reference[" not in line, (name, line)
        for extra in re.findall(r"\[([\w-]+)\]", line):
            assert f"pip install -e '.[{extra}]'" in line and extra in extras, (name, line)


def test_the_readme_names_every_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    readme = (ROOT / "README.md").read_text()
    line = readme[readme.index("Optional extras"):].split("\n\n")[0]

    assert [extra for extra in extras if f"`{extra}`" not in line] == []


# --- (10a) every real --data source is marked @id or @ood ---


@pytest.mark.parametrize("spec", ["folder:{alpha}", "folder:{alpha}@id,folder:{beta}", "torchvision:cifar10:/nowhere",
                                  "h5:/nowhere/aircraft"])
def test_an_unmarked_real_source_is_refused_in_one_line_naming_the_marks(assets, tmp_path, spec):
    spec = spec.format(alpha=assets / "alpha", beta=assets / "beta")
    result = CliRunner().invoke(train.app, ["--data", spec, "--backbone", str(assets / "vit.pt"),
                                            "--out", str(tmp_path / "never")])

    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "has no split mark" in lines[0] and "@id" in lines[0] and "@ood" in lines[0]
    assert not (tmp_path / "never").exists()


def test_the_embedded_benchmark_and_marked_sources_need_no_more_marks(assets):
    readers.check_marked("embedded")  # the benchmark's domains carry their own splits
    readers.check_marked("embedded:constellations,embedded@ood")
    readers.check_marked(f"folder:{assets / 'alpha'}@id,torchvision:cifar10:/x@ood,h5:/x/aircraft@ood")
    readers.check_marked("folder:/data/d@v2@ood")  # an at sign inside a path, then the mark


def test_a_run_recorded_with_an_unmarked_source_still_reads_it(assets):
    sources = readers.parse_data_spec(f"folder:{assets / 'alpha'}", 16)  # what config.json may hold

    assert [(s.name, s.split) for s in sources] == [("alpha", "id")]


# --- (10b) a field set twice on the command line must agree; the file is the base ---


def invoke(assets, tmp_path, *flags):
    return CliRunner().invoke(train.app, ["--data", f"folder:{assets / 'alpha'}@id", "--backbone",
                                          str(assets / "vit.pt"), "--out", str(tmp_path / "never"), *flags])


@pytest.mark.parametrize("flags, words", [
    (["--set", "n_experts=4", "--experts", "8"], "n_experts is set twice with different values: --set n_experts=4 and --experts 8"),
    (["--experts", "8", "--set", "n_experts=4"], "--set n_experts=4 and --experts 8"),
    (["--set", "inner_lr=0.1", "--set", "inner_lr=0.2"], "--set inner_lr=0.1 and --set inner_lr=0.2"),
    (["--set", "teacher=true", "--no-teacher"], "--set teacher=true and --no-teacher"),
])
def test_a_field_set_twice_with_different_values_is_refused_naming_both(assets, tmp_path, flags, words):
    result = invoke(assets, tmp_path, *flags)

    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and words in lines[0], result.output
    assert not (tmp_path / "never").exists()


def test_the_same_value_twice_is_one_setting_and_the_command_line_changes_the_file_saying_so(tmp_path):
    (tmp_path / "c.json").write_text('{"n_experts": 4, "inner_lr": 0.02}')

    values = flags.config_overrides(None, ["n_experts=8", "sparsity=0.5"], {"n_experts": 8, "sparsity": 0.5})
    assert values == {"n_experts": 8, "sparsity": 0.5}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        values = flags.config_overrides(tmp_path / "c.json", ["inner_lr=0.03"], {"n_experts": 4})
    assert values == {"n_experts": 4, "inner_lr": 0.03}
    assert err.getvalue().strip() == f"note: the command line changes --config {tmp_path / 'c.json'}: inner_lr 0.02 -> 0.03"


# --- (12) --config FILE.yaml: project field names, or the official code's keys ---

OFFICIAL_YAML = """\
logging: {print_freq: 1, val_freq: 1, save_freq: 5, exp_dir: experiments/x}
meta_learner:
  model: SPARSE_INTERPOLATED_EXPERTS
  first_order: True
  num_inner_steps: 0
  dense_teacher: {num_steps: 0, T: 2, lam: 0.25, lr: 0.005}
  sparsity: {structured: False, target: 0.8, num_experts: 4, sparsify_where: ['sp_mod'], stochastic_mask: True}
  inner_lr: {lr: 1e-3, learnable: False}
  outer_lr: {lr: 0.0005, mask_lr: 1000000, lagrangian_lr: 0.002}
base_learner: {backbone: ViT_Small_DINO, head: cosine, bias: False}
train: {datasets: [aircraft, dtd], max_epoch: 3, batchsize: 2, fp16: True, image_size: 64, num_ways: 10}
scheduler: {sched: cosine, warmup_epochs: 5}
optimizer: {name: SGD, momentum: 0.9, weight_decay: 0.0, lr: 1e-4, max_grad_norm: 5}
"""


def test_a_yaml_of_field_names_gives_the_config_the_same_json_gives(tmp_path):
    (tmp_path / "c.json").write_text('{"n_experts": 3, "inner_lr": 0.0001, "teacher": false, "data": "embedded"}')
    (tmp_path / "c.yaml").write_text("n_experts: 3\ninner_lr: 1e-4   # YAML 1.1 alone reads a string\n"
                                     "teacher: false\ndata: embedded\n")
    (tmp_path / "c.yml").write_text("{n_experts: 3, inner_lr: 0.0001, teacher: no, data: embedded}")

    read = [configs.read_config_file(tmp_path / name) for name in ("c.json", "c.yaml", "c.yml")]

    assert read[0] == read[1] == read[2] and type(read[1]["inner_lr"]) is float
    assert flags.make_config("cpu", read[1], None) == flags.make_config("cpu", read[0], None)


def test_a_yaml_of_the_official_keys_maps_each_to_its_field(tmp_path):
    (tmp_path / "md.yaml").write_text(OFFICIAL_YAML)

    values = configs.read_config_file(tmp_path / "md.yaml")

    assert values == {
        "val_every": 2000, "checkpoint_every": 10_000, "method": "smat", "teacher_lr": 0.005,
        "distill_temperature": 2, "distill_weight": 0.25, "sparsity": 0.8, "n_experts": 4, "inner_lr": 0.001,
        "mask_lr": 1_000_000, "multiplier_lr": 0.002, "backbone": "vit_small_patch16",
        "data": "h5:metadataset_h5/aircraft@id,h5:metadataset_h5/dtd@id", "episodes": 6000, "meta_batch": 2,
        "precision": "fp16", "image_size": 64, "delta_momentum": 0.9, "delta_lr": 0.0001, "mask_clip": 5}
    cfg = flags.make_config("paper", values, None)
    assert (cfg.n_experts, cfg.episodes, cfg.delta_lr, cfg.multiplier_lr) == (4, 6000, 1e-4, 2e-3)


@pytest.mark.parametrize("text, words", [
    ("optimizer: {lr: 1e-4, warmup: 3}", "optimizer.warmup is neither a Config field nor an official key"),
    ("meta_learner: {sparsity: {num_expert: 8}}", "(did you mean meta_learner.sparsity.num_experts?)"),
    ("n_expert: 8", "(did you mean n_experts?)"),
    ("meta_learner: {sparsity: {structured: True}}", "meta_learner.sparsity.structured = true has no counterpart"),
    ("base_learner: {backbone: ViT_Large_21k_torchhub}", "base_learner.backbone = \"ViT_Large_21k_torchhub\" is not valid"),
    ("train: {max_epoch: 2.5}", "train.max_epoch = 2.5 is not valid; it must be an integer number of epochs"),
    ("train: {batchsize: four}", "train.batchsize = \"four\" is not valid; it must be an integer (it sets meta_batch)"),
    ("n_experts: 4\nmeta_learner: {sparsity: {num_experts: 8}}", "sets n_experts twice"),
    ("n_experts: [1, 2", "not a readable YAML file of Config fields (expected ',' or ']'"),
    ("n_experts: 4\n  sparsity: 0.5", "not a readable YAML file"),
    ("- 1\n- 2", "not an object of Config fields"),
    ("train: {datasets: aircraft}", "train.datasets = \"aircraft\" is not valid; it must be a list of Meta-Dataset source"),
    ("n_experts: 4\nn_experts: 8", "the key 'n_experts' is given twice at line 2"),  # YAML alone keeps the last
    ("optimizer: {lr: 0.1}\noptimizer: {momentum: 0.9}", "the key 'optimizer' is given twice"),
])
def test_a_bad_yaml_config_is_one_line_and_exit_code_2(assets, tmp_path, text, words):
    (tmp_path / "c.yaml").write_text(text)

    result = invoke(assets, tmp_path, "--config", str(tmp_path / "c.yaml"))

    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and words in lines[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "never").exists()


def test_a_json_config_with_a_key_given_twice_is_one_line_not_the_last_value(assets, tmp_path):
    (tmp_path / "c.json").write_text('{"n_experts": 4, "n_experts": 8}')  # json.loads alone keeps the 8

    result = invoke(assets, tmp_path, "--config", str(tmp_path / "c.json"))

    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "the key 'n_experts' is given twice" in lines[0], result.output


def test_docs_configs_lists_every_official_key():
    text = (ROOT / "docs" / "configs.md").read_text()
    keys = list(configs.OFFICIAL_KEYS) + list(configs.OFFICIAL_FIXED) + list(configs.OFFICIAL_IGNORED)

    assert [key for key in keys if f"| `{key}` |" not in text] == []
    for key, (field, _) in configs.OFFICIAL_KEYS.items():
        assert f"| `{key}` | `{field}` |" in text, key


def test_evaluate_refuses_an_unmarked_test_source_in_one_line_as_train_does(assets, tmp_path):
    result = CliRunner().invoke(evaluate.app, [str(tmp_path / "run"), "--data", f"folder:{assets / 'beta'}"])

    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "has no split mark" in lines[0] and "@ood" in lines[0]
