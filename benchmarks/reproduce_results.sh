#!/usr/bin/env bash
# Reruns every experiment behind docs/results.md on the embedded benchmark (CPU profile).
#
#   bash benchmarks/reproduce_results.sh                       # OUT=runs/results, 2 jobs at a time
#   python benchmarks/results_tables.py runs/results           # every table of docs/results.md
#
# 0. selection: the lrs of the CPU profile and of Config.pmf(), chosen on ID validation classes only
#    (benchmarks/select_lr.sh, into $OUT/select/); the defaults below are its choice.
# 1. main: PMF and SMAT (τ = 0.9, 8 experts) at their defaults, SEEDS. Each run ends with train.py's own
#    test: 600 seeded episodes per domain (the same for every run), the model beside Pre on them.
# 2. real glyphs (benchmarks/make_glyph_check.py, never seen in pretraining or meta-training) in both
#    polarities, dark ink on white as built and the same images inverted, as OOD test domains of every
#    main run: GLYPH_EPISODES per domain, into $OUT/glyphs-results/<run>/ and
#    $OUT/glyphs-inverted-results/<run>/.
# 3. δ scaling: every main run with its δ scaled by 0.25, 0.5, 1, 1.5, and each PMF run also at the
#    update norm of the SMAT run of its seed (benchmarks/delta_scaling.py), DELTA_EPISODES per domain;
#    and polarity: every main run and Pre on the embedded OOD domains with each image inverted
#    (benchmarks/polarity_check.py), GLYPH_EPISODES per domain.
# 4. ablations, SWEEP_SEEDS: SMAT without the dense teacher (--no-teacher) and without the KD to the
#    frozen model (--no-kl-to-pretrained), one switch each; tested on SWEEP_EPISODES per domain.
# 5. sparsity sweep: SMAT at τ in TAUS (τ = 0.9 is the main runs), SWEEP_SEEDS, 8 experts.
# 6. expert sweep: SMAT with M in EXPERTS (M = 8 is the main runs), SWEEP_SEEDS, τ = 0.9.
#    4-6 share one queue, most informative first (--no-teacher, τ 0.5, M 1, τ 0, --no-kl-to-pretrained,
#    τ 0.95, M 16, then the rest), all sweep seeds of one setting before the next.
# 7. (FINETUNE=1) full fine-tuning [M5.2] of PMF, SMAT and Pre of each seed of 1 on the first
#    FINETUNE_EPISODES test episodes per domain, lr chosen per domain on validation episodes, into
#    $OUT/finetune/<run>/: about 25 minutes a seed on 2 cores.
# Every test episode is shared by every run (episode seed 0; shorter tests are prefixes), so every
# comparison is paired. Rerunning skips finished runs and evaluations.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/results}
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-python}
SEEDS=${SEEDS:-"0 1 2"}
SWEEP_SEEDS=${SWEEP_SEEDS:-"0 1 2"}
TAUS=${TAUS:-"0 0.3 0.5 0.7 0.95"}
EXPERTS=${EXPERTS:-"1 2 4 16"}
SWEEP_EPISODES=${SWEEP_EPISODES:-200}
GLYPH_EPISODES=${GLYPH_EPISODES:-300}
DELTA_EPISODES=${DELTA_EPISODES:-100}
FINETUNE_EPISODES=${FINETUNE_EPISODES:-100}
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
glyphs() {  # glyphs FOLDER RUN: the run on the real-glyph tree FOLDER, results in $OUT/FOLDER-results/RUN/
  local tree=$1 run=$2
  compgen -G "$OUT/$tree-results/$run/results-zeroshot-*.json" > /dev/null && return 0
  "$PYTHON" evaluate.py "$OUT/$run" --data "folder:$OUT/$tree@ood" --episodes "$GLYPH_EPISODES" \
    --out "$OUT/$tree-results" > "$OUT/$tree-$run.log" 2>&1
}
scale() {  # scale RUN [FLAGS]: benchmarks/delta_scaling.py on the run
  local run=$1; shift
  [ -f "$OUT/$run/delta-scaling-${DELTA_EPISODES}ep.json" ] && return 0
  "$PYTHON" benchmarks/delta_scaling.py "$OUT/$run" --episodes "$DELTA_EPISODES" "$@" > "$OUT/scale-$run.log" 2>&1
}
polarity() {  # polarity RUN: benchmarks/polarity_check.py on the run
  local run=$1
  [ -f "$OUT/$run/polarity-inverted-${GLYPH_EPISODES}ep.json" ] && return 0
  "$PYTHON" benchmarks/polarity_check.py "$OUT/$run" --episodes "$GLYPH_EPISODES" > "$OUT/polarity-$run.log" 2>&1
}
finetune() {  # finetune SEED: PMF and SMAT of the seed (and Pre) fine-tuned, results in $OUT/finetune/<run>/
  local seed=$1
  compgen -G "$OUT/finetune/smat-seed$seed/results-full-*.json" > /dev/null && return 0
  "$PYTHON" evaluate.py "$OUT/pmf-seed$seed" "$OUT/smat-seed$seed" --finetune full \
    --test-episodes "$FINETUNE_EPISODES" --out "$OUT/finetune" > "$OUT/finetune-seed$seed.log" 2>&1
}
export -f train glyphs scale polarity finetune
export OUT PYTHON GLYPH_EPISODES DELTA_EPISODES FINETUNE_EPISODES
parallel() { xargs -P "$JOBS" -L 1 bash -c '"$@"' _; }

