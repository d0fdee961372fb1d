"""Latency benchmark worker: one (R, interconnect) job, run on every rank under torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node R -m overlap.bench --job job.json

(spd-bench writes job.json from the resolved Hydra config and starts this; see overlap/cli.py.) Each
rank builds its shard of a random-weight model of the configured shape directly on its device, then
times, for every variant, prefill of S tokens (batch 1, bench.tokens) and one decode step at batch B
(bench.batches) at position bench.context. Variants: base (2 syncs a block), spdNN (SPD on the last NN%
of blocks; which blocks does not matter for latency), iso and spdNN+iso (prefill in bench.iso_chunks
ISO pieces, overlap/iso.py; decode has no ISO, so these are not timed there), nocomm (no collectives:
wrong numbers, the lower bound), hf_tp (the same shape through transformers' own tensor
parallelism; GPU only) and hf_compile (transformers' LlamaForCausalLM of one rank's shard shape alone, StaticCache
+ torch.compile(mode="reduce-overhead") decode, eager prefill: the same work as nocomm; overlap/hf_compile.py). Warm-up is excluded; each iteration is timed with CUDA events (perf_counter on
CPU); rank 0 appends one JSON line per measurement (schema spd.bench/1) with the median and the
20th/80th percentiles. Job key impl (default "nccl"; symm_mem, triton: overlap.kernels) picks the
runtime's collective implementation for every variant (ISO's fused ops then run on its comm stream);
records carry it.
Every job first measures its device's copy bandwidth and matmul throughput (overlap/floors.py); each record
carries them and its floor (bytes over the copy rate or FLOPs over the matmul rate, the larger) and
floor_frac = floor / median.
Job key virtual_tp = R (with tp 1 and only the nocomm and hf_compile variants) times rank 0's shard of an R-way split on
one device: one rank's compute at degree R (what nocomm measures) without R devices; records say
virtual_tp.
Job key prefill_graphs (default false) captures each plain prefill in a CUDA graph and times its replays
(GPU, impl nccl; records: prefill_graphs).
Job key fuse (default false) runs RoPE, add + RMSNorm and SwiGLU as torch.compile'd kernels (GPU only;
records: fused); with it, decode attention runs as one Triton pass unless decode_kernel is false (records:
decode_kernel), and decode's wqkv and w13 GEMVs through overlap.kernels.norm_gemv unless triton_gemv is false
(records: triton_gemv); swiglu_gemv (default true) runs decode's SwiGLU in the epilogue of w13's GEMV for
2 to 16 rows (batch 1 folds it into stream_gemv's w13; records: swiglu_gemv); pdl (default true on GPUs of
compute capability >= 9) launches decode's kernels with programmatic dependent launch, wo and w2 through the
Triton GEMV too (records: pdl), and with it batch-1 decode's GEMVs through overlap.kernels.stream_gemv unless
stream_gemv is false (records: stream_gemv). ISO variants are timed
once per (iso_ctas, iso_sm_carveout) pair of the job's lists (default [null] each: NCCL's own thread-block
count, no carve-out; Runtime.set_iso_), recorded as such.

    ... -m overlap.bench --job job.json --profile DIR [--layers 4] [--phase prefill|decode]

instead traces, per variant, one prefill (the job's longest) or five decode steps (batch 1; CUDA-graph
replays when the job uses graphs, plus the same steps eager) of the same shape cut to a few blocks with
torch.profiler; rank 0 writes DIR/<variant>.trace.json and the timeline DIR/timeline.png (+ .json).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from overlap.bench_table import host_bound, spread, unsteady
from overlap.context import TPContext, init_tp, shutdown
from overlap.floors import ShardShape, Timed, floor_fields, host_launch_ms, measure_rates, times_ms
from overlap.model import ModelArgs
from overlap.runtime import Runtime
from overlap.tp import build_sharded, set_nocomm_, set_plan_, spd_share_plan
from spd.errors import SPDError
from spd.load import torch_dtype

SCHEMA = "spd.bench/1"
SEQ_ALIGN = 64  # cache lengths are rounded up to this: aligned attention masks, at most 63 masked extra positions
_SPD = re.compile(r"spd(\d{1,3})(\+iso)?$")
ISO_CHUNKS = 2  # default bench.iso_chunks: ISO's two pieces
PEERS = ("hf_tp", "hf_compile")  # transformers' models, timed after ours (overlap/hf_tp.py, overlap/hf_compile.py)
VIRTUAL_OK = ("nocomm", "hf_compile")  # what one rank's shard alone can time honestly (no communication)


def check_variants(variants) -> list[str]:
    """The variant names, validated: base, nocomm, hf_tp, hf_compile, spdNN (0 <= NN <= 100), iso or spdNN+iso."""
    for v in variants:
        m = _SPD.match(v)
        if v not in ("base", "nocomm", *PEERS, "iso") and not (m and int(m.group(1)) <= 100):
            raise SPDError(f"unknown bench variant {v!r}; valid: base, nocomm, hf_tp, hf_compile, spd0..spd100 (e.g. spd25), "
                           f"iso, spd0+iso..spd100+iso (ISO prefill, e.g. spd100+iso)")
    return list(variants)


def check_impl(impl: str, variants) -> str:
    """The job's collective implementation, validated against overlap.kernels.IMPLS and the variants."""
    from overlap.kernels import IMPLS

    if impl not in IMPLS:
        raise SPDError(f"unknown collective impl {impl!r} (bench.impl); valid: {', '.join(IMPLS)}")
    return impl


