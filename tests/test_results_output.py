"""Results that are usable as they are: every pairwise difference saved, the lr search stated, the
tested checkpoint and code recorded, percent everywhere, ASCII keys, a long-form CSV and --gather,
whole run names (or letters with a legend), and a warning for a model far below its τ."""

import csv
import io
import json
import re
import statistics

import pytest
import torch
from rich.console import Console
from test_evaluate import fake_results as per_episode
from test_evaluate import runs  # noqa: F401  (the fixture of two saved runs)
from typer.testing import CliRunner

import evaluate
import resultfiles
import rundir
import tables

WIDE = {"COLUMNS": "250"}
PROTOCOL = {"kind": "fixed", "ways": 5, "shots": 5, "queries": 15}


def fake_results(accuracies: dict[str, list[float]], splits: dict[str, str]) -> dict:
    """A results dict as evaluate.py writes it, from per-episode accuracies given as fractions."""
    return per_episode(accuracies, splits) | {"protocol": PROTOCOL}


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(evaluate.app, [*map(str, args)], env=env or WIDE)


def header_cells(text: str) -> list[str]:
    """The cells of a table's header line (rich's or markdown's)."""
    line = next(line for line in text.splitlines() if re.search(r"\bdomain\b", line) and "split" in line)
    return [cell.strip() for cell in re.split(r"[┃│|]", line) if cell.strip()]


def one_results_file(run) -> dict:
    (path,) = run.glob("results-*.json")
    return json.loads(path.read_text())


# --- several runs: every pair, printed and saved ----------------------------------------------------------


def test_several_runs_print_every_pairwise_difference_and_save_one_comparison_file(runs):
    result = invoke(runs / "smat-run", runs / "pmf-run", "--device", "cpu")

    assert result.exit_code == 0, result.output
    assert {"smat-run − Pre", "pmf-run − Pre", "pmf-run − smat-run"} <= set(header_cells(result.stdout))
    (saved,) = runs.glob("comparison-*.json")  # in the folder that holds the runs
    assert {saved.with_suffix(s).exists() for s in (".md", ".csv")} == {True}
    comparison = json.loads(saved.read_text())
    smat, pmf = one_results_file(runs / "smat-run"), one_results_file(runs / "pmf-run")
    pair = comparison["paired"]["pmf-run - smat-run"]
    assert (pair["a"], pair["b"]) == ("pmf-run", "smat-run")
    assert pair["id_avg"] == tables.paired_difference(pmf, smat)["id_avg"]
    assert list(comparison["runs"]) == ["Pre", "smat-run", "pmf-run"]
    assert comparison["runs"]["pmf-run"]["source"] == str(runs / "pmf-run")
    assert "pmf-run − smat-run" in saved.with_suffix(".md").read_text()
    first = saved.read_bytes()

    assert invoke(runs / "smat-run", runs / "pmf-run", "--device", "cpu").exit_code == 0

    assert len(list(runs.glob("comparison-*.json"))) == 2 and saved.read_bytes() == first  # never over a file


