#!/usr/bin/env bash
# Reruns every experiment behind docs/results.md on the embedded benchmark (CPU profile).
#
#   PYTHON=.venv/bin/python bash benchmarks/reproduce_results.sh     # OUT=runs/results, 2 jobs at a time
#
# Trains PMF, SMAT and the SMAT ablations (sparsity sweep, number of experts, no teacher, no KL to
# the pre-trained model, official noise-free masks), then evaluates them on the same seeded test
# episodes: the main table with TEST_EPISODES per domain (and Pre from the same θ_pre), the sweeps
# with SWEEP_EPISODES per domain, and full fine-tuning on FINETUNE_EPISODES per domain. Every
# evaluation's results.json is kept as $OUT/<table>/<run>.json. Rerunning skips finished runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/results}
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-python}
TEST_EPISODES=${TEST_EPISODES:-600}
SWEEP_EPISODES=${SWEEP_EPISODES:-200}
FINETUNE_EPISODES=${FINETUNE_EPISODES:-20}
# one thread per job: 2 jobs fill 2 cores without contention; wide tables in the logs
export OMP_NUM_THREADS=1 JAXTYPING_DISABLE=1 COLUMNS=160
mkdir -p "$OUT"

train() {  # train NAME FLAGS...: one run, skipped when it finished before
  local name=$1; shift
  [ -f "$OUT/$name/.done" ] && return 0
  rm -rf "${OUT:?}/$name"
  "$PYTHON" train.py --out "$OUT/$name" --no-evaluate --no-check-shapes "$@" > "$OUT/$name.log" 2>&1
  touch "$OUT/$name/.done"
}
evaluate() {  # evaluate TABLE EPISODES RUNS... FLAGS: one table -> $OUT/TABLE.log and $OUT/TABLE/<run>.json
  local table=$1 episodes=$2; shift 2
  "$PYTHON" evaluate.py "$@" --episodes "$episodes" > "$OUT/$table.log" 2>&1
  mkdir -p "$OUT/$table"
  for run in "$@"; do [ -f "$run/results.json" ] && cp "$run/results.json" "$OUT/$table/$(basename "$run").json"; done
  return 0
}
export -f train evaluate; export OUT PYTHON

# The first run pretrains the tiny ViT (cached); every other run reuses it.
train smat-s0.9 --sparsity 0.9 --experts 8
{
  echo "pmf --method pmf --experts 1"
  for s in 0.0 0.5 0.7 0.95; do echo "smat-s$s --sparsity $s --experts 8"; done
  for e in 1 4 16; do echo "smat-e$e --sparsity 0.9 --experts $e"; done
  echo "smat-no-teacher --sparsity 0.9 --experts 8 --no-teacher"
  echo "smat-no-kl --sparsity 0.9 --experts 8 --no-kl-pretrained"
  echo "smat-official-masks --sparsity 0.9 --experts 8 --mask-sampling official"
} | xargs -P "$JOBS" -L 1 bash -c 'train "$@"' _

# Evaluations, two at a time, never the same run directory in both (each writes results.json there).
R=$OUT
evaluate main "$TEST_EPISODES" "$R/pmf" "$R/smat-s0.9" --plots --cost &
evaluate experts "$SWEEP_EPISODES" "$R/smat-e1" "$R/smat-e4" "$R/smat-e16" --no-baselines &
wait
evaluate sparsity "$SWEEP_EPISODES" "$R/smat-s0.0" "$R/smat-s0.5" "$R/smat-s0.7" "$R/smat-s0.9" "$R/smat-s0.95" \
  --no-baselines --sweep-plot "$R/sparsity_sweep.png" &
evaluate ablations "$SWEEP_EPISODES" "$R/smat-no-teacher" "$R/smat-no-kl" "$R/smat-official-masks" "$R/pmf" \
  --no-baselines &
wait
evaluate finetune "$FINETUNE_EPISODES" "$R/pmf" "$R/smat-s0.9" --finetune full
mkdir -p docs/img
cp "$R/sparsity_sweep.png" docs/img/sparsity_sweep.png
for png in router_weights kept_fraction mask_overlap; do cp "$R/smat-s0.9/$png.png" "docs/img/$png.png"; done
echo "tables: $R/{main,sparsity,experts,ablations,finetune}.log; results: $R/<table>/<run>.json"