OUT="$OUT/select" JOBS="$JOBS" PYTHON="$PYTHON" bash benchmarks/select_lr.sh                 # 0
for seed in $SEEDS; do                                                                      # 1
  echo "train pmf-seed$seed --method pmf --experts 1 --seed $seed"
  echo "train smat-seed$seed --sparsity 0.9 --experts 8 --seed $seed"
done | parallel
[ -d "$OUT/glyphs" ] || "$PYTHON" benchmarks/make_glyph_check.py "$OUT/glyphs"               # 2
[ -d "$OUT/glyphs-inverted" ] || "$PYTHON" benchmarks/make_glyph_check.py "$OUT/glyphs-inverted" --polarity light-on-dark
{
  for seed in $SEEDS; do
    for tree in glyphs glyphs-inverted; do echo "glyphs $tree pmf-seed$seed"; echo "glyphs $tree smat-seed$seed"; done
    echo "scale smat-seed$seed"; echo "scale pmf-seed$seed --norm-of $OUT/smat-seed$seed"    # 3
    echo "polarity smat-seed$seed"; echo "polarity pmf-seed$seed"
  done
  # 4-6, most informative first (each for every sweep seed), so a run cut short keeps paired seeds
  sweep=(noteacher "s0.5" m1 s0 nokl s0.95 m16)
  for tau in $TAUS; do [[ " ${sweep[*]} " == *" s$tau "* ]] || sweep+=("s$tau"); done
  for m in $EXPERTS; do [[ " ${sweep[*]} " == *" m$m "* ]] || sweep+=("m$m"); done
  for item in "${sweep[@]}"; do
    case $item in
      s*) [[ " $TAUS " == *" ${item#s} "* ]] || continue ;;
      m*) [[ " $EXPERTS " == *" ${item#m} "* ]] || continue ;;
    esac
    for seed in $SWEEP_SEEDS; do
      case $item in
        noteacher) echo "train smat-noteacher-seed$seed --seed $seed --no-teacher --test-episodes $SWEEP_EPISODES" ;;
        nokl) echo "train smat-nokl-seed$seed --seed $seed --no-kl-to-pretrained --test-episodes $SWEEP_EPISODES" ;;
        s*) echo "train smat-$item-seed$seed --sparsity ${item#s} --experts 8 --seed $seed --test-episodes $SWEEP_EPISODES" ;;
        m*) echo "train smat-$item-seed$seed --sparsity 0.9 --experts ${item#m} --seed $seed --test-episodes $SWEEP_EPISODES" ;;
      esac
    done
  done
} | parallel
if [ "${FINETUNE:-0}" = 1 ]; then for seed in $SEEDS; do echo "finetune $seed"; done | parallel; fi   # 7
echo "runs: $OUT/<run>/results.json; real glyphs: $OUT/glyphs-results/<run>/ and $OUT/glyphs-inverted-results/<run>/;"\
  "δ scaling and polarity: $OUT/<run>/delta-scaling-${DELTA_EPISODES}ep.json, polarity-inverted-*.json;"\
  "selection: $OUT/select/"
