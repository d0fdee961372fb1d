"""What an L2 prefetch during a decode step's small kernels buys its next GEMV (overlap/l2_prefetch.py), and the
matmul rate a prefill can sustain; one JSON line per measurement (GPU only).

1. prefetch: for each GEMV of the LLaMA-2-70B shard at --tp R (wqkv, wo, w13, w2; batch 1, bf16), a CUDA graph
   of ITERS x [window kernel of --window-us, then the GEMV] over enough copies of the weight that none is in
   L2 when its turn comes; timed per iteration with the prefetch of the next weight's leading bytes forked on a
   side stream at the window's start (share of L2 0.25 .. 1) and without it. The window stands in for the
   kernels before the GEMV (attention, norms, SwiGLU); its own time is timed alone and subtracted.
2. sustained: back-to-back bf16 8192^3 products for --sustain-s seconds against the first 20 (the burst rate
   overlap/floors.py measures), timed per product (CUDA events), to see whether a 100 ms prefill can hold
   the burst rate.

    python3 scripts/l2_prefetch_bench.py --out $OUT/l2_prefetch.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from overlap.l2_prefetch import prefetch_bytes, prefetch_l2_  # noqa: E402
from overlap.model import ModelArgs  # noqa: E402
from overlap.floors import ShardShape  # noqa: E402

ITERS = 20
CLOCK_HZ = 1.98e9  # H200 / H100 SXM boost clock: cycles of torch.cuda._sleep per us (the window is timed anyway)


def llama70b() -> ModelArgs:
    return ModelArgs(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672)


def gemv_shapes(tp: int) -> dict[str, tuple[int, int]]:
    s = ShardShape(llama70b(), tp)
    d, dh = s.args.dim, s.args.head_dim
    return {"wqkv": ((s.q_heads + 2 * s.kv_heads) * dh, d), "wo": (d, s.q_heads * dh),
            "w13": (2 * s.ffn, d), "w2": (d, s.ffn)}


def graph_ms(body, iters: int = ITERS, reps: int = 10) -> float:
    """Median ms per iteration of body(i) for i < iters, captured in one CUDA graph and replayed reps times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(iters):
            body(i)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(iters):
            body(i)
    g.replay()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / iters)
    return statistics.median(ts)


def prefetch_cases(emit, tp: int, window_us: float, fractions: list[float], mode: str) -> None:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    side = torch.cuda.Stream()
    cycles = int(window_us * CLOCK_HZ / 1e6)
    window_ms = graph_ms(lambda i: torch.cuda._sleep(cycles))
    for name, (n, k) in gemv_shapes(tp).items():
        nbytes = n * k * 2
        copies = max(2, -(-4 * l2 // nbytes))  # 4x the L2 between two uses of one copy
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        base = dict(piece="l2_prefetch", tp=tp, gemv=name, n=n, k=k, weight_mb=nbytes / 1e6, l2_mb=l2 / 1e6,
                    window_us=window_us, window_measured_us=window_ms * 1e3, copies=copies)
        alone = graph_ms(lambda i: torch.mm(x, ws[i % copies].T))
        emit(dict(base, case="gemv_alone_cold", us=alone * 1e3))
        for frac in [0.0, *fractions]:
            budget = int(l2 * frac)

            def body(i, budget=budget):
                w = ws[i % copies]
                if budget:
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        prefetch_l2_(w, prefetch_bytes(w, budget), mode)
                torch.cuda._sleep(cycles)
                torch.mm(x, w.T)
                if budget:
                    torch.cuda.current_stream().wait_stream(side)

            ms = graph_ms(body)
            emit(dict(base, case="window_then_gemv", mode=mode, l2_fraction=frac, prefetch_mb=min(budget, nbytes) / 1e6,
                      us=ms * 1e3, gemv_us=(ms - window_ms) * 1e3))
        del ws
        torch.cuda.empty_cache()


def sustained(emit, seconds: float) -> None:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    torch.cuda.synchronize()
    evs = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        batch = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(50)]
        for s, e in batch:
            s.record()
            torch.mm(a, b)
            e.record()
        batch[-1][1].synchronize()
        evs += batch
    ms = [s.elapsed_time(e) for s, e in evs]
    tf = lambda t: 2 * n**3 / t / 1e9  # noqa: E731
    first, rest = ms[:20], ms[len(ms) // 2:]
    emit(dict(piece="matmul_sustained", n=n, products=len(ms), seconds=sum(ms) / 1e3,
              burst_median_ms=statistics.median(first), burst_tflops=tf(statistics.median(first)),
              second_half_median_ms=statistics.median(rest), sustained_tflops=tf(statistics.median(rest)),
              first_100ms_tflops=tf(statistics.median(ms[: max(1, int(100 / statistics.median(first)))])),))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, nargs="+", default=[4])
    p.add_argument("--window-us", type=float, nargs="+", default=[8.0])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--sustain-s", type=float, default=3.0)
    p.add_argument("--modes", nargs="+", default=["bulk", "touch"], choices=["bulk", "touch"])
    a = p.parse_args()
    from spd.run import device_name

    common = dict(command="python3 " + " ".join(sys.argv), device=device_name(), torch=torch.__version__,
                  commit=__import__("os").environ.get("SPD_COMMIT", "?"))
    try:
        import triton

        common["triton"] = triton.__version__
    except ImportError:
        pass
    out = Path(a.out)

    def emit(rec):
        rec = dict(common, **rec)
        print(json.dumps(rec), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")

    for tp in a.tp:
        for w in a.window_us:
            for mode in a.modes:
                prefetch_cases(emit, tp, w, a.fractions, mode)
    if a.sustain_s > 0:
        sustained(emit, a.sustain_s)


if __name__ == "__main__":
    main()