def shard_context(job: dict, ctx: TPContext) -> TPContext:
    """The context the model is sharded for: ctx, or with job key virtual_tp = R > 1 on a single process,
    rank 0 of an R-way split with no process group (its sync points are identities): one rank's compute at
    degree R measured on one device, i.e. `nocomm` at R without R devices (only nocomm, and the hf_compile
    peer of the same shard, are then honest)."""
    R = check_virtual(job)
    return ctx if R == 1 else TPContext(rank=0, world_size=R, device=ctx.device)


def check_virtual(job: dict) -> int:
    """The job's virtual_tp (1: off), validated: it needs tp 1, only the nocomm (and hf_compile) variants and
    impl nccl."""
    R = int(job.get("virtual_tp") or 1)
    others = [v for v in job["bench"]["variants"] if v not in VIRTUAL_OK]
    if R < 1 or (R > 1 and (job.get("tp", 1) != 1 or others or job.get("impl", "nccl") != "nccl")):
        raise SPDError(f"bench.virtual_tp={R} times one rank's shard of a {R}-way split on one process, with no "
                       f"communication: it needs parallel.tp=1, bench.variants=[nocomm] (or [nocomm,hf_compile]: "
                       f"transformers' model of the same shard) and impl nccl (got tp="
                       f"{job.get('tp', 1)}, other variants {others}, impl {job.get('impl', 'nccl')})")
    return R


def is_iso(variant: str) -> bool:
    return variant == "iso" or variant.endswith("+iso")


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated q-th percentile (0..100) of xs."""
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def measure(fn, ctx: TPContext, warmup: int, iters: int) -> Timed:
    """Per-iteration milliseconds of fn() after warm-up; device events on CUDA, no host sync inside. Then, on
    CUDA, one more call timed on the host with the device idle (host_launch_ms: what launching one iteration
    costs the host; every rank makes that call, so collectives stay matched)."""
    for _ in range(warmup):
        fn()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    ctx.barrier()  # start together: a rank that is late would show up as another rank's comm time
    times = times_ms(fn, ctx.device, iters)
    return Timed(times, host_launch_ms(fn, ctx.device))


def apply_variant_(model, variant: str) -> int:
    """Set the model's SPD blocks and comm switch for a variant (ISO aside); returns the number of SPD blocks."""
    n = len(model.layers)
    m = _SPD.match(variant)
    plan = spd_share_plan(n, model.tp, int(m.group(1)) / 100) if m else None
    set_plan_(model, plan)
    set_nocomm_(model, variant == "nocomm")
    return len(plan.tiers) if plan else 0


def fuse_on(job: dict, ctx: TPContext) -> bool:
    """Fused elementwise kernels when asked for and on a GPU (torch.compile's CPU code is not timed here)."""
    return bool(job.get("fuse")) and ctx.device.type == "cuda"


