"""Benchmark and correctness check of the fused GEMM + collective ops (overlap.kernels) at LLaMA-2-70B
tensor-parallel shapes. Run under torchrun; rank 0 prints and writes.

    torchrun --nproc-per-node 4 -m overlap.kernel_bench --out docs/benchmarks/kernels.jsonl
    torchrun --nproc-per-node 4 -m overlap.kernel_bench --check --out run/kernel_check.jsonl

Cases: row-parallel o (K = 8192/R, N = 8192) and down (K = 28672/R, N = 8192) as matmul_all_reduce
(M = 1, 16 decode, inside a CUDA graph of GRAPH_CALLS ops; M = 128..8192 prefill, eager) and
matmul_reduce_scatter (prefill); column-parallel qkv (K = 8192, N = 10240/R) and gate_up
(K = 8192, N = 57344/R) as all_gather_matmul (prefill; M counts the gathered rows). For every case:
the local GEMM alone (gemm_ms, the lower bound), then each impl. ECT = total - gemm;
overlap_efficiency = 1 - ECT(impl) / ECT(nccl), the Flux metric (nccl is GEMM then NCCL: 0 by
definition). Device-event timing of back-to-back calls after warm-up, queued behind a GPU sleep so
host launch overhead is not timed; median with p20/p80, the slowest rank's.

--check runs every op (plain and with add / residual / prologue, twice with fresh inputs, and decode
replayed from a CUDA graph) once per impl against the plain-torch fp32 reference beside each kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from overlap.context import init_tp, shutdown
from overlap.kernels import IMPLS, get_impl
from overlap.kernels import all_gather_matmul as agm
from overlap.kernels import gemv_all_reduce as gar
from overlap.kernels import matmul_reduce_scatter as mrs

SCHEMA, CHECK_SCHEMA = "spd.kernel_bench/1", "spd.kernel_check/1"
PREFILL_M, DECODE_M = (128, 1024, 4096, 8192), (1, 16)
CHECK_PREFILL_M, CHECK_DECODE_M = (128, 1024, 4096), (1, 5, 16)
TOL_REL = 2e-2  # bf16 keeps 8 mantissa bits: rounding partials once and the output once stays under 1% of the
#                 output's scale; 2% leaves room for bf16 reduction orders (NCCL rings round at every hop)
GRAPH_CALLS = 16  # decode ops per captured graph: per-op time = replay time / GRAPH_CALLS
BENCH_MAX_SPIN, CHECK_MAX_SPIN = 1 << 26, 1 << 24  # signal waits give up (and flag it) instead of hanging
SLEEP_CYCLES = 20_000_000  # ~10 ms GPU sleep queued first, so the host runs ahead of the timed calls
OPS = ("matmul_all_reduce", "matmul_reduce_scatter", "all_gather_matmul")


@dataclass(frozen=True)
class Case:
    op: str
    layer: str
    m: int  # rows of the full problem (all-gather: gathered rows)
    k: int  # GEMM inner dimension on this rank
    n: int  # GEMM output width on this rank
    decode: bool


def llama70b_layers(tp: int, dim: int = 8192, ffn: int = 28672, kv_dim: int = 1024) -> dict:
    """layer -> (parallel style, K, N) on one rank of tp."""
    return {"o": ("row", dim // tp, dim), "down": ("row", ffn // tp, dim),
            "qkv": ("col", dim, (dim + 2 * kv_dim) // tp), "gate_up": ("col", dim, 2 * ffn // tp)}


def make_cases(layers: dict, prefill_ms, decode_ms, ops=OPS) -> list[Case]:
    cases = []
    for layer, (style, k, n) in layers.items():
        if style == "row":
            if "matmul_all_reduce" in ops:
                cases += [Case("matmul_all_reduce", layer, m, k, n, True) for m in decode_ms]
                cases += [Case("matmul_all_reduce", layer, m, k, n, False) for m in prefill_ms]
            if "matmul_reduce_scatter" in ops:
                cases += [Case("matmul_reduce_scatter", layer, m, k, n, False) for m in prefill_ms]
        elif "all_gather_matmul" in ops:
            cases += [Case("all_gather_matmul", layer, m, k, n, False) for m in prefill_ms]
    return cases


def make_inputs(case: Case, ctx, seed: int, extras: bool = False) -> dict:
    """This rank's tensors for a case (bf16, values of order one; w scaled by K^-1/2)."""
    g = torch.Generator(device=ctx.device).manual_seed(seed * 1000 + ctx.rank)
    dev, R, bf = ctx.device, ctx.world_size, torch.bfloat16
    rows = case.m // R if case.op == "all_gather_matmul" else case.m
    inp = {"x": torch.randn(rows, case.k, generator=g, device=dev).to(bf),
           "w": (torch.randn(case.n, case.k, generator=g, device=dev) * case.k ** -0.5).to(bf)}
    inp["a_full"] = inp["x"] if case.op != "all_gather_matmul" else torch.randn(case.m, case.k, device=dev).to(bf)
    if extras and case.op != "all_gather_matmul":
        inp["add"] = torch.randn(case.m, case.n, generator=g, device=dev).to(bf)
        out_rows = case.m // R if case.op == "matmul_reduce_scatter" else case.m
        inp["residual"] = torch.randn(out_rows, case.n, generator=g, device=dev).to(bf)
    return inp


