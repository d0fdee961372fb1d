#!/usr/bin/env bash
# Regenerate docs/results/report.md and its plots from the committed run artifacts (docs/results/runs)
# and the committed bench records (docs/benchmarks/*.jsonl). Reads nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
R=docs/results/runs
python -m spd.cli report report.out_dir=docs/results "report.studies=[$R/study/*/*/*/study.json]" \
  "report.rankings=[$R/shared/*/*/rank-*/sensitivity.json]" "report.planners=[$R/*/*/planner-*/planner.json]" \
  "report.baselines=[$R/*/dense/eval/summary.json,$R/*/dense/ppl/perplexity.json]"
