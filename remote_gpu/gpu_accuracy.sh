#!/usr/bin/env bash
# The SmolLM2-135M accuracy study on one GPU, in stages that each fit a 10-minute device call:
#   bash remote_gpu/gpu_accuracy.sh STAGE     (STAGE: baseline | rank | sweep | headline | rest | chains | explore | planner | pack)
# headline / rest: the issue-18 re-run with today's defaults (calib=auto: 128 x 2048 on CUDA, HG scored after
# B2B, every strategy incl. logit distillation); FRACTIONS= and STRATEGIES= split them across device calls.
# Needs: source remote_gpu/device_setup.sh done by this script; the GGUF at $SMOL (default below).
set -euo pipefail
cd "$(dirname "$0")/.."
source remote_gpu/device_setup.sh
SMOL=${SMOL:-/root/smol/SmolLM2-135M-Instruct.Q4_1.gguf}
LIMIT=${LIMIT:-500}
M="model.path=$SMOL model.matmul_precision=${PRECISION:-highest} study.shared_dir=runs/shared"
spd() { python3 -m spd.cli "$@"; }
case "$1" in
  baseline)  # the dense model: full offline suite and WikiText-2 perplexity
    spd evaluate $M parallel.tp=1 'eval.tasks=[spd_offline,spd_wikitext]' eval.batch_size=64 hydra.run.dir=runs/smollm2_135m/dense/eval
    spd perplexity $M parallel.tp=1 hydra.run.dir=runs/smollm2_135m/dense/ppl ;;
  rank)  # zero-shot SPD at 25..100% chosen by each ranking, R = 3 and 9 (perplexity only)
    spd study -m $M parallel.tp=3,9 spd.ranking=backward,isolated spd.fraction=0.25,0.5,0.75,1.0 \
      study.strategy=zs study.evaluate=false study.export=false ;;
  sweep)  # R = 3: fraction x strategy with the offline suite (LIMIT docs per task)
    spd study -m $M parallel.tp=3 spd.ranking=backward spd.fraction=0,0.25,0.5,0.75,1.0 \
      study.strategy=zs,b2b,b2b_hg eval.limit=$LIMIT eval.batch_size=64 study.export=false ;;
  headline)  # fractions 0, 0.75, 1.0 x every strategy, full offline suite (no limit)
    spd study -m $M parallel.tp=3 spd.ranking=backward spd.fraction=${FRACTIONS:-0,0.75,1.0} \
      study.strategy=${STRATEGIES:-zs,b2b,b2b_hg,b2b_kd,b2b_hg_kd} eval.batch_size=64 study.export=false ;;
  rest)  # fractions 0.25, 0.5 x every strategy, 1000 documents per task
    spd study -m $M parallel.tp=3 spd.ranking=backward spd.fraction=${FRACTIONS:-0.25,0.5} \
      study.strategy=${STRATEGIES:-zs,b2b,b2b_hg,b2b_kd,b2b_hg_kd} eval.limit=1000 eval.batch_size=64 study.export=false ;;
  chains)  # one chain of jobs per strategy, all chains at once (a 135M model leaves most of the GPU idle in one
          # process; one process per job overflows its memory): per chain fractions in FRACTIONS order, the
          # headline ones (0, 0.75, 1.0) on the full suite, 0.25 and 0.5 at eval.limit=1000; fraction 0 only
          # as zs (no SPD block: every strategy is the dense model). UNTIL= seconds, then the jobs stop
          # (every stage resumes on the next call). Logs in runs/logs/.
    mkdir -p runs/logs
    deadline=$(( $(date +%s) + ${UNTIL:-3000} ))
    for s in ${STRATEGIES//,/ }; do
      ( for f in ${FRACTIONS//,/ }; do
          [ "$f" = 0 ] && [ "$s" != zs ] && continue
          case $f in 0.25|0.5) lim=eval.limit=1000 ;; *) lim= ;; esac
          left=$(( deadline - $(date +%s) )); [ $left -gt 10 ] || break
          OMP_NUM_THREADS=2 timeout $left python3 -m spd.cli study $M parallel.tp=3 spd.ranking=backward \
            spd.fraction=$f study.strategy=$s spd.rank_state_gb=24 eval.batch_size=64 study.export=false $lim \
            >> runs/logs/f$f-$s.log 2>&1 || echo "f$f-$s stopped (rc $?)" >> runs/logs/chains.log
        done ) &
    done
    wait ;;
  explore)  # issue 18's next settings (docs/distill.md, "The GPU re-run"): sequential B2B inputs and a longer,
           # faster KD, at 100% and 75% on the full suite, in runs/explore/ (not the sweep's folders: the report would list them as plain b2b_kd)
    mkdir -p runs/logs
    for f in 1.0 0.75; do
      OMP_NUM_THREADS=2 timeout ${UNTIL:-3000} python3 -m spd.cli study $M parallel.tp=3 spd.ranking=backward \
        spd.fraction=$f study.strategy=b2b_kd distill.inputs=sequential kd.steps=600 kd.lr=3e-5 \
        spd.rank_state_gb=24 eval.batch_size=64 study.export=false \
        hydra.run.dir=runs/explore/smollm2_135m/tp3/f$f-b2b_kd-sequential-kd600 >> runs/logs/explore-f$f.log 2>&1 &
    done
    wait ;;
  planner)  # every block distilled in both forms first (shared): with the exhaustive HG search (6 orderings a block at
            # R = 3, the identity among them) about 1.1 min a block on a shared H200, so the HG form of 30 blocks
            # was about 33 min (the identity is now loaded from the B2B form: 5 trainings a block);
            # HG_SEARCH=proxy trains 2 candidates a block (distill.hg_search; its own distillation key)
    # (the isolated block costs are measured once and reused by every budget: spd.planner.shared_isolated_costs)
    for b in 0.02 0.1 0.5; do spd plan $M parallel.tp=3 planner.budget=$b distill.hg_search=${HG_SEARCH:-full}; done ;;
  pack)
    tar czf "$OUT/runs.tgz" --exclude='*.safetensors' --exclude='activations-*' --exclude='activations' \
      --exclude='*.lock' runs ;;
esac
