#!/usr/bin/env bash
# The learning-rate selection behind the CPU profile's defaults, on ID validation classes only.
#
#   bash benchmarks/select_lr.sh                          # OUT=runs/results/select, 2 jobs at a time
#   python benchmarks/results_tables.py runs/results      # its table: validation accuracy per setting
#
# Each setting of a small grid is meta-trained for the CPU profile's 800 episodes with seeds 0 and 1;
# its score is the best ID-validation accuracy of the run (the model train.py keeps: `val_accuracy`
# in metrics.jsonl, 60 episodes per ID domain on validation classes, disjoint from test classes). The
# setting with the best mean over the seeds becomes the default. Test episodes play no part: each
# run's final test is cut to the minimum (2 episodes per domain) and never read, and no OOD domain is
# seen.
#   PMF:  δ lr ∈ {0.01, 0.02, 0.05, 0.1}
#   SMAT: δ lr ∈ {0.02, 0.05, 0.1, 0.2, 0.4} × (inner lr, teacher lr) ∈ {(1e-3, 5e-3) official, (4e-3, 2e-2) 4×}
# The 4× pair is the teacher lr at which the dense teacher's own query-accuracy lead over the student
# peaked in an 80-episode probe on *training* tasks (teacher_accuracy − accuracy in metrics.jsonl:
# +1.3 points at 5e-3, +3.9 at 2e-2, +0.9 at 5e-2, −5.4 at 0.1), with the inner lr scaled alike.
# Rerunning skips finished runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/results/select}
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-python}
SELECT_SEEDS=${SELECT_SEEDS:-"0 1"}
export OMP_NUM_THREADS=1 JAXTYPING_DISABLE=1 COLUMNS=200
mkdir -p "$OUT"

select_run() {  # select_run NAME FLAGS...: one run, validated, its test cut to the minimum
  local name=$1; shift
  [ -f "$OUT/$name/.done" ] && return 0
  rm -rf "${OUT:?}/$name"
  "$PYTHON" train.py --out "$OUT/$name" --no-check-shapes --test-episodes 2 "$@" > "$OUT/$name.log" 2>&1
  touch "$OUT/$name/.done"
}
export -f select_run
export OUT PYTHON

for seed in $SELECT_SEEDS; do
  for lr in 0.01 0.02 0.05 0.1; do
    echo "pmf-lr$lr-seed$seed --method pmf --experts 1 --seed $seed --set delta_lr=$lr"
  done
  for lr in 0.02 0.05 0.1 0.2 0.4; do
    echo "smat-lr$lr-t1-seed$seed --seed $seed --set delta_lr=$lr --set inner_lr=0.001 --set teacher_lr=0.005"
    echo "smat-lr$lr-t4-seed$seed --seed $seed --set delta_lr=$lr --set inner_lr=0.004 --set teacher_lr=0.02"
  done
done | xargs -P "$JOBS" -L 1 bash -c 'select_run "$@"' _
