#!/usr/bin/env bash
# GPU check: the CUDA tests and the ViT-S/16 benchmark in one call, in under 5 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default OUT_DIR: $OUT, else benchmarks/results)
#
# Prints the card and torch version, the test summary, the benchmark table and its summary against the
# targets of docs/performance.md; writes OUT_DIR/gpu_check.json (rows are saved as they are measured, so a run cut
# short keeps what it has). When git can show it, the pre-optimisation smat.py (commit 4582ba9) is
# measured interleaved with the current one (rows "base:smat", "base:pmf", ...), so before/after come
# from the same card at the same moment. Times out each stage rather than overrunning the budget.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT_DIR=${1:-${OUT:-benchmarks/results}}
mkdir -p "$OUT_DIR"

"$PY" -c 'import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible to torch " + torch.__version__)
print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda}")' || exit 2

echo "# tests (CUDA checks included): tests/test_fast_path.py"
timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_fast_path.py 2>&1 | tail -n 15

BASELINE=()
if git show 4582ba9:smat.py > "$OUT_DIR/smat_plain.py" 2>/dev/null; then
    BASELINE=(--baseline "$OUT_DIR/smat_plain.py")
fi
# shape checks off, as the GPU commands in docs/gpu.md run (--no-check-shapes)
echo "# benchmark: ViT-S/16 at 128 px, bf16 autocast, meta-batch 4 ${BASELINE[*]:+(A/B against 4582ba9)}"
timeout 210 "$PY" benchmarks/bench.py --device cuda --preset vit_small_patch16 --shapes 10w2s,20w18s \
    --experts 8,16 --parts smat,pmf,fwdbwd --warmup 1 --repeats 5 --no-typecheck "${BASELINE[@]}" \
    --json "$OUT_DIR/gpu_check.json"
status=$?
[ $status -eq 124 ] && echo "# benchmark stopped at its time limit; $OUT_DIR/gpu_check.json holds the rows measured"
exit $status
