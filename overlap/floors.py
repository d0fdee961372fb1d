"""Hardware floors for spd-bench records: what one rank's shard must move and compute, over rates measured in
the same run.

Each bench job measures two ceilings once on its device (measure_rates):

    copy_tbps     a device-to-device copy of copy_bytes bytes, counted as bytes read + bytes written over the
                  median time (the convention of the device tool's METHOD.md: the HBM traffic a second)
    matmul_tflops an n x n x n product in the model's dtype on random data (2 n^3 FLOP over the median time)
                  of 20 products after 3: the burst rate, at the boost clock
    matmul_sustained_tflops
                  the same product back to back for SUSTAIN_S seconds, the median of the second half: the rate
                  the device holds under a continuous load. On an H200 (700 W) it is 15-17% lower (the SM clock
                  falls from 1980 to 1230-1560 MHz at the power limit; docs/benchmarks/sustained_matmul.md), and
                  a timed prefill loop (warm-up + iterations, over a second) runs at that clock

and every record states its floor (floor_fields), the larger of

    memory floor   bytes that must cross HBM once / copy_tbps: decode reads the shard's weights (every block's
                   wqkv, wo, w13, w2 and norms, the final norm and the lm_head; of the embedding table only
                   B rows, not counted) and the KV cache up to the decoded position (B x (context + 1)
                   positions of this rank's KV heads, K and V, every block); prefill reads the weights and
                   writes the KV cache of S positions
    compute floor  matmul FLOPs / matmul_sustained_tflops (floor_flop_burst_ms: over matmul_tflops), the FLOPs
                   being 2 x tokens x (the blocks' GEMM weights) + attention (causal:
                   QK^T and PV over the lower triangle, 2 x S^2 x Dh FLOP a query head and block for a prefill
                   of S, 4 x B x (context + 1) x Dh for a decode step) + the lm_head on the last token of each
                   sequence (2 x B x V x D)

with floor_bound saying which; floor_frac = floor_ms / median_ms (1.0 would be at the floor). A weight read is
charged at the copy's read + write rate, i.e. the same bytes per second of HBM traffic a copy achieves.
"""

from __future__ import annotations

import dataclasses
import statistics

import torch

from overlap.model import ModelArgs
from overlap.tp import layout_of

GPU_COPY_BYTES = 2 << 30  # 2 GiB, 36x the H200's 60 MB L2
GPU_MATMUL_N = 8192
SUSTAIN_S = 2.0  # GPU: seconds of back-to-back products for the sustained rate (CPU: one batch)
CPU_COPY_BYTES = 16 << 20  # CPU smoke runs: keeps the code path alive, the numbers mean little
CPU_MATMUL_N = 256


@dataclasses.dataclass(frozen=True)
class ShardShape:
    """Rank 0's share of a degree-R split (overlap.tp.shard_): per-block sizes in elements."""

    args: ModelArgs
    tp: int

    @property
    def layout(self):
        return layout_of(self.args, self.tp)

    @property
    def q_heads(self) -> int:
        return len(self.layout.q_heads(0))

    @property
    def kv_heads(self) -> int:
        return len(self.layout.kv_heads(0))

    @property
    def ffn(self) -> int:
        r = self.layout.ffn_rows(0)
        return r.stop - r.start

    def block_gemm_params(self) -> int:
        """Elements of one block's GEMM weights: wqkv + wo + w13 + w2."""
        a, Dh, D = self.args, self.args.head_dim, self.args.dim
        return (self.q_heads + 2 * self.kv_heads) * Dh * D + D * self.q_heads * Dh + 3 * self.ffn * D

    def weight_params(self) -> int:
        """Elements a forward reads: the blocks' GEMM weights and norms, the final norm and the lm_head."""
        a = self.args
        return a.n_layers * (self.block_gemm_params() + 2 * a.dim) + a.dim + a.vocab_size * a.dim

    def kv_elems(self, batch: int, positions: int) -> int:
        """K and V elements of `positions` cached positions of `batch` sequences, every block."""
        return 2 * self.args.n_layers * batch * positions * self.kv_heads * self.args.head_dim

    def attention_flops(self, batch: int, queries: int, keys: int, causal: bool) -> float:
        """QK^T and PV FLOPs of every block: 4 x keys x Dh a query and head (causal prefill: half of S x S)."""
        pairs = queries * keys / 2 if causal else queries * keys
        return 4.0 * self.args.n_layers * batch * self.q_heads * self.args.head_dim * pairs

    def work(self, phase: str, tokens: int, batch: int, context: int, dtype_bytes: int) -> tuple[float, float]:
        """(bytes, FLOPs) the floor counts for one measurement (see the module docstring)."""
        a = self.args
        weights = self.weight_params() * dtype_bytes
        head = 2.0 * batch * a.vocab_size * a.dim
        if phase == "prefill":
            n = batch * tokens
            flops = 2.0 * n * self.block_gemm_params() * a.n_layers + self.attention_flops(batch, tokens, tokens, True)
            return weights + self.kv_elems(batch, tokens) * dtype_bytes, flops + head
        keys = context + 1
        flops = 2.0 * batch * self.block_gemm_params() * a.n_layers + self.attention_flops(batch, 1, keys, False)
        return weights + self.kv_elems(batch, keys) * dtype_bytes, flops + head


