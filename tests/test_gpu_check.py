"""benchmarks/gpu_check.sh's table (benchmarks/gpu_table.py) from the files its stages leave: the
targets judged from measured rows, and every stage that did not run named as such, never a number."""

import importlib.util
import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_table", REPO / "benchmarks" / "gpu_table.py")
gpu_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_table)


def bench_row(shape, part, experts, ms, peak_mib):
    return {"preset": "vit_small_patch16", "image_size": 128, "shape": shape, "part": part, "experts": experts,
            "ms": ms, "peak_mib": peak_mib}


def test_a_full_gpu_run_gives_one_row_per_measurement_with_the_targets_judged(tmp_path):
    steps = [bench_row("10w2s", "smat", 8, 50.0, 3 * 1024), bench_row("10w2s", "smat", 16, 60.0, 5 * 1024),
             bench_row("10w2s", "pmf", 1, 20.0, 1024), bench_row("10w2s", "fwdbwd", 0, 10.0, 512)]
    (tmp_path / "steps.json").write_text(json.dumps({"rows": steps}))
    compiled = [bench_row("10w2s", "smat", 8, 50.0, 3072), bench_row("10w2s", "smat:compiled", 8, 40.0, 2048)]
    (tmp_path / "compile.json").write_text(json.dumps({"rows": compiled}))
    rows = [{"source": "synthetic Meta-Dataset h5", "workers": w, "episodes_per_second": 1.5 * w,
             "images_per_second": 630.0 * w, "images_per_episode": 420.0, "load_average": 1.0,
             "worker_cpu_s_per_episode": 0.5} for w in (1, 4, 8, 16)]
    (tmp_path / "data.json").write_text(json.dumps({"meta": {"cpus": 16}, "rows": rows}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        json.dumps({"episode": 0, "start": {"precision": "bf16", "workers": 8}}) + "\n"
        + json.dumps({"step": 50, "episode": 200, "episodes_per_second": 3.5, "peak_memory_gib": 9.5}) + "\n")
    (run / "results.json").write_text("{}")
    (tmp_path / "smoke.json").write_text(json.dumps(gpu_table.summarise_smoke(run, 95.0)))
    for stage in ("steps", "data", "smoke", "compile", "tests"):
        (tmp_path / f"{stage}.status").write_text("0\n")

    table = gpu_table.table(tmp_path)

    assert "50.0 ms/episode, 3.00 GiB peak | <= 60 ms: meets; <= 4 GiB: meets" in table
    assert "M=16 / M=8 = 1.20 (<= 1.15: misses)" in table and "SMAT M=8 / ProtoNet = 2.50 (<= 3: meets)" in table
    assert "40.0 ms/episode" in table and "eager in the same run: 50.0 ms (1.25x)" in table
    assert ("24.00 episodes/s, 10080 images/s (420 images/episode; worker CPU 0.50 s/episode; load 1.0) | "
            "16.00x the images/s of 1 worker; >= 20 episodes/s: meets") in table
    assert "200 episodes in 95 s; training 3.50 episodes/s, 9.50 GiB peak; bf16, 8 workers; test table written | ran to the end" in table
    assert "20-way 18-shot" in table and "not measured" in table  # the 20w18s rows are absent here


def test_a_cpu_run_names_the_skipped_gpu_stages_and_invents_no_number(tmp_path):
    for stage in ("steps", "smoke", "compile", "tests"):
        (tmp_path / f"{stage}.status").write_text("no-cuda\n")
    (tmp_path / "data.status").write_text("124\n")

    table = gpu_table.table(tmp_path)

    assert table.count("skipped: no CUDA device") >= 4
    assert "ms/episode" not in table and "stopped at its time limit" in table


def test_the_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")]).returncode == 0
