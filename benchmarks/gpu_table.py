"""The one table of benchmarks/gpu_check.sh, from the files its stages left in OUT_DIR.

    python benchmarks/gpu_table.py OUT_DIR
    python benchmarks/gpu_table.py smoke RUN_DIR WALL_SECONDS OUT_DIR/smoke.json   # summarise a smoke run

Reads steps.json and compile.json (bench.py), data.json (data_speed.py), smoke.json (the
`--profile paper` smoke run) and STAGE.status (the exit status of each stage, or "skipped"), and
prints one markdown table: the SMAT and dense ProtoNet steps against the targets, --compile against
eager, the data pipeline's episodes per second by worker count, and the smoke run. A stage that
did not run, failed or was stopped at its time limit says so in its rows; nothing is invented.
"""

import json
import sys
from pathlib import Path

SHAPES = {"10w2s": "10-way 2-shot 10-query", "20w18s": "20-way 18-shot 10-query"}
TARGET_MS, TARGET_GIB, M16_OVER_M8, SMAT_OVER_PMF = 60.0, 4.0, 1.15, 3.0  # docs/performance.md
OFFICIAL = {("10w2s", 8): "403 ms, 8.8 GiB", ("20w18s", 8): "529 ms, 16.2 GiB", ("10w2s", 16): "505 ms, 13.3 GiB"}
DATA_TARGET = 20.0  # episodes/s of Meta-Dataset-sized episodes with the workers of a 16-core machine


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stage_note(out: Path, stage: str) -> str:
    """Why a stage has no (or only some) rows: its status file."""
    status = (out / f"{stage}.status").read_text().strip() if (out / f"{stage}.status").is_file() else "not run"
    return {"0": "", "124": "stopped at its time limit", "skipped": "skipped: time budget spent",
            "no-cuda": "skipped: no CUDA device"}.get(status, f"exit status {status}" if status.isdigit() else status)


def verdict(value: float, limit: float) -> str:
    return f"{'meets' if value <= limit else 'misses'}"


def step_rows(out: Path) -> list[tuple[str, str, str, str]]:
    rows, result, note = [], _load(out / "steps.json"), stage_note(out, "steps")
    measured = {(r["shape"], r["part"], r["experts"]): r for r in (result or {}).get("rows", [])
                if r["preset"] == "vit_small_patch16" and r.get("ms")}
    for shape, label in SHAPES.items():
        setting = f"ViT-S/16 128 px, {label}, meta-batch 4"
        smat8 = measured.get((shape, "smat", 8))
        for part, m, name in (("smat", 8, "SMAT step, M = 8"), ("smat", 16, "SMAT step, M = 16"),
                              ("pmf", 1, "dense ProtoNet step"), ("fwdbwd", 0, "backbone forward+backward")):
            r = measured.get((shape, part, m))
            if r is None:
                rows.append((name, setting, "not measured" + (f" ({note})" if note else ""), ""))
                continue
            gib = r["peak_mib"] / 1024 if r.get("peak_mib") else None
            value = f"{r['ms']:.1f} ms/episode" + (f", {gib:.2f} GiB peak" if gib is not None else "")
            target = ""
            if (part, m) == ("smat", 8) and shape == "10w2s":
                target = (f"<= {TARGET_MS:.0f} ms: {verdict(r['ms'], TARGET_MS)}"
                          + (f"; <= {TARGET_GIB:.0f} GiB: {verdict(gib, TARGET_GIB)}" if gib is not None else ""))
            if (part, m) == ("smat", 16) and smat8:
                ratio = r["ms"] / smat8["ms"]
                target = f"M=16 / M=8 = {ratio:.2f} (<= {M16_OVER_M8}: {verdict(ratio, M16_OVER_M8)})"
            if part == "pmf" and smat8:
                ratio = smat8["ms"] / r["ms"]
                target = f"SMAT M=8 / ProtoNet = {ratio:.2f} (<= {SMAT_OVER_PMF:.0f}: {verdict(ratio, SMAT_OVER_PMF)})"
            if (shape, m) in OFFICIAL and part == "smat":
                target += f" [official code: {OFFICIAL[(shape, m)]}]"
            rows.append((name, setting, value, target))
    return rows


