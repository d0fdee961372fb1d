#!/usr/bin/env bash
# The spd-bench job files of the recorded GPU runs (docs/benchmarks/spd_bench.md, iso.md, kernels.md), made here
# (Hydra is not on the GPU machine) into runs/gpujobs/<name>/job.json; run them there with remote_gpu/gpu_jobs.sh:
#   bash remote_gpu/make_gpu_jobs.sh
#   # device tool, kind nvidia-h200-x4, carry [.whl, runs/gpujobs]:
#   export SPD_COMMIT=<commit>; source remote_gpu/gpu_jobs.sh && bench runs/gpujobs/dec_fused 45 && ...
# Records go to runs/gpu/<name>.jsonl there, and to $OUT/records.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
mk() {
  local name=$1
  shift
  rm -rf "runs/gpujobs/$name"
  python -m overlap.cli hydra.run.dir="runs/gpujobs/$name" bench.out="runs/gpu/$name.jsonl" bench.dry_run=true "$@" > /dev/null
}
DEC=(bench.phases=[decode] bench.batches=[1,16] bench.variants=[base,spd100,nocomm] bench.iters=15 bench.warmup=3)
PRE=(bench.phases=[prefill] bench.iters=10 bench.warmup=2)
# decode, R = 4: plain, fused elementwise kernels, and the fused GEMM + all-reduce impls (overlap.kernels)
mk dec_nccl parallel.tp=4 "${DEC[@]}" bench.fuse=false  # the unfused (eager) rows
mk dec_fused parallel.tp=4 "${DEC[@]}" bench.fuse=true
mk dec_symm parallel.tp=4 "${DEC[@]}" bench.fuse=true bench.impl=symm_mem
mk dec_triton parallel.tp=4 "${DEC[@]}" bench.fuse=true bench.impl=triton
# prefill, R = 4: every SPD share, ISO with NCCL thread blocks capped (c) and cuBLAS SM carve-out (s)
mk pre_fused parallel.tp=4 "${PRE[@]}" 'bench.tokens=[512,2048,8192]' \
  'bench.variants=[base,spd25,spd50,spd75,spd100,nocomm,iso,spd100+iso]' bench.fuse=true \
  'bench.iso_ctas=[null,2,8]' 'bench.iso_sm_carveout=[null,16]'
mk pre_nccl parallel.tp=4 "${PRE[@]}" 'bench.tokens=[2048,8192]' 'bench.variants=[base,nocomm,iso]' bench.fuse=false
mk pre_iso2 parallel.tp=4 "${PRE[@]}" 'bench.tokens=[2048,8192]' 'bench.variants=[base,spd100,nocomm,iso,spd100+iso]' \
  bench.fuse=true 'bench.iso_ctas=[null,8]' 'bench.iso_sm_carveout=[null,16]'
mk pre_nop2p parallel.tp=4 parallel=nop2p bench.phases=[prefill] bench.iters=8 bench.warmup=2 'bench.tokens=[2048,8192]' \
  'bench.variants=[base,spd100,nocomm,iso,spd100+iso]' bench.fuse=true
mk pre_triton parallel.tp=4 "${PRE[@]}" 'bench.tokens=[2048,8192]' 'bench.variants=[base,spd100]' bench.fuse=true \
  bench.impl=triton
# R = 2 and R = 1 (LLaMA-2-70B in bf16 is 129 GiB: R = 1 fits one H200 at batch 1 only)
mk r2_nvlink parallel.tp=2 'bench.tokens=[512,2048,8192]' 'bench.batches=[1,16]' bench.iters=8 bench.warmup=2 \
  'bench.variants=[base,spd25,spd50,spd75,spd100,nocomm,iso,spd100+iso]' bench.fuse=true
mk r1 parallel.tp=1 'bench.tokens=[512,2048,8192]' 'bench.batches=[1]' 'bench.variants=[base]' bench.iters=10 \
  bench.warmup=2 bench.fuse=true
# not run yet: the whole decode step torch.compile'd (graphs after), ISO with the fused impls, R = 2 without P2P
mk dec_compile parallel.tp=4 "${DEC[@]}" bench.compile=true bench.fuse=false
mk pre_iso_triton parallel.tp=4 "${PRE[@]}" 'bench.tokens=[2048,8192]' 'bench.variants=[base,spd100,iso,spd100+iso]' \
  bench.fuse=true bench.impl=triton
mk pre_iso_symm parallel.tp=4 "${PRE[@]}" 'bench.tokens=[2048,8192]' 'bench.variants=[base,spd100,iso,spd100+iso]' \
  bench.fuse=true bench.impl=symm_mem
mk r2_nop2p parallel.tp=2 parallel=nop2p 'bench.tokens=[2048]' 'bench.batches=[16]' 'bench.variants=[base,spd100,nocomm]' \
  bench.iters=10 bench.warmup=2 bench.fuse=true