def decode_kernel_on(job: dict, ctx: TPContext) -> bool:
    """The one-pass Triton decode attention (overlap.decode_attention) with the fused kernels, unless the job
    says decode_kernel: false (then fused_ops' compiled attention, the A/B reference)."""
    return fuse_on(job, ctx) and job.get("decode_kernel", True) is not False


def norm_gemv_on(job: dict, ctx: TPContext) -> bool:
    """Decode's norm + GEMV (+ SwiGLU) as one Triton kernel (overlap.kernels.norm_gemv), when the job asks
    for it (norm_gemv: true) with the fused kernels."""
    return fuse_on(job, ctx) and bool(job.get("norm_gemv"))


def triton_gemv_on(job: dict, ctx: TPContext) -> bool:
    """Decode's wqkv and w13 GEMVs through overlap.kernels.norm_gemv (no norm) instead of cuBLAS, when the job
    says triton_gemv (default true) with the fused kernels."""
    return fuse_on(job, ctx) and job.get("triton_gemv", True) is not False


def swiglu_gemv_on(job: dict, ctx: TPContext) -> bool:
    """Decode's SwiGLU in the epilogue of w13's GEMV (overlap.kernels.norm_gemv, swiglu) with the fused kernels,
    unless the job says swiglu_gemv: false (default true: batch 16 measured 0.17-0.19 ms faster at the R = 4 shard
    and 0.10 at R = 8 on an H200, docs/benchmarks/pdl.md)."""
    return fuse_on(job, ctx) and job.get("swiglu_gemv", True) is not False


def pdl_on(job: dict, ctx: TPContext) -> bool:
    """Decode's kernels launched with programmatic dependent launch (Runtime(pdl=True)) with the fused kernels
    and triton_gemv on a GPU that has it (compute capability >= 9), unless the job says pdl: false."""
    return (triton_gemv_on(job, ctx) and job.get("pdl", True) is not False
            and torch.cuda.get_device_capability(ctx.device)[0] >= 9)


def stream_gemv_on(job: dict, ctx: TPContext) -> bool:
    """Batch-1 decode GEMVs through overlap.kernels.stream_gemv (weight tiles into shared memory before the PDL
    wait) when PDL is on, unless the job says stream_gemv: false."""
    return pdl_on(job, ctx) and job.get("stream_gemv", True) is not False


def decode_kernels(job: dict, ctx: TPContext) -> dict:
    """The job's decode-kernel switches as Runtime takes them (and the records carry them); the prefill runtime
    takes fuse and prefill_graphs only."""
    return dict(decode_kernel=decode_kernel_on(job, ctx), norm_gemv=norm_gemv_on(job, ctx),
                triton_gemv=triton_gemv_on(job, ctx), swiglu_gemv=swiglu_gemv_on(job, ctx), pdl=pdl_on(job, ctx),
                stream_gemv=stream_gemv_on(job, ctx))


def prefill_graphs_on(job: dict, ctx: TPContext) -> bool:
    """Captured prefills (Runtime(prefill_graphs=True)) when the job says prefill_graphs, on a GPU with impl
    nccl; ISO variants stay eager (records: prefill_graphs)."""
    return bool(job.get("prefill_graphs")) and ctx.device.type == "cuda" and job.get("impl", "nccl") == "nccl"


def iso_settings(job: dict) -> list[tuple[int | None, int | None]]:
    """(max NCCL thread blocks, cuBLAS SM carve-out) pairs to time every ISO variant with."""
    return list(itertools.product(job.get("iso_ctas") or [None], job.get("iso_sm_carveout") or [None]))


def graphs_on(job: dict, ctx: TPContext) -> bool:
    """CUDA graphs for decode when asked for and on a GPU (bench.cuda_graphs is ignored on CPU)."""
    return bool(job.get("cuda_graphs")) and ctx.device.type == "cuda"