def write(path, results: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
    return str(path)


def test_compare_prints_every_pair_of_stored_files_and_out_saves_them(tmp_path):
    splits = {"d": "id", "e": "ood"}
    files = [write(tmp_path / name / "results.json", fake_results({"d": [a, 0.5, 1.0], "e": [0.2, a, 0.4]}, splits))
             for name, a in (("a", 0.0), ("b", 0.5), ("c", 1.0))]

    result = invoke("--compare", *files, "--out", tmp_path / "saved")

    assert result.exit_code == 0, result.output
    assert header_cells(result.stdout)[-3:] == ["b − a", "c − a", "c − b"]
    (saved,) = (tmp_path / "saved").glob("comparison-*.json")
    assert set(json.loads(saved.read_text())["paired"]) == {"b - a", "c - a", "c - b"}
    assert f"wrote {saved.with_suffix('')}.json, .md and .csv" in result.stdout


def test_an_old_results_file_of_fractions_and_unicode_keys_still_compares(tmp_path):
    new = fake_results({"d": [0.2, 0.6, 1.0]}, {"d": "id"})
    old = {k: v for k, v in new.items() if k != "results_format"}  # format 1: fractions, "a − b" keys
    old["domains"] = {"d": new["domains"]["d"] | {"accuracies": [0.2, 0.6, 1.0]}}
    old["paired"] = {"x − Pre": {"domains": {}, "id_avg": None, "ood_avg": None}}
    old["baselines"] = {"Pre": old | {"paired": {}}}

    loaded = resultfiles.load_results(write(tmp_path / "old" / "results.json", old))
    result = invoke("--compare", write(tmp_path / "old" / "results.json", old), write(tmp_path / "new" / "results.json", new))

    assert loaded["domains"]["d"]["accuracies"] == [20.0, 60.0, 100.0] == new["domains"]["d"]["accuracies"]
    assert loaded["baselines"]["Pre"]["domains"]["d"]["accuracies"] == [20.0, 60.0, 100.0]
    assert loaded["paired"] == {"x - Pre": {"a": "x", "b": "Pre", "domains": {}, "id_avg": None, "ood_avg": None}}
    assert result.exit_code == 0, result.output
    assert "+0.00 ± 0.00" in result.stdout  # the same episodes, the same numbers: no difference


# --- what a results file records ------------------------------------------------------------------------------


def every_key(tree) -> list[str]:
    if isinstance(tree, dict):
        return list(tree) + [k for value in tree.values() for k in every_key(value)]
    return [k for value in tree for k in every_key(value)] if isinstance(tree, list) else []


def test_results_hold_percent_ascii_keys_the_tested_checkpoint_the_code_state_and_the_processes(runs):
    state = torch.load(runs / "smat-run" / "checkpoint.pt", weights_only=True)
    rundir.atomic_save(state | {"step": 4, "episode": 8, "best_val": 61.5, "best_episode": 8}, runs / "smat-run" / "best.pt")

    assert invoke(runs / "smat-run", "--device", "cpu").exit_code == 0
    assert invoke(runs / "pmf-run", "--device", "cpu").exit_code == 0

    results = one_results_file(runs / "smat-run")
    assert results["results_format"] == tables.RESULTS_FORMAT
    for domain in results["domains"].values():  # per episode in percent, as the mean
        assert domain["mean"] == pytest.approx(statistics.fmean(domain["accuracies"]), abs=1e-3)
        assert max(domain["accuracies"]) > 1
    assert all(key.isascii() for key in every_key(results))
    assert results["paired"]["smat - Pre"]["a"] == "smat" and results["paired"]["smat - Pre"]["b"] == "Pre"
    assert results["checkpoint"] == {"file": "best.pt", "episode": 8, "val_accuracy": 61.5}
    assert one_results_file(runs / "pmf-run")["checkpoint"]["file"] == "checkpoint.pt"  # the run has no best.pt
    stamp = results["provenance"]
    assert stamp["git_dirty"] in (True, False, None) and (stamp["git_dirty"] is None) == (stamp["git_commit"] is None)
    assert stamp["processes"] == 1


def test_an_old_style_checkpoint_without_its_episode_records_none_rather_than_a_guess(tmp_path):
    assert evaluate.tested_checkpoint(tmp_path, {"model": {}}) == {"file": "checkpoint.pt", "episode": None,
                                                                   "val_accuracy": None}
    later = {"episode": 12, "best_val": 60.0, "best_episode": 8}  # checkpoint.pt after the best: not that model
    assert evaluate.tested_checkpoint(tmp_path, later)["val_accuracy"] is None


def test_the_file_name_keeps_the_start_of_the_data_string_and_its_hash_tells_paths_apart():
    name = {"finetune": "none", "seed": 0, "domains": {"d": {"episodes": 600}},
            "protocol": {"kind": "fixed", "ways": 5, "shots": 5, "queries": 15}}
    glyphs = resultfiles.results_name(name | {"data": "folder:/home/me/data/folder-tmp/glyphs@ood"})
    long = resultfiles.data_slug("folder:/a/omniglot@ood,torchvision:cifar10:/x:download=1,h5:/md/quickdraw@ood")

    assert glyphs.startswith("results-zeroshot-5w5s15q-folder-glyphs-ood-") and glyphs.endswith("-seed0-600ep")
    assert resultfiles.data_slug("embedded") == "embedded"
    assert long == "folder-omniglot-ood-torchvision"  # whole words from the left, at most 32 characters
    assert (resultfiles.results_name(name | {"data": "folder:/x/glyphs@ood"})
            != resultfiles.results_name(name | {"data": "folder:/y/glyphs@ood"}))


def test_the_terminal_and_results_md_show_the_columns_in_one_order(runs):
    result = invoke(runs / "smat-run", "--device", "cpu")

    assert result.exit_code == 0, result.output
    (md,) = (runs / "smat-run").glob("results-*.md")
    assert header_cells(result.stdout) == header_cells(md.read_text()) == ["domain", "split", "Pre", "smat-run",
                                                                           "smat-run − Pre"]


# --- the sparsity warning ------------------------------------------------------------------------------------


def test_a_model_far_below_its_target_sparsity_is_warned_about_in_the_table_and_results_md(tmp_path):
    results = fake_results({"d": [0.5, 1.0]}, {"d": "id"})
    short = results | {"sparsity": {"per_expert": [0.0, 0.02], "target": 0.9, "binary_fraction": 0.1,
                                    "task_update_density": 1.0}}
    met = short | {"sparsity": short["sparsity"] | {"per_expert": [0.88, 0.9]}}  # within SPARSITY_SHORTFALL
    console = Console(file=io.StringIO(), width=300)

    tables.print_table([short], ["run"], console)
    resultfiles.write_results(tmp_path, short)

    for text in (console.file.getvalue(), (tmp_path / "results.md").read_text()):
        assert "WARNING: an expert is 0.900 below τ = 0.9: the sparsity constraint was not met" in text
        assert "train longer" in text
    assert "WARNING" not in tables.sparsity_line(met)


# --- long run names, whole domain names -------------------------------------------------------------------


def test_long_run_names_become_letters_with_a_legend_where_whole_names_do_not_fit(tmp_path):
    domain = "a-domain-whose-name-is-quite-long"
    one, two = (fake_results({domain: [0.5, a], "b": [0.5, 0.5]}, {domain: "id", "b": "ood"}) for a in (0.0, 1.0))
    names = ["smat-sparsity0.5-experts16-20261206-101010", "pmf-lr0.05-20261206-121212"]
    paths = [f"/runs/{n}" for n in names]

    def shown(width: int) -> str:
        console = Console(file=io.StringIO(), width=width)
        tables.print_table([one, two], names, console, tables.pairwise([one, two], names), paths)
        return console.file.getvalue()

    narrow, wide = shown(100), shown(250)

    assert header_cells(narrow)[2:] == ["A", "B", "B − A"] and "…" not in narrow
    assert f"A = {paths[0]}" in narrow and f"B = {paths[1]}" in narrow and domain in narrow
    assert header_cells(wide)[2:] == [*names, f"{names[1]} − {names[0]}"] and "A = " not in wide


# --- fine-tuning: the grid, its cost, the lr in the column ------------------------------------------------


def test_the_lr_grid_is_a_flag_its_cost_is_stated_first_and_the_chosen_lr_0_says_no_fine_tuning(runs):
    result = invoke(runs / "smat-run", "--device", "cpu", "--finetune", "full", "--finetune-grid", "0")

    assert result.exit_code == 0, result.output
    plan = "grid 0 (--finetune-grid), 1 lrs × 5 episodes = 5 episodes per stage, 4 stages (2 domains × 2 models)"
    assert plan in result.stderr and result.stderr.index(plan) < result.stderr.index("smat-run: lr search")
    assert "smat-run (lr 0 chosen: no fine-tuning)" in result.stdout
    assert "Pre+full (lr 0 chosen: no fine-tuning)" in result.stdout
    (md,) = (runs / "smat-run").glob("results-full-*.md")
    assert "| smat-run (lr 0 chosen: no fine-tuning) |" in md.read_text()
    assert one_results_file(runs / "smat-run")["finetune_lr_search"]["candidates"] == [0.0]


def test_a_chosen_lr_labels_its_column_and_lrs_that_differ_by_domain_are_listed():
    results = fake_results({"d": [0.5, 1.0], "e": [0.5, 0.5]}, {"d": "id", "e": "ood"}) | {"finetune": "full"}
    for domain in results["domains"].values():
        domain["finetune_lr"] = 1e-3
    mixed = results | {"finetune_lr_search": {}, "domains": results["domains"] | {"e": results["domains"]["e"]
                                                                                  | {"finetune_lr": 0.0}}}

    assert tables.column_label("smat+full", results) == "smat+full (lr 0.001)"  # given with --finetune-lr
    assert tables.column_label("smat+full", mixed) == "smat+full (lr per domain, below)"
    assert tables.lr_line("smat+full", mixed) == ("smat+full: fine-tuning lr per domain (chosen on validation "
                                                   "classes): d 0.001, e 0 (no fine-tuning)")


@pytest.mark.parametrize("flags, words", [
    (["--finetune", "full", "--finetune-grid", "0,abc"], "--finetune-grid 0,abc is not valid"),
    (["--finetune", "full", "--finetune-grid", "0,2"], "in [0, 1.0]"),
    (["--finetune", "full", "--finetune-grid", "0,0"], "distinct"),
    (["--finetune-grid", "0,1e-3"], "needs --finetune full or lora"),
    (["--finetune", "full", "--finetune-lr", "0.01", "--finetune-grid", "0,1e-3"], "no --finetune-lr")])
def test_a_bad_lr_grid_is_one_line_and_exit_code_2(runs, flags, words):
    result = invoke(runs / "smat-run", "--device", "cpu", *flags)

    assert result.exit_code == 2 and result.stderr.startswith("error: ") and words in result.stderr
    assert result.stderr.count("\n") == 1 and not list((runs / "smat-run").glob("results*"))


# --- the long form and --gather ---------------------------------------------------------------------------------


def test_every_results_json_has_a_long_form_csv_beside_it_with_one_row_per_run_and_domain(runs):
    assert invoke(runs / "smat-run", "--device", "cpu").exit_code == 0

    (saved,) = (runs / "smat-run").glob("results-*.json")
    results, rows = json.loads(saved.read_text()), list(csv.DictReader(saved.with_suffix(".csv").open()))

    averages = [tables.AVERAGES[key] for key in tables.average_groups(results["domains"])]  # ID, OOD, far OOD
    assert [(r["run"], r["minus"], r["domain"]) for r in rows] == [
        (run, minus, domain) for run, minus in (("Pre", ""), ("smat-run", ""), ("smat-run", "Pre"))
        for domain in ("glyphs", "rosettes", *averages)]
    glyphs = next(r for r in rows if r["run"] == "smat-run" and not r["minus"] and r["domain"] == "glyphs")
    assert float(glyphs["mean"]) == pytest.approx(results["domains"]["glyphs"]["mean"], abs=1e-4)
    assert (glyphs["split"], glyphs["level"], glyphs["method"], glyphs["episodes"]) == ("id", "domain", "smat", "2")
    assert glyphs["settings"] == ";".join(f"{k}={v}" for k, v in sorted(results["variant"].items())) != ""
    assert glyphs["train_seed"] == "0" and glyphs["episode_seed"] == "0" and glyphs["finetune"] == "none"
    difference = next(r for r in rows if r["minus"] == "Pre" and r["domain"] == "ID avg")
    assert float(difference["mean"]) == pytest.approx(results["paired"]["smat - Pre"]["id_avg"]["mean"], abs=1e-4)


def test_gather_joins_every_results_csv_under_a_folder_into_one(tmp_path):
    splits = {"d": "id", "e": "ood"}
    for folder, name in (("a", "results.csv"), ("b/deeper", "results-zeroshot-x.csv")):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / name).write_text(resultfiles.long_csv({folder: fake_results({"d": [0.5, 1.0], "e": [0.0, 0.5]},
                                                                                    splits)}))
    (tmp_path / "a" / "notes.csv").write_text("not,results\n1,2\n")

    result = invoke("--gather", tmp_path)

    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["run"] for r in rows] == ["a"] * 4 + ["b/deeper"] * 4 and "results" not in rows[0]
    assert rows[0]["file"] == str(tmp_path / "a" / "results.csv") and list(rows[0])[1:] == list(resultfiles.CSV_COLUMNS)
    empty = invoke("--gather", tmp_path / "a" / "nowhere")
    assert empty.exit_code == 2 and "is not a directory" in empty.stderr and empty.stderr.count("\n") == 1


