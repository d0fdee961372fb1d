#!/usr/bin/env bash
# Fused GEMM + collective kernels on one 4-GPU box: correctness (--check), then the benchmark.
#
#   OUT=/some/dir bash scripts/run_kernel_bench.sh
#
# Writes under $OUT: kernel_check.jsonl + kernel_check.log (every op x impl vs its fp32 reference),
# kernels.jsonl + kernel_bench.log (schema spd.kernel_bench/1; append kernels.jsonl to
# docs/benchmarks/kernels.jsonl to keep it). About 3 minutes on 4x H200; each stage has a hard timeout,
# and records are written as they are measured, so a stage cut short still leaves its finished rows.
# Optional: NPROC (default 4), PYTHON (default python3), SPD_COMMIT (recorded when the copy has no .git).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the output directory}"
mkdir -p "$OUT"
# Never NVLink multicast (it can take the host's shared GPUs out of service): keep these set for every rank.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export SPD_COMMIT="${SPD_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
NPROC="${NPROC:-4}"
PY="${PYTHON:-python3}"

stage() {  # stage SECONDS NAME ARGS...: one torchrun of overlap.kernel_bench under a hard timeout
  local limit=$1 name=$2
  shift 2
  timeout --signal=TERM --kill-after=20 "$limit" \
    "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m overlap.kernel_bench "$@" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v '^\[check\].* PASS$' "$OUT/$name.log" | tail -n 60
  echo "== $name: exit $rc (log: $OUT/$name.log)"
  return $rc
}

"$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "gpus", torch.cuda.device_count())'
stage 130 kernel_check --check --out "$OUT/kernel_check.jsonl"
check_rc=$?
stage 150 kernel_bench --out "$OUT/kernels.jsonl"
bench_rc=$?
echo "== check exit $check_rc, bench exit $bench_rc; outputs in $OUT"
exit $(( check_rc != 0 || bench_rc != 0 ))