def _round_up(n: int, k: int = SEQ_ALIGN) -> int:
    return -(-n // k) * k


def _versions() -> dict:
    """torch, triton and transformers versions of the process (triton / transformers when importable)."""
    from importlib import metadata

    out = {"torch": torch.__version__}
    for name in ("triton", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


class Recorder:
    """Rank 0 appends one JSON line per measurement to the job's output file and echoes it."""

    def __init__(self, job: dict, ctx: TPContext, rates: dict | None = None):
        from spd.run import device_name, git_commit

        self.ctx, self.out, self.rates = ctx, Path(job["out"]), rates
        self.shape = ShardShape(ModelArgs.from_model_config(job["model"]), ctx.world_size)
        self.dtype_bytes = torch_dtype(job["model"].get("dtype", "bfloat16")).itemsize
        b = job["bench"]
        self.common = dict(schema=SCHEMA, model=job["model"].get("name", "?"), tp=ctx.world_size,
                           interconnect=job["interconnect"], dtype=job["model"].get("dtype", "bfloat16"),
                           virtual_tp=check_virtual(job) > 1,
                           warmup=b["warmup"], iters=b["iters"], cuda_graphs=graphs_on(job, ctx),
                           compile=bool(job.get("compile")), impl=job.get("impl", "nccl"), fused=fuse_on(job, ctx),
                           **decode_kernels(job, ctx), device=device_name(),
                           torch=torch.__version__, versions=_versions(), commit=git_commit(),
                           **({"command": job["command"]} if job.get("command") else {}), **(rates or {}))

    def __call__(self, times: list[float], **fields) -> None:
        if not self.ctx.is_main:
            return
        rec = dict(self.common, **fields, median_ms=round(percentile(times, 50), 4),
                   p20_ms=round(percentile(times, 20), 4), p80_ms=round(percentile(times, 80), 4),
                   time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if self.rates:
            rec.update(floor_fields(self.shape, self.rates, fields["phase"], fields["tokens"], fields["batch"],
                                    fields["context"], self.dtype_bytes, rec["median_ms"]))
        host = getattr(times, "host_ms", None)
        if host is not None:
            rec.update(host_ms=round(host, 4), host_frac=round(host / rec["median_ms"], 4))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        size = f"tokens={fields['tokens']}" if fields["phase"] == "prefill" else f"batch={fields['batch']}"
        floor = f", floor {rec['floor_ms']:.3f} ({rec['floor_bound']}), {100 * rec['floor_frac']:.0f}% of it" \
            if "floor_ms" in rec else ""
        print(f"[spd-bench] tp={self.ctx.world_size} {fields['phase']} {size} {fields['variant']}: "
              f"{rec['median_ms']:.3f} ms (p20 {rec['p20_ms']:.3f}, p80 {rec['p80_ms']:.3f}){floor}", flush=True)
        if host_bound(rec):
            print(f"[spd-bench] warning: launching one iteration took the host {rec['host_ms']:.3f} ms, "
                  f"{100 * rec['host_frac']:.0f}% of the {rec['median_ms']:.3f} ms measured: the device may have "
                  "waited for the host, so this time may be the host's launch path (a slow or busy CPU) rather "
                  "than the device's; CUDA graphs take the host out (bench.cuda_graphs for decode, "
                  "bench.prefill_graphs for prefill)", flush=True)
        if unsteady(rec):
            print(f"[spd-bench] warning: the timed runs disagree: p20 {rec['p20_ms']:.3f} ms, p80 {rec['p80_ms']:.3f}, "
                  f"a spread of {100 * spread(rec):.0f}% of the median: the "
                  "device's pace changed during the measurement (a busy or slow host, clocks, another process), so "
                  "repeat it; an eager prefill whose host_frac is near 1 follows the host's pace "
                  "(bench.prefill_graphs=true takes the host out)", flush=True)


def run_ours(job: dict, ctx: TPContext, record: Recorder) -> None:
    """Prefill and decode latency of every variant of this project's runtime."""
    b, seed = job["bench"], int(job["model"].get("seed", 0))
    variants = [v for v in b["variants"] if v not in PEERS]
    if not variants:
        return
    args = ModelArgs.from_model_config(job["model"])
    dtype = torch_dtype(job["model"].get("dtype", "bfloat16"))
    model = build_sharded(args, ctx, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    if "prefill" in b["phases"]:
        for S in b["tokens"]:
            rt = Runtime(model, ctx, 1, _round_up(S), cuda_graphs=False, impl=job.get("impl", "nccl"),
                         fuse=fuse_on(job, ctx), prefill_graphs=prefill_graphs_on(job, ctx))
            ids = torch.randint(0, args.vocab_size, (1, S), generator=gen).to(ctx.device)  # (1, S)
            for v in variants:
                spd = apply_variant_(model, v)
                rt.invalidate()  # a captured prefill follows the variant's sync points
                k = int(b.get("iso_chunks", ISO_CHUNKS)) if is_iso(v) else 1
                for ctas, carveout in iso_settings(job) if k > 1 else [(None, None)]:
                    if k > 1:
                        rt.set_iso_(ctas, carveout, high_priority=ctas is not None)
                    times = measure(lambda: rt.prefill(ids, last_only=True, iso=k), ctx, b["warmup"], b["iters"])
                    record(times, phase="prefill", tokens=S, batch=1, context=0, variant=v, spd_blocks=spd,
                           iso_chunks=k, iso_ctas=ctas, iso_sm_carveout=carveout,
                           prefill_graphs=rt.prefill_graphs and k == 1)
            del rt
    variants = [v for v in variants if not is_iso(v)]  # decode has one token a sequence: nothing to split
    if "decode" in b["phases"] and variants:
        context = int(b["context"])
        for B in b["batches"]:
            rt = Runtime(model, ctx, B, _round_up(context + 1), cuda_graphs=graphs_on(job, ctx),
                         compile=job.get("compile", False), impl=job.get("impl", "nccl"), fuse=fuse_on(job, ctx),
                         **decode_kernels(job, ctx))
            tok = torch.randint(0, args.vocab_size, (B, 1), generator=gen).to(ctx.device)  # (B, 1)

            def step():
                rt.pos = context  # every timed step decodes position `context` (cache length context + 1)
                rt.decode_one(tok)

            for v in variants:
                spd = apply_variant_(model, v)
                rt.invalidate()  # the captured graph follows the variant's sync points
                times = measure(step, ctx, b["warmup"], b["iters"])
                record(times, phase="decode", tokens=1, batch=B, context=context, variant=v, spd_blocks=spd,
                       iso_chunks=1)
            rt.invalidate()
            del rt
    del model
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def run_profile(job: dict, ctx: TPContext, out_dir: Path, layers: int,
                phase: str = "prefill") -> list[tuple[str, Path]]:
    """Traces per variant on the job's shape cut to `layers` blocks: one prefill (the longest of
    bench.tokens) or five decode steps at batch 1 (graph replays when the job uses CUDA graphs, and the
    same steps eager as '<variant>-eager').

    Rank 0 writes out_dir/<label>.trace.json (chrome traces; '+' becomes '-') and returns [(label,
    path)]; the other ranks run the same calls and return []. Warm-up excluded, as in the benchmark.
    """
    from torch.profiler import ProfilerActivity, profile

    if phase not in ("prefill", "decode"):
        raise SPDError(f"--phase must be prefill or decode, got {phase!r}")
    b, seed = job["bench"], int(job["model"].get("seed", 0))
    args = dataclasses.replace(ModelArgs.from_model_config(job["model"]), n_layers=layers)
    model = build_sharded(args, ctx, dtype=torch_dtype(job["model"].get("dtype", "bfloat16")), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    impl, fuse = job.get("impl", "nccl"), fuse_on(job, ctx)
    cuda = ctx.device.type == "cuda"
    runs = []  # (label, runtime, the traced call, iso setting or None)
    if phase == "prefill":
        S = max(b["tokens"])
        rt = Runtime(model, ctx, 1, _round_up(S), cuda_graphs=False, impl=impl, fuse=fuse)
        ids = torch.randint(0, args.vocab_size, (1, S), generator=gen).to(ctx.device)  # (1, S)
        k_iso = int(b.get("iso_chunks", ISO_CHUNKS))
        for v in [v for v in b["variants"] if v not in PEERS]:
            k = k_iso if is_iso(v) else 1
            iso = iso_settings(job)[0] if k > 1 else None  # the first (ctas, carve-out) setting
            runs.append((v, rt, lambda k=k: rt.prefill(ids, last_only=True, iso=k), iso))
    else:
        context = int(b["context"])
        tok = torch.randint(0, args.vocab_size, (1, 1), generator=gen).to(ctx.device)  # (1, 1)
        modes = [(True, ""), (False, "-eager")] if graphs_on(job, ctx) else [(False, "")]
        for graphs, suffix in modes:
            rt = Runtime(model, ctx, 1, _round_up(context + 1), cuda_graphs=graphs, impl=impl, fuse=fuse,
                         **decode_kernels(job, ctx))

            def steps(rt=rt):
                for _ in range(5):
                    rt.pos = context
                    rt.decode_one(tok)

            for v in [v for v in b["variants"] if v not in PEERS and not is_iso(v)]:
                runs.append((v + suffix, rt, steps, None))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out_dir.mkdir(parents=True, exist_ok=True)
    traces = []
    for label, rt, call, iso in runs:
        apply_variant_(model, label.removesuffix("-eager"))
        rt.invalidate()
        if iso is not None:
            rt.set_iso_(iso[0], iso[1], high_priority=iso[0] is not None)
        measure(call, ctx, max(1, b["warmup"]), 1)  # warm (and capture), in step
        with profile(activities=activities) as prof:
            call()
            if cuda:
                torch.cuda.synchronize(ctx.device)
        if ctx.is_main:
            path = out_dir / f"{label.replace('+', '-')}.trace.json"
            prof.export_chrome_trace(str(path))
            traces.append((label, path))
    return traces


def run_job(job: dict, profile_dir: Path | None = None, layers: int = 4, phase: str = "prefill") -> None:
    """One benchmark job on this rank (all ranks call it with the same job); profile_dir: trace instead."""
    check_variants(job["bench"]["variants"])
    check_impl(job.get("impl", "nccl"), job["bench"]["variants"])
    # The interconnect profile (overlap.cli.child_env) also when torchrun starts this module directly.
    if job.get("interconnect") == "nop2p":
        os.environ["NCCL_P2P_DISABLE"] = "1"
    elif job.get("interconnect") == "nvlink":
        os.environ.pop("NCCL_P2P_DISABLE", None)
    ctx = real = init_tp(job.get("backend", "auto"), float(job.get("timeout_s", 600)))
    try:
        torch.manual_seed(int(job["model"].get("seed", 0)))
        ctx = shard_context(job, ctx)  # the real one is shut down in `finally` either way
        if profile_dir is not None:
            traces = run_profile(job, ctx, profile_dir, layers, phase)
            if ctx.is_main:
                from overlap.timeline import report

                report(traces, profile_dir / "timeline.png")
            ctx.barrier()
            return
        rates = measure_rates(ctx.device, torch_dtype(job["model"].get("dtype", "bfloat16")))
        if ctx.is_main:
            print(f"[spd-bench] floors: copy {rates['copy_tbps']:.3f} TB/s (read + write), matmul "
                  f"{rates['matmul_tflops']:.1f} TFLOP/s burst, {rates['matmul_sustained_tflops']:.1f} sustained "
                  f"({rates['matmul_n']}^3 {rates['matmul_dtype']})", flush=True)
        record = Recorder(job, ctx, rates)
        run_ours(job, ctx, record)
        if "hf_compile" in job["bench"]["variants"]:
            from overlap.hf_compile import run_hf_compile

            run_hf_compile(job, ctx, record, measure)
        if "hf_tp" in job["bench"]["variants"]:
            if ctx.device.type != "cuda":
                if ctx.is_main:
                    print("[spd-bench] hf_tp skipped: transformers' tensor parallelism is timed on GPUs only")
            else:
                from overlap.hf_tp import run_hf_tp

                run_hf_tp(job, ctx, record, measure)
        ctx.barrier()
    finally:
        shutdown(real)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="spd-bench worker (start it through spd-bench or torchrun)")
    parser.add_argument("--job", required=True, help="job.json written by spd-bench")
    parser.add_argument("--profile", type=Path, help="trace one prefill per variant into this directory instead")
    parser.add_argument("--layers", type=int, default=4, help="blocks of the traced model (with --profile)")
    parser.add_argument("--phase", default="prefill", choices=("prefill", "decode"), help="what --profile traces")
    a = parser.parse_args(argv)
    run_job(json.loads(Path(a.job).read_text()), a.profile, a.layers, a.phase)


if __name__ == "__main__":
    sys.exit(main())
