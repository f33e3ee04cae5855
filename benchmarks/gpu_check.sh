#!/usr/bin/env bash
# The paper's setting on one GPU, measured in one call that prints one table (about 8 minutes on an
# H100/H200; every stage has a time limit and all stages share a budget, GPU_CHECK_BUDGET seconds):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default OUT_DIR: $OUT, else benchmarks/results)
#
# Stages, in order of importance (a later stage gets what the earlier ones left of the budget):
#   steps    bench.py: SMAT step (M = 8 and 16) and dense ProtoNet step, ViT-S/16 at 128 px,
#            10-way 2-shot 10-query and 20-way 18-shot 10-query, meta-batch 4: ms/episode, peak GiB
#   data     data_speed.py: episodes/s of data.training_stream at 128 px with 1, 4, 8, 16 workers on a
#            synthetic Meta-Dataset tree in PMF's h5 layout (benchmarks/synthetic_md.py)
#   smoke    train.py --profile paper for 200 episodes on that tree with a random ViT-S/16 saved in
#            DINO's key layout (no download), then its validation and a short test table
#   compile  bench.py --compile: the SMAT and ProtoNet steps with --compile against eager
#   tests    tests/test_fast_path.py, whose CUDA tests check the fused merge and a step's host syncs
# Then benchmarks/gpu_table.py prints the one table from OUT_DIR/*.json and *.status.
# Without CUDA (a CPU machine) only the data stage runs, with 1 and 2 workers, and the table says
# that the GPU stages were skipped. Large files (the tree, the smoke run) go to a temporary folder.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT_DIR=${1:-${OUT:-benchmarks/results}}
BUDGET=${GPU_CHECK_BUDGET:-450}
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/{steps,data,smoke,compile,tests}.status "$OUT_DIR"/{steps,data,smoke,compile}.json \
    "$OUT_DIR"/{smoke.log,smoke_metrics.jsonl,gpu_check.md}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS

stage() {  # stage NAME LIMIT COMMAND...: run under min(LIMIT, budget left), or skip with < 20 s left
    local name=$1 limit=$2 left=$((BUDGET - (SECONDS - START)))
    shift 2
    ((limit > left)) && limit=$left
    if ((limit < 20)); then
        echo "# $name: skipped, the time budget is spent"
        echo skipped > "$OUT_DIR/$name.status"
        return
    fi
    echo "# $name (at most ${limit} s)"
    timeout --kill-after=10 "$limit" "$@"
    local status=$?
    echo "$status" > "$OUT_DIR/$name.status"
    ((status == 124)) && echo "# $name: stopped at its time limit; what it measured so far is kept"
}

CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))') || exit 2
"$PY" -c 'import os, shutil, torch
card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
shm = shutil.disk_usage("/dev/shm").total / 2**30 if os.path.isdir("/dev/shm") else float("nan")
print(f"# {card} | torch {torch.__version__} | CUDA {torch.version.cuda} | {os.cpu_count()} CPUs | "
      f"/dev/shm {shm:.1f} GiB | load {os.getloadavg()[0]:.1f}")'
date -u "+# %Y-%m-%d %H:%M UTC"
export JAXTYPING_DISABLE=1  # shape checks off, as the GPU commands of docs/gpu.md run (--no-check-shapes)

if [ "$CUDA" = 1 ]; then
    stage steps 150 "$PY" benchmarks/bench.py --device cuda --preset vit_small_patch16 --shapes 10w2s,20w18s \
        --experts 8,16 --parts smat,pmf,fwdbwd --warmup 1 --repeats 5 --no-typecheck --json "$OUT_DIR/steps.json"
    stage data 75 "$PY" benchmarks/data_speed.py --only-workers --sources md --workers 1,4,8,16 --timed 200 --seconds 8 \
        --md-root "$WORK/md" --json "$OUT_DIR/data.json"
    # the tree of the data stage (written here if that stage was cut short) and the random weights
    if read -r _ DATA _ BACKBONE < <(timeout 120 "$PY" benchmarks/synthetic_md.py "$WORK/md"); then
        smoke_start=$SECONDS
        echo "# smoke: train.py --profile paper, 200 episodes (its output: $OUT_DIR/smoke.log)"
        stage smoke 150 "$PY" train.py --profile paper --data "$DATA" --backbone "$BACKBONE" --episodes 200 \
            --val-episodes 4 --test-episodes 4 --out "$WORK/smoke" --device cuda --no-check-shapes \
            > "$OUT_DIR/smoke.log" 2>&1
        tail -n 4 "$OUT_DIR/smoke.log"
        if [ -d "$WORK/smoke" ]; then
            "$PY" benchmarks/gpu_table.py smoke "$WORK/smoke" $((SECONDS - smoke_start)) "$OUT_DIR/smoke.json"
            cp "$WORK/smoke/metrics.jsonl" "$OUT_DIR/smoke_metrics.jsonl" 2> /dev/null
        fi
    else
        echo "could not write the synthetic tree" > "$OUT_DIR/smoke.status"
    fi
    stage compile 110 "$PY" benchmarks/bench.py --device cuda --preset vit_small_patch16 --shapes 10w2s \
        --experts 8 --parts smat,pmf --compile --warmup 2 --repeats 5 --no-typecheck --json "$OUT_DIR/compile.json"
    stage tests 60 env -u JAXTYPING_DISABLE "$PY" -m pytest -q -p no:cacheprovider tests/test_fast_path.py
else
    for name in steps smoke compile tests; do echo no-cuda > "$OUT_DIR/$name.status"; done
    echo "# no CUDA device: the GPU stages (steps, smoke, compile, tests) are skipped; the data pipeline's scaling:"
    stage data 420 "$PY" benchmarks/data_speed.py --only-workers --workers 1,2 --timed 30 --seconds 80 \
        --md-root "$WORK/md" --json "$OUT_DIR/data.json"
fi

echo "# the table ($((SECONDS - START)) s)"
"$PY" benchmarks/gpu_table.py "$OUT_DIR" | tee "$OUT_DIR/gpu_check.md"