def _prologue(a: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(a, (a.shape[-1],))  # token-wise, like the block's RMSNorm


def call(impl, case: Case, inp: dict, extras: bool = False):
    kw = {k: inp[k] for k in ("add", "residual") if k in inp}
    if case.op == "matmul_all_reduce":
        return impl.matmul_all_reduce(inp["x"], inp["w"], **kw)
    if case.op == "matmul_reduce_scatter":
        return impl.matmul_reduce_scatter(inp["x"], inp["w"], **kw)
    if extras:
        return impl.all_gather_matmul(inp["x"], inp["w"], prologue=_prologue, return_gathered=True)
    return impl.all_gather_matmul(inp["x"], inp["w"])


def reference(case: Case, inp: dict, ctx):
    R, grp = ctx.world_size, ctx.group
    kw = {k: inp[k] for k in ("add", "residual") if k in inp}
    if case.op == "matmul_all_reduce":
        return gar.reference(inp["x"], inp["w"], grp, **kw)
    if case.op == "matmul_reduce_scatter":
        return mrs.reference(inp["x"], inp["w"], grp, R, **kw)
    return agm.reference(inp["x"], inp["w"], grp, R, prologue=_prologue if "extras" in inp else None)


# timing ------------------------------------------------------------------------------------------------
def _stats(times: list[float]) -> dict:
    t = torch.tensor(times, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return {"p20_ms": q[0], "median_ms": q[1], "p80_ms": q[2]}


def _slowest(ctx, stats: dict) -> dict:
    """The stats of the rank with the largest median (a collective finishes when its slowest rank does)."""
    every = [None] * ctx.world_size
    dist.all_gather_object(every, stats, group=ctx.group)
    return max(every, key=lambda s: s["median_ms"])


def time_eager(fn, ctx, warmup: int, iters: int) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ctx.barrier()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    torch.cuda._sleep(SLEEP_CYCLES)
    events[0].record()
    for i in range(iters):
        fn()
        events[i + 1].record()
    torch.cuda.synchronize()
    return _slowest(ctx, _stats([events[i].elapsed_time(events[i + 1]) for i in range(iters)]))


def capture(fn, calls: int, warmup: int = 3) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # allocator, cuBLAS, NCCL, Triton and workspaces set up before capture
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def time_graph(fn, ctx, replays: int) -> dict:
    graph = capture(fn, GRAPH_CALLS)
    graph.replay()
    torch.cuda.synchronize()
    ctx.barrier()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(replays + 1)]
    torch.cuda._sleep(SLEEP_CYCLES)
    events[0].record()
    for i in range(replays):
        graph.replay()
        events[i + 1].record()
    torch.cuda.synchronize()
    return _slowest(ctx, _stats([events[i].elapsed_time(events[i + 1]) / GRAPH_CALLS for i in range(replays)]))


# bench and check -----------------------------------------------------------------------------------------
def bench(ctx, impls: dict, cases: list[Case], out_path: Path | None, provenance: dict,
          warmup: int, iters: int) -> list[dict]:
    records = []
    for case in cases:
        inp = make_inputs(case, ctx, seed=0)
        timer = (lambda f: time_graph(f, ctx, iters)) if case.decode else (lambda f: time_eager(f, ctx, warmup, iters))
        gemm = timer(lambda: torch.mm(inp["a_full"], inp["w"].t()))["median_ms"]
        rows = {}
        for name, impl in impls.items():
            stats = timer(lambda: call(impl, case, inp))
            rows[name] = {**stats, "path": impl.last_path}
        base_ect = rows["nccl"]["median_ms"] - gemm if "nccl" in rows else None
        for name, st in rows.items():
            ect = st["median_ms"] - gemm
            eff = 1.0 - ect / base_ect if base_ect and base_ect > 0 else None
            rec = {"schema": SCHEMA, "op": case.op, "layer": case.layer, "impl": name, "m": case.m, "n": case.n,
                   "k": case.k, "tp": ctx.world_size, "phase": "decode" if case.decode else "prefill",
                   "cuda_graph": case.decode, "gemm_ms": gemm, "total_ms": st["median_ms"],
                   "median_ms": st["median_ms"], "p20_ms": st["p20_ms"], "p80_ms": st["p80_ms"],
                   "comm_ms": ect, "overlap_efficiency": eff, "path": st["path"], **provenance}
            records.append(rec)
            if ctx.is_main and out_path is not None:
                with open(out_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
        if ctx.is_main:
            print(f"[bench] {case.op:22s} {case.layer:7s} M={case.m:5d} gemm {gemm:.4f} " + "  ".join(
                f"{n} {r['median_ms']:.4f}" for n, r in rows.items()), flush=True)
    return records


def _errors(out: torch.Tensor, ref: torch.Tensor, ctx) -> tuple[float, float]:
    d = (out.float() - ref.float()).abs().max()
    stats = torch.stack([d, d / ref.float().abs().max().clamp_min(1e-6)])
    dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=ctx.group)
    return float(stats[0]), float(stats[1])


def run_checks(ctx, impls: dict, cases: list[Case], out_path: Path | None = None,
               graphs: bool = True) -> list[dict]:
    """Every case x variant x impl against the fp32 reference; returns records with "ok".

    graphs: also replay decode cases from a CUDA graph (GPU only).
    """
    records = []
    for case in cases:
        for extras in (False, True):
            for it in range(2):  # two calls with fresh inputs: flags, epochs and workspaces are reused
                inp = make_inputs(case, ctx, seed=1 + it, extras=extras)
                if extras:
                    inp["extras"] = True
                ref = reference(case, inp, ctx)
                for name, impl in impls.items():
                    out = call(impl, case, inp, extras)
                    gathered_err = 0.0
                    if isinstance(out, tuple):
                        out, gathered = out
                        gathered_err = _errors(gathered, _gather(inp["x"], ctx), ctx)[0]
                    err, rel = _errors(out, ref, ctx)
                    records.append(_check_record(ctx, case, name, impl.last_path, extras, it, err, rel,
                                                 gathered_err, "eager", out_path))
            if case.decode and not extras and graphs:
                records += _graph_check(ctx, impls, case, out_path)
    return records


def _gather(x: torch.Tensor, ctx) -> torch.Tensor:
    out = x.new_empty((ctx.world_size * x.shape[0], x.shape[1]))
    dist.all_gather_into_tensor(out, x, group=ctx.group)
    return out


def _graph_check(ctx, impls, case, out_path) -> list[dict]:
    records = []
    for name, impl in impls.items():
        static = make_inputs(case, ctx, seed=50)
        result = {}
        graph = capture(lambda: result.__setitem__("out", call(impl, case, static)), 1)
        for it in range(3):  # replays with new inputs copied into the captured (static) tensors
            static["x"].copy_(make_inputs(case, ctx, seed=60 + it)["x"])
            graph.replay()
            err, rel = _errors(result["out"], reference(case, static, ctx), ctx)
            records.append(_check_record(ctx, case, name, impl.last_path, False, it, err, rel, 0.0, "graph",
                                         out_path))
    return records


def _check_record(ctx, case, impl, path, extras, it, err, rel, gathered_err, mode, out_path) -> dict:
    ok = rel <= TOL_REL and gathered_err == 0.0
    rec = {"schema": CHECK_SCHEMA, **asdict(case), "impl": impl, "path": path, "extras": extras, "call": it,
           "mode": mode, "max_abs_err": err, "max_rel_err": rel, "gathered_err": gathered_err, "tol_rel": TOL_REL,
           "ok": ok}
    if ctx.is_main:
        print(f"[check] {case.op:22s} {case.layer:7s} M={case.m:5d} {impl:8s} {path:28s} "
              f"{'extras' if extras else 'plain ':6s} {mode:5s} call {it}: max_abs {err:.3e} rel {rel:.3e} "
              f"{'PASS' if ok else 'FAIL'}", flush=True)
        if out_path is not None:
            with open(out_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
    return rec


def print_table(records: list[dict]) -> None:
    cases: dict = {}
    for r in records:
        cases.setdefault((r["op"], r["layer"], r["m"]), {})[r["impl"]] = r
    names = [n for n in IMPLS if any(n in v for v in cases.values())]
    print(f"\n{'op':22s} {'layer':7s} {'M':>5s} {'gemm':>8s} " + " ".join(f"{n:>9s}" for n in names)
          + " " + " ".join(f"{'eff_' + n:>13s}" for n in names if n != "nccl") + "  triton path")
    for (op, layer, m), by in cases.items():
        first = next(iter(by.values()))
        eff = " ".join(f"{by[n]['overlap_efficiency']:13.2f}" if n in by and by[n]["overlap_efficiency"] is not None
                       else f"{'-':>13s}" for n in names if n != "nccl")
        print(f"{op:22s} {layer:7s} {m:5d} {first['gemm_ms']:8.4f} "
              + " ".join(f"{by[n]['median_ms']:9.4f}" if n in by else f"{'-':>9s}" for n in names)
              + f" {eff}  {by.get('triton', {}).get('path', '')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="JSON lines to append (rank 0); default "
                   "docs/benchmarks/kernels.jsonl for the bench, none for --check")
    p.add_argument("--check", action="store_true", help="correctness of every op and impl instead of timing")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--prefill-m", default=None, help="comma-separated M values (default 128,1024,4096,8192)")
    p.add_argument("--decode-m", default=None, help="comma-separated decode M values (default 1,16)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    ctx = init_tp("nccl")
    ints = lambda s, d: tuple(int(v) for v in s.split(",")) if s else d  # noqa: E731
    prefill = ints(args.prefill_m, CHECK_PREFILL_M if args.check else PREFILL_M)
    decode = ints(args.decode_m, CHECK_DECODE_M if args.check else DECODE_M)
    cases = make_cases(llama70b_layers(ctx.world_size), prefill, decode, tuple(args.ops.split(",")))
    max_spin = CHECK_MAX_SPIN if args.check else BENCH_MAX_SPIN
    impls = {n: get_impl(n, ctx, **({"max_spin": max_spin} if n == "triton" else {})) for n in args.impls.split(",")}
    for impl in impls.values():
        impl.reserve(max_tokens=max(prefill), n=8192, k=8192)
    out = args.out if args.out or args.check else Path("docs/benchmarks/kernels.jsonl")
    if ctx.is_main and out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    from spd.run import meta

    m = meta(tp=ctx.world_size)
    commit = m["commit"] if m["commit"] != "unknown" else os.environ.get("SPD_COMMIT", "unknown")
    provenance = {"device": m["device"], "torch": m["versions"].get("torch"), "triton": m["versions"].get("triton"),
                  "commit": commit, "time": m["time"]}
    t0 = time.time()
    failed = 0
    if args.check:
        records = run_checks(ctx, impls, cases, out)
        failed = sum(not r["ok"] for r in records)
    else:
        records = bench(ctx, impls, cases, out, provenance, args.warmup, args.iters)
        if ctx.is_main:
            print_table(records)
    if "triton" in impls:
        try:
            impls["triton"].check_status()
        except RuntimeError as e:
            failed += 1
            print(f"[rank {ctx.rank}] {e}", flush=True)
    if ctx.is_main:
        what = f"{len(records)} checks, {failed} failed" if args.check else f"{len(records)} records -> {out}"
        print(f"[kernel_bench] {what} in {time.time() - t0:.0f} s on {provenance['device']}", flush=True)
    ctx.barrier()
    shutdown(ctx)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
