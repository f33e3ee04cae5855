#!/usr/bin/env bash
# Reruns every experiment behind docs/results.md on the embedded benchmark (CPU profile).
#
#   bash benchmarks/reproduce_results.sh                       # OUT=runs/results, 2 jobs at a time
#   python benchmarks/results_tables.py runs/results           # the tables of docs/results.md
#
# 1. main: PMF and SMAT (τ = 0.9, 8 experts), seeds 0, 1, 2. Each run ends with train.py's own test:
#    600 seeded episodes per domain (the same for every run), SMAT or PMF beside Pre on them.
# 2. sparsity sweep: SMAT at τ = 0.5, 0.7, 0.95 (τ = 0.9 is the main runs), seeds 0, 1, 2, tested on
#    the first SWEEP_EPISODES of those episodes.
# 3. ablations, 3 seeds each: SMAT without the KL to the frozen model, without the teacher, and PMF
#    with δ lr 0.02; tested like the sweep.
# 4. real glyphs: a tree of real font renderings (benchmarks/make_glyph_check.py, never seen in
#    pretraining or meta-training) as OOD test domains for every run of 1, 2 and 3, GLYPH_EPISODES per
#    domain, written to $OUT/glyphs/<run>/ (the runs' own results stay untouched).
# 5. full fine-tuning [SMAT §5.2]: PMF and SMAT of each seed of 1, and Pre, each fine-tuned on every
#    test episode's support set (lr chosen per domain on validation episodes), on the first
#    FINETUNE_EPISODES test episodes per domain, written to $OUT/finetune/<run>/.
# 6. the same on the real glyphs of 4, into $OUT/glyphs-finetune/<run>/. The glyph domains have no
#    validation classes, so the lr is given: GLYPH_FINETUNE_LR, the lr that step 5's validation
#    episodes chose pooled over the embedded domains (pooled_lr in its results: 1e-4 for Pre and for
#    5 of the 6 runs).
# Rerunning skips finished runs and evaluations.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/results}
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-python}
SWEEP_EPISODES=${SWEEP_EPISODES:-200}
GLYPH_EPISODES=${GLYPH_EPISODES:-600}
FINETUNE_EPISODES=${FINETUNE_EPISODES:-100}
GLYPH_FINETUNE_LR=${GLYPH_FINETUNE_LR:-0.0001}
SEEDS=${SEEDS:-"0 1 2"}
# one thread per job: 2 jobs fill 2 cores without contention; wide tables in the logs
export OMP_NUM_THREADS=1 JAXTYPING_DISABLE=1 COLUMNS=200
mkdir -p "$OUT"

train() {  # train NAME FLAGS...: one run with its final test, skipped when it finished before
  local name=$1; shift
  [ -f "$OUT/$name/.done" ] && return 0
  rm -rf "${OUT:?}/$name"
  "$PYTHON" train.py --out "$OUT/$name" --no-check-shapes "$@" > "$OUT/$name.log" 2>&1
  touch "$OUT/$name/.done"
}
glyphs() {  # glyphs RUN: the run on the real-glyph domains, results in $OUT/glyphs/RUN/
  local run=$1
  compgen -G "$OUT/glyphs/$run/results-zeroshot-*.json" > /dev/null && return 0
  "$PYTHON" evaluate.py "$OUT/$run" --data "folder:$OUT/glyph_check@ood" --episodes "$GLYPH_EPISODES" \
    --out "$OUT/glyphs" > "$OUT/glyphs-$run.log" 2>&1
}
finetune() {  # finetune SEED: PMF and SMAT of the seed (and Pre) fine-tuned, results in $OUT/finetune/<run>/
  local seed=$1
  compgen -G "$OUT/finetune/smat-seed$seed/results-full-*.json" > /dev/null && return 0
  "$PYTHON" evaluate.py "$OUT/pmf-seed$seed" "$OUT/smat-seed$seed" --finetune full \
    --test-episodes "$FINETUNE_EPISODES" --out "$OUT/finetune" > "$OUT/finetune-seed$seed.log" 2>&1
}
glyphs_finetune() {  # glyphs_finetune SEED: step 5 on the real glyphs, results in $OUT/glyphs-finetune/<run>/
  local seed=$1
  compgen -G "$OUT/glyphs-finetune/smat-seed$seed/results-full-*.json" > /dev/null && return 0
  "$PYTHON" evaluate.py "$OUT/pmf-seed$seed" "$OUT/smat-seed$seed" --data "folder:$OUT/glyph_check@ood" \
    --finetune full --finetune-lr "$GLYPH_FINETUNE_LR" --test-episodes "$FINETUNE_EPISODES" \
    --out "$OUT/glyphs-finetune" > "$OUT/glyphs-finetune-seed$seed.log" 2>&1
}
export -f train glyphs finetune glyphs_finetune
export OUT PYTHON GLYPH_EPISODES FINETUNE_EPISODES GLYPH_FINETUNE_LR

{
  for seed in $SEEDS; do
    echo "pmf-seed$seed --method pmf --experts 1 --seed $seed"
    echo "smat-seed$seed --sparsity 0.9 --experts 8 --seed $seed"
  done
  for seed in $SEEDS; do
    for tau in 0.5 0.7 0.95; do
      echo "smat-s$tau-seed$seed --sparsity $tau --experts 8 --seed $seed --test-episodes $SWEEP_EPISODES"
    done
  done
  for seed in $SEEDS; do  # ablations
    echo "smat-nokl-seed$seed --sparsity 0.9 --experts 8 --seed $seed --no-kl-to-pretrained --test-episodes $SWEEP_EPISODES"
    echo "smat-noteacher-seed$seed --sparsity 0.9 --experts 8 --seed $seed --no-teacher --test-episodes $SWEEP_EPISODES"
    echo "pmf-lr0.02-seed$seed --method pmf --experts 1 --seed $seed --set delta_lr=0.02 --test-episodes $SWEEP_EPISODES"
  done
} | xargs -P "$JOBS" -L 1 bash -c 'train "$@"' _

[ -d "$OUT/glyph_check" ] || "$PYTHON" benchmarks/make_glyph_check.py "$OUT/glyph_check"
{
  for seed in $SEEDS; do
    echo "pmf-seed$seed"; echo "smat-seed$seed"
    for tau in 0.5 0.7 0.95; do echo "smat-s$tau-seed$seed"; done
    echo "smat-nokl-seed$seed"; echo "smat-noteacher-seed$seed"; echo "pmf-lr0.02-seed$seed"
  done
} | xargs -P "$JOBS" -L 1 bash -c 'glyphs "$@"' _
for seed in $SEEDS; do echo "$seed"; done | xargs -P "$JOBS" -L 1 bash -c 'finetune "$@"' _
for seed in $SEEDS; do echo "$seed"; done | xargs -P "$JOBS" -L 1 bash -c 'glyphs_finetune "$@"' _
echo "runs: $OUT/<run>/results.json; real glyphs: $OUT/glyphs/<run>/results-zeroshot-*.json;"\
  "fine-tuned: $OUT/finetune/<run>/ and $OUT/glyphs-finetune/<run>/results-full-*.json"