def _median_ms(fn, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(times_ms(fn, device, iters))


@torch.no_grad()
def measure_rates(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The two ceilings on this device, measured now: copy bandwidth (read + write) and matmul throughput."""
    cuda = device.type == "cuda"
    nbytes, n = (GPU_COPY_BYTES, GPU_MATMUL_N) if cuda else (CPU_COPY_BYTES, CPU_MATMUL_N)
    gen = torch.Generator(device=device).manual_seed(0)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device, generator=gen)  # never zeros
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), device, 3, 20)
    del src, dst
    mdt = dtype if cuda else torch.float32  # CPU bf16 GEMMs are not what a CPU run would use
    a = torch.randn(n, n, device=device, dtype=mdt, generator=gen)
    b = torch.randn(n, n, device=device, dtype=mdt, generator=gen)
    mm_ms = _median_ms(lambda: torch.mm(a, b), device, 3, 20)
    held_ms = _sustained_ms(lambda: torch.mm(a, b), device, SUSTAIN_S if cuda else 0.0)
    del a, b
    if cuda:
        torch.cuda.empty_cache()
    return dict(copy_bytes=nbytes, copy_ms=_sig(copy_ms), copy_tbps=_sig(2 * nbytes / copy_ms / 1e9),
                matmul_n=n, matmul_dtype=str(mdt).removeprefix("torch."), matmul_ms=_sig(mm_ms),
                matmul_tflops=_sig(2 * n**3 / mm_ms / 1e9), matmul_sustain_s=SUSTAIN_S if cuda else 0.0,
                matmul_sustained_ms=_sig(held_ms), matmul_sustained_tflops=_sig(2 * n**3 / held_ms / 1e9))


def _sustained_ms(fn, device: torch.device, seconds: float, batch: int = 20) -> float:
    """Median ms of fn over the second half of batches of `batch` back-to-back calls run for `seconds` (at
    least one batch), each call timed (CUDA events on a GPU)."""
    import time

    times: list[float] = []
    t0 = time.perf_counter()
    while not times or time.perf_counter() - t0 < seconds:
        times += times_ms(fn, device, batch)
    return statistics.median(times[len(times) // 2:])


def times_ms(fn, device: torch.device, n: int) -> list[float]:
    """Milliseconds of each of n back-to-back calls of fn: CUDA events on a GPU (no host sync between calls),
    perf_counter elsewhere."""
    import time

    if device.type != "cuda":
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    ev[-1][1].synchronize()
    return [s.elapsed_time(e) for s, e in ev]


class Timed(list):
    """Per-iteration milliseconds (the list) and host_ms, host_launch_ms of the same fn (None off CUDA)."""

    def __init__(self, times, host_ms: float | None = None):
        super().__init__(times)
        self.host_ms = host_ms


def host_launch_ms(fn, device: torch.device) -> float | None:
    """Milliseconds the host takes to return from one call of fn issued with the device idle (CUDA; None
    elsewhere): the launch path's time for one iteration, an upper bound of it (a launch also waits while the
    driver's queue of pending work is full). Near the device time of an iteration, the device may have waited
    for the host in the timed loop: the time measured is then the host's (a slow or busy CPU shows there)."""
    import time

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize(device)
    return ms


def _sig(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


def floor_fields(shape: ShardShape, rates: dict, phase: str, tokens: int, batch: int, context: int,
                 dtype_bytes: int, median_ms: float) -> dict:
    """A record's floor: bytes and FLOPs counted, the memory and compute floors (ms), the larger, the fraction."""
    nbytes, flops = shape.work(phase, tokens, batch, context, dtype_bytes)
    mem_ms = nbytes / (rates["copy_tbps"] * 1e9)
    flop_ms = flops / (rates.get("matmul_sustained_tflops", rates["matmul_tflops"]) * 1e9)
    floor = max(mem_ms, flop_ms)
    return dict(floor_bytes=int(nbytes), floor_flops=float(flops), floor_mem_ms=_sig(mem_ms),
                floor_flop_ms=_sig(flop_ms), floor_flop_burst_ms=_sig(flops / (rates["matmul_tflops"] * 1e9)),
                floor_ms=_sig(floor), floor_bound="memory" if mem_ms >= flop_ms else "compute",
                floor_frac=_sig(floor / median_ms, 4) if median_ms else None)
