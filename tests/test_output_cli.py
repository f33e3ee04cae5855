"""The command lines' output read anywhere: whole in a file or a pipe, install hints, --data marks, --config."""

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
import evaluate
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
    assert lines[-1] == f"wrote {out / 'results.json'} and {out / 'results.md'}"
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