@pytest.mark.parametrize("flags", [("--compare", "--curves"), ("--gather", "--compare"), ("--gather", "--out", "x")])
def test_evaluate_modes_that_contradict_each_other_are_one_line_not_a_silent_choice(tmp_path, flags):
    result = invoke(tmp_path, *flags)

    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "separate modes" in lines[0] or "redirect it" in lines[0]


@pytest.mark.parametrize("content, words", [
    (None, "--gather: no results*.csv under"),  # a folder without results
    ("run,x\n1,2\n", "is not a results csv (its header lacks method, domain, split, mean, ci95)"),
    (",".join(resultfiles.GATHERED) + "\na,b,c,d,e,f,extra\n", "line 2 has another number of cells than its header"),
    ('run,method\n"unclosed\n', "cannot read"),
])
def test_gather_refuses_a_results_csv_it_cannot_join_in_one_line(tmp_path, content, words):
    if content is not None:
        (tmp_path / "results-mine.csv").write_text(content)

    result = invoke("--gather", tmp_path)

    assert result.exit_code == 2 and words in result.stderr and result.stderr.count("\n") == 1, result.output


def test_compare_refuses_one_results_file_given_twice_rather_than_pairing_it_with_itself(tmp_path):
    path = tmp_path / "run" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(fake_results({"d": [0.5, 1.0]}, {"d": "id"})))

    result = invoke("--compare", path, tmp_path / "run" / ".." / "run" / "results.json")

    assert result.exit_code == 2 and "is given twice" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("state", [{"episode": 8, "best_episode": 8, "best_val": None},
                                   {"episode": 8, "best_episode": 8, "best_val": float("nan")},
                                   {"episode": "8", "best_episode": 8, "best_val": 81.5}, {}])
def test_the_tested_checkpoint_of_a_damaged_file_is_recorded_as_null_not_a_crash(tmp_path, state):
    whole = evaluate.tested_checkpoint(tmp_path, {"episode": 8, "best_episode": 8, "best_val": 81.5})

    damaged = evaluate.tested_checkpoint(tmp_path, state)

    assert whole == {"file": "checkpoint.pt", "episode": 8, "val_accuracy": 81.5}
    assert damaged["val_accuracy"] is None and json.dumps(damaged, allow_nan=False)
