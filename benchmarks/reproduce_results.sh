#!/usr/bin/env bash
# Reruns every experiment behind docs/results.md on the embedded benchmark (CPU profile).
#
#   bash benchmarks/reproduce_results.sh            # OUT=runs/results, 2 jobs at a time
#
# Trains PMF, SMAT and the SMAT ablations (sparsity sweep, number of experts, no teacher, no KL to
# the pre-trained model, official noise-free masks), then evaluates them on the same seeded test
# episodes: the main table with 600 episodes per domain (and Pre from the same θ_pre), the sweeps
# with SWEEP_EPISODES per domain, and full fine-tuning on FINETUNE_EPISODES per domain.
# On the 2-core sandbox this takes about an hour (docs/results.md has the measured times).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/results}
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-python}
TEST_EPISODES=${TEST_EPISODES:-600}
SWEEP_EPISODES=${SWEEP_EPISODES:-200}
FINETUNE_EPISODES=${FINETUNE_EPISODES:-20}
export OMP_NUM_THREADS=1 JAXTYPING_DISABLE=1  # one thread per job: 2 jobs fill 2 cores without contention
mkdir -p "$OUT"

train() {  # train NAME FLAGS...: one run, skipped when its checkpoint exists (rerunning resumes the script)
  local name=$1; shift
  [ -f "$OUT/$name/checkpoint.pt" ] && return 0
  "$PYTHON" train.py --out "$OUT/$name" --no-evaluate --no-check-shapes "$@" > "$OUT/$name.log" 2>&1
}
export -f train; export OUT PYTHON

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

evaluate() {  # evaluate TAG EPISODES RUNS... -> $OUT/TAG.log (the table) and results in each run dir
  local tag=$1 episodes=$2; shift 2
  "$PYTHON" evaluate.py "$@" --episodes "$episodes" > "$OUT/$tag.log" 2>&1
}
evaluate main "$TEST_EPISODES" "$OUT/pmf" "$OUT/smat-s0.9" --plots --cost
mkdir -p docs/img
cp "$OUT/smat-s0.9/results.json" "$OUT/main-smat.json"
for png in router_weights kept_fraction mask_overlap; do cp "$OUT/smat-s0.9/$png.png" "docs/img/$png.png"; done
evaluate sparsity "$SWEEP_EPISODES" "$OUT/smat-s0.0" "$OUT/smat-s0.5" "$OUT/smat-s0.7" "$OUT/smat-s0.9" \
  "$OUT/smat-s0.95" --no-baselines --sweep-plot docs/img/sparsity_sweep.png
evaluate experts "$SWEEP_EPISODES" "$OUT/smat-e1" "$OUT/smat-e4" "$OUT/smat-s0.9" "$OUT/smat-e16" --no-baselines
evaluate ablations "$SWEEP_EPISODES" "$OUT/smat-s0.9" "$OUT/smat-no-teacher" "$OUT/smat-no-kl" \
  "$OUT/smat-official-masks" "$OUT/pmf" --no-baselines
evaluate finetune "$FINETUNE_EPISODES" "$OUT/pmf" "$OUT/smat-s0.9" --finetune full
echo "tables: $OUT/{main,sparsity,experts,ablations,finetune}.log"
