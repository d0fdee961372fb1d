#!/usr/bin/env bash
# ISO on the 4-GPU machine (LLaMA-2-70B shape, random bf16 weights, R = 4, NVLink), about 100 s, at most 130:
#   1. prefill 2048 and 8192 tokens for base, iso, spd100, spd100+iso, nocomm (warm-up 3, 10 iterations);
#   2. one torch.profiler trace per variant of an 8192-token prefill on the same shape cut to 4 blocks,
#      and their compute/NCCL timeline (overlap/timeline.py).
# Here first (Hydra is not on the GPU machine), then carry runs/gpujobs:
#   python -m overlap.cli parallel.tp=4 run_dir=runs/gpujobs/iso 'bench.phases=[prefill]' \
#     'bench.tokens=[2048,8192]' 'bench.variants=[base,iso,spd100,spd100+iso,nocomm]' bench.iters=10 ++extra.dry_run=true
# There:  bash scripts/gpu_iso.sh      (device tool: kind nvidia-h200-x4, carry runs/gpujobs)
# $OUT gets: iso_bench.jsonl (this run's records, schema spd.bench/1), timeline.png, timeline.json (busy,
# overlapped and exposed comm ms per variant), traces.tgz (the chrome traces), log.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device_setup.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
# NCCL's own stream at high priority: its kernels start as soon as SMs free up instead of queueing behind
# the other piece's GEMM blocks (all variants of the job run with it, base included).
export TORCH_NCCL_HIGH_PRIORITY=1
OUT=${OUT:-runs/gpu_iso_out}
JOB=${JOB:-runs/gpujobs/iso/job.json}  # JOB=<a tiny gloo job> NPROC=2 checks this script on a CPU
RECS=$(python3 -c "import json; print(json.load(open('$JOB'))['out'])")
PROF=runs/iso_profile
mkdir -p "$OUT" "$(dirname "$RECS")" && touch "$RECS"
before=$(wc -l < "$RECS")
worker="python3 -m torch.distributed.run --standalone --nproc-per-node ${NPROC:-4} -m overlap.bench --job $JOB"
{
  nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
  echo "== benchmark $(date +%T)"
  timeout -k 5 85 $worker || echo "benchmark exit $?"  # records are appended one by one: a timeout keeps the finished ones
  tail -n +"$((before + 1))" "$RECS" > "$OUT/iso_bench.jsonl"
  echo "== profile $(date +%T)"
  timeout -k 5 35 $worker --profile "$PROF" --layers 4 || echo "profile exit $?"
  echo "== done $(date +%T)"
} 2>&1 | tee "$OUT/log.txt"
cp "$PROF"/timeline.png "$PROF"/timeline.json "$OUT"/ 2>/dev/null
tar czf "$OUT/traces.tgz" -C "$PROF" --exclude='timeline.*' . 2>/dev/null
ls -l "$OUT"
