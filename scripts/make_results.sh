#!/usr/bin/env bash
# Regenerate the study reports and their plots from committed run artifacts and bench records
# (docs/benchmarks/*.jsonl); reads nothing else:
#   docs/results/report.md                  the current study (docs/results/runs)
#   docs/results/archive/calib16x512/...     the earlier study at 16 x 512 calibration (its runs/ beside it)
set -euo pipefail
cd "$(dirname "$0")/.."
for out in docs/results docs/results/archive/calib16x512; do
  R=$out/runs
  python -m spd.cli report report.out_dir=$out "report.studies=[$R/study/*/*/*/study.json]" \
    "report.rankings=[$R/shared/*/*/rank-*/sensitivity.json]" "report.planners=[$R/*/*/planner-*/planner.json]" \
    "report.baselines=[$R/*/dense/eval/summary.json,$R/*/dense/ppl/perplexity.json]"
done