def compile_rows(out: Path) -> list[tuple[str, str, str, str]]:
    result, note = _load(out / "compile.json"), stage_note(out, "compile")
    measured = {r["part"]: r for r in (result or {}).get("rows", []) if r.get("ms")}
    setting = "ViT-S/16 128 px, 10-way 2-shot 10-query, M = 8, meta-batch 4"
    rows = []
    for part, name in (("smat", "SMAT step"), ("pmf", "dense ProtoNet step")):
        eager, compiled = measured.get(part), measured.get(f"{part}:compiled")
        if not (eager and compiled):
            rows.append((f"{name}, --compile", setting, "not measured" + (f" ({note})" if note else ""), ""))
            continue
        gib = compiled["peak_mib"] / 1024 if compiled.get("peak_mib") else None
        rows.append((f"{name}, --compile", setting,
                     f"{compiled['ms']:.1f} ms/episode" + (f", {gib:.2f} GiB peak" if gib is not None else ""),
                     f"eager in the same run: {eager['ms']:.1f} ms ({eager['ms'] / compiled['ms']:.2f}x)"))
    return rows


def data_rows(out: Path) -> list[tuple[str, str, str, str]]:
    result, note = _load(out / "data.json"), stage_note(out, "data")
    rows, one = [], {}
    for r in (result or {}).get("rows", []):
        one.setdefault(r["source"], r if r["workers"] == 1 else None)
        base = one[r["source"]]
        scaling = (f"{r['images_per_second'] / base['images_per_second']:.2f}x the images/s of 1 worker"
                   if base and r["workers"] > 1 else "")
        target = (f">= {DATA_TARGET:.0f} episodes/s: {'meets' if r['episodes_per_second'] >= DATA_TARGET else 'misses'}"
                  if r["workers"] >= 16 else "")
        rows.append((f"data pipeline, {r['workers']} worker{'s' if r['workers'] != 1 else ''}",
                     f"{r['source']}, variable way/shot, 128 px, {result['meta']['cpus']} CPUs",
                     f"{r['episodes_per_second']:.2f} episodes/s, {r['images_per_second']:.0f} images/s "
                     f"({r['images_per_episode']:.0f} images/episode; worker CPU "
                     f"{r.get('worker_cpu_s_per_episode') or float('nan'):.2f} s/episode; load {r['load_average']:.1f})",
                     "; ".join(x for x in (scaling, target) if x)))
    if not rows or note:
        rows.append(("data pipeline", "128 px, by worker count", "not measured" if not rows else "incomplete",
                     note))
    return rows


def smoke_rows(out: Path) -> list[tuple[str, str, str, str]]:
    result, note = _load(out / "smoke.json"), stage_note(out, "smoke")
    setting = "train.py --profile paper, synthetic Meta-Dataset h5, random ViT-S/16 (DINO layout), 200 episodes"
    if not result:
        return [("smoke run", setting, "not run" + (f" ({note})" if note else ""), "")]
    start = result.get("start") or {}
    value = (f"{result['episodes']} episodes in {result['wall_s']:.0f} s; training "
             f"{result.get('episodes_per_second') or 0:.2f} episodes/s, "
             f"{result.get('peak_memory_gib') or float('nan'):.2f} GiB peak; {start.get('precision', '?')}, "
             f"{start.get('workers', '?')} workers; test table {'written' if result.get('results') else 'missing'}")
    return [("smoke run", setting, value, "ran to the end" if not note and result.get("results") else note or "")]


def table(out: Path) -> str:
    lines = ["| measurement | setting | value | target / comparison |", "| --- | --- | --- | --- |"]
    for row in step_rows(out) + compile_rows(out) + data_rows(out) + smoke_rows(out):
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summarise_smoke(run_dir: Path, wall_s: float) -> dict:
    """What the table needs from a smoke run's directory (metrics.jsonl, results.json)."""
    records = []
    if (run_dir / "metrics.jsonl").is_file():
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "step" in r]
    return {"wall_s": wall_s, "episodes": max((r["episode"] for r in steps), default=0),
            "episodes_per_second": steps[-1]["episodes_per_second"] if steps else None,
            "peak_memory_gib": steps[-1].get("peak_memory_gib") if steps else None,
            "start": next((r["start"] for r in records if "start" in r), None),
            "results": (run_dir / "results.json").is_file()}


if __name__ == "__main__":
    if sys.argv[1] == "smoke":
        summary = summarise_smoke(Path(sys.argv[2]), float(sys.argv[3]))
        Path(sys.argv[4]).write_text(json.dumps(summary, indent=2) + "\n")
    else:
        print(table(Path(sys.argv[1])))