# one rank's shard alone on one GPU (kind nvidia-h200 is enough): nocomm at R = 4 and 8, decode attention A/B
V=(parallel.tp=1 'bench.variants=[nocomm]' bench.fuse=true)
D=('bench.phases=[decode]' 'bench.batches=[1,16]' bench.iters=15 bench.warmup=3)
# the step before PDL (and before SwiGLU in the GEMV became the default): the A/B reference
mk v4_dec "${V[@]}" bench.virtual_tp=4 "${D[@]}" bench.pdl=false bench.swiglu_gemv=false
mk v4_dec_nok "${V[@]}" bench.virtual_tp=4 "${D[@]}" bench.decode_kernel=false
# issue 16: the norm + GEMV (+ SwiGLU) kernel (overlap/kernels/norm_gemv.py) against v4_dec / v8_all in the same call
mk v4_dec_ng "${V[@]}" bench.virtual_tp=4 "${D[@]}" bench.norm_gemv=true
mk v8_dec_ng "${V[@]}" bench.virtual_tp=8 "${D[@]}" bench.norm_gemv=true
mk v8_dec "${V[@]}" bench.virtual_tp=8 "${D[@]}" bench.pdl=false bench.swiglu_gemv=false
# issue 16's decode A/B jobs, each against v4_dec / v8_dec (bench.pdl=false) or v{R}_dec_pdl in the same call:
# programmatic dependent launch (pdl) and SwiGLU in the epilogue of w13's GEMV (sg; the default since fcc40a1, so
# v{R}_dec_pdl_sg is v{R}_dec_pdl, kept by the name its records carry; nosg: without it, the default before)
for r in 4 8; do
  mk "v${r}_dec_sg" "${V[@]}" bench.virtual_tp=$r "${D[@]}" bench.pdl=false bench.swiglu_gemv=true
  mk "v${r}_dec_pdl" "${V[@]}" bench.virtual_tp=$r "${D[@]}" bench.pdl=true
  mk "v${r}_dec_pdl_sg" "${V[@]}" bench.virtual_tp=$r "${D[@]}" bench.pdl=true bench.swiglu_gemv=true
  mk "v${r}_dec_pdl_nosg" "${V[@]}" bench.virtual_tp=$r "${D[@]}" bench.pdl=true bench.swiglu_gemv=false
  mk "v${r}_dec_nost" "${V[@]}" bench.virtual_tp=$r "${D[@]}" bench.pdl=true bench.stream_gemv=false  # no shared-memory weight ring
  mk "v${r}_dec_pdl_ng" "${V[@]}" bench.virtual_tp=$r "${D[@]}" bench.pdl=true bench.norm_gemv=true  # batch 16's
  # norms in wqkv's and w13's GEMV (norm_gemv; batch 1 folds them into stream_gemv either way)
done
# the headline table of docs/benchmarks/spd_bench.md: ours against transformers' compiled model, R = 4 and 8
for r in 4 8; do
  mk "v${r}_peer" parallel.tp=1 'bench.variants=[nocomm,hf_compile]' bench.fuse=true bench.virtual_tp=$r \
    'bench.tokens=[2048,8192]' 'bench.batches=[1,16]' bench.iters=15 bench.warmup=3
done
mk v4_pre "${V[@]}" bench.virtual_tp=4 'bench.phases=[prefill]' 'bench.tokens=[2048,8192]' bench.iters=10 bench.warmup=2
mk v8_pre "${V[@]}" bench.virtual_tp=8 'bench.phases=[prefill]' 'bench.tokens=[2048,8192]' bench.iters=15 bench.warmup=3
# the same, captured in CUDA graphs (eager R = 8 prefill 2048 launches at the host's pace: host_ms 64 of 63 ms)
mk v8_pre_graph "${V[@]}" bench.virtual_tp=8 'bench.phases=[prefill]' 'bench.tokens=[2048,8192]' bench.iters=15 bench.warmup=3 \
  bench.prefill_graphs=true
mk v4_prof "${V[@]}" bench.virtual_tp=4 'bench.phases=[decode]' 'bench.batches=[1]'
mk v8_all "${V[@]}" bench.virtual_tp=8 'bench.tokens=[2048,8192]' 'bench.batches=[1,16]' bench.iters=10 bench.warmup=3
# profiles: decode steps (8 blocks) and an 8192-token ISO prefill (4 blocks)
mk prof_dec parallel.tp=4 'bench.phases=[decode]' 'bench.batches=[1]' 'bench.variants=[base,nocomm]' bench.fuse=false
mk prof_dec_fused parallel.tp=4 'bench.phases=[decode]' 'bench.batches=[1]' 'bench.variants=[base,nocomm]' bench.fuse=true
mk prof_iso parallel.tp=4 'bench.phases=[prefill]' 'bench.tokens=[8192]' 'bench.variants=[base,iso,spd100+iso,nocomm]' \
  bench.fuse=true 'bench.iso_ctas=[8]' 'bench.iso_sm_carveout=[16]'
ls runs/gpujobs
