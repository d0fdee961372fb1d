"""What cutting a prefill GEMM into R row chunks costs on one GPU (LLaMA-2-70B TP-4 shard shapes).

    python scripts/chunked_gemm.py [--out F]

The pipelined paths of overlap.kernels (triton impl, M >= 1024) run one cuBLAS GEMM per chunk of M/R rows so
that each chunk's transfer overlaps the next chunk's GEMM. Their overlap efficiency can be no better than the
chunked GEMMs allow: this times the whole (M, K) x (K, N) GEMM against R = 4 back-to-back (M/4, K) x (K, N)
GEMMs, per layer shape and M, bf16, CUDA events, medians of 20 after 5 warm-ups. One JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

SHAPES = {"o": (8192, 2048), "down": (8192, 7168), "qkv": (2560, 8192), "gate_up": (14336, 8192)}  # (N, K)
R = 4


def median_ms(fn, warmup: int = 5, iters: int = 20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    ev[0].record()
    for i in range(iters):
        fn()
        ev[i + 1].record()
    torch.cuda.synchronize()
    return statistics.median(ev[i].elapsed_time(ev[i + 1]) for i in range(iters))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="append JSON lines here")
    a = parser.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    for layer, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=g, device="cuda").bfloat16()
        for m in (1024, 4096, 8192):
            x = torch.randn(m, k, generator=g, device="cuda").bfloat16()
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            chunks = [(x[i * m // R:(i + 1) * m // R], out[i * m // R:(i + 1) * m // R]) for i in range(R)]
            whole = median_ms(lambda: torch.mm(x, w.t(), out=out))
            chunked = median_ms(lambda: [torch.mm(xc, w.t(), out=oc) for xc, oc in chunks])
            rec = dict(schema="spd.chunked_gemm/1", layer=layer, m=m, n=n, k=k, chunks=R, whole_ms=whole,
                       chunked_ms=chunked, overhead=chunked / whole - 1, device=torch.cuda.get_device_name(),
                       torch=torch.__version__)
            print(f"{layer:8s} M={m:5d} whole {whole:.4f} ms  {R} chunks {chunked:.4f} ms  (+{100 * rec['overhead']:.1f}%)",
                  flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
