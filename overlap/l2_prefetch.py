"""Stream a decode step's next weight into L2 while the small kernels before its GEMV run.

A decode step reads every weight once, and the GEMVs that read them are the step's time; between them run
kernels that move almost nothing (attention over a short cache, norms, SwiGLU, residual adds: about 26 us a
block at the LLaMA-2-70B R = 4 shard, docs/benchmarks/kernel_kinds.md), during which HBM idles. A prefetcher
issues, on a side stream forked right after a GEMV, L2 prefetches of the leading bytes of the weight the next
GEMV reads (wo during attention, w13 during the residual add + norm, w2 during SwiGLU, the next block's wqkv
during the residual add + norm after w2), so that GEMV starts with part of its weight already in L2.

The prefetch changes no value (it is a cache hint), only where the next GEMV's bytes come from; the side
stream rejoins the main stream once, at the end of the step (Runtime._step), so no kernel of the main stream
ever waits for it. Hopper and later: one `cp.async.bulk.prefetch.L2` a CHUNK of bytes; earlier GPUs: one
`prefetch.global.L2` a 128-byte line. CUDA only (a CPU step calls none).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BULK_CHUNK = 16384  # bytes one bulk prefetch asks for (multiple of 16)
LINE = 128  # bytes of one L2 line: the per-line prefetch's step
LANES = 128  # prefetches a program issues (one a thread at 4 warps)
DEFAULT_L2_FRACTION = 0.5  # of the device's L2 a single prefetch may fill (the rest keeps the step's activations)


@triton.jit
def _prefetch_kernel(ptr, nbytes, CHUNK: tl.constexpr, BULK: tl.constexpr, LANES: tl.constexpr):
    offs = (tl.program_id(0) * LANES + tl.arange(0, LANES)).to(tl.int64) * CHUNK
    offs = tl.where(offs < nbytes, offs, 0)  # lanes past the end repeat the first chunk (a hint, never a fault)
    p = ptr + offs
    if BULK:
        size = tl.minimum(nbytes - offs, CHUNK).to(tl.int32)
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n mov.u32 $0, 0;", "=r,l,r",
                                      [p, size], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n mov.u32 $0, 0;", "=r,l", [p], dtype=tl.int32,
                                      is_pure=False, pack=1)  # not pure: kept though r is unused


@triton.jit
def _touch_kernel(ptr, sink_ptr, nwords, WORDS: tl.constexpr, BLOCK: tl.constexpr):
    """Read WORDS int32 words at a time, programs striding over nwords (through L2, kept there: evict_last); the xor goes to a scratch word
    only when it is a magic value, so the loads stay and nothing is written in practice."""
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in tl.range(tl.program_id(0).to(tl.int64) * WORDS, nwords, tl.num_programs(0).to(tl.int64) * WORDS):
        for i in tl.range(0, WORDS, BLOCK):
            offs = start + i + tl.arange(0, BLOCK)
            acc ^= tl.load(ptr + offs, mask=offs < nwords, other=0, eviction_policy="evict_last")
    x = tl.xor_sum(acc, axis=0)
    tl.store(sink_ptr, x, mask=x == 0x5EED5EED)


def prefetch_bytes(weight: torch.Tensor, budget: int) -> int:
    """Bytes of weight's leading rows to prefetch: at most budget, a multiple of 16 (the bulk op's unit)."""
    return min(weight.numel() * weight.element_size(), budget) // 16 * 16


TOUCH_WORDS = 8192  # int32 words (32 KiB) a touch program reads at a time
TOUCH_PROGRAMS = int(os.environ.get("SPD_L2_TOUCH_PROGRAMS", "32"))  # few SMs: the main stream's kernels keep the rest
_SINKS: dict = {}


def prefetch_l2_(weight: torch.Tensor, nbytes: int, mode: str = "bulk") -> None:
    """Bring the first nbytes of weight (contiguous, CUDA) into L2, on the current stream. mode "bulk": prefetch
    hints (the kernel returns at once, L2 fetches in the background); "touch": real loads, kept in L2."""
    if nbytes <= 0:
        return
    if not weight.is_cuda or not weight.is_contiguous():
        raise ValueError(f"prefetch_l2_ needs a contiguous CUDA tensor, got device {weight.device}, "
                         f"strides {weight.stride()}")
    if mode == "touch":
        words = nbytes // 4
        sink = _SINKS.setdefault(weight.device, torch.zeros(1, dtype=torch.int32, device=weight.device))
        _touch_kernel[(min(TOUCH_PROGRAMS, triton.cdiv(words, TOUCH_WORDS)),)](weight.view(-1).view(torch.int32), sink, words,
                                                           WORDS=TOUCH_WORDS, BLOCK=1024, num_warps=4)
        return
    if mode != "bulk":
        raise ValueError(f"prefetch mode {mode!r}; valid: bulk, touch")
    bulk = torch.cuda.get_device_capability(weight.device) >= (9, 0)
    chunk = BULK_CHUNK if bulk else LINE
    grid = (triton.cdiv(triton.cdiv(nbytes, chunk), LANES),)
    _prefetch_kernel[grid](weight.view(-1).view(torch.uint8), nbytes, CHUNK=chunk, BULK=bulk, LANES=LANES,
                           num_warps=4)


class L2Prefetcher:
    """Forks a side stream at each call and prefetches the weight's leading bytes there; join() rejoins.

    budget: bytes a prefetch may ask for, default DEFAULT_L2_FRACTION of the device's L2 (or l2_fraction)."""

    def __init__(self, device: torch.device, l2_fraction: float = DEFAULT_L2_FRACTION, mode: str | None = None,
                 sites: tuple[str, ...] | None = None):
        if not 0.0 < l2_fraction <= 1.0:
            raise ValueError(f"l2_fraction must be in (0, 1], got {l2_fraction}")
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"L2 prefetch runs on CUDA devices only, got {device}")
        self.device = device
        self.l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
        self.budget = int(self.l2_bytes * l2_fraction)
        self.stream = torch.cuda.Stream(device)
        self.mode = mode or os.environ.get("SPD_L2_PREFETCH_MODE", "bulk")
        self.sites = set(sites or os.environ.get("SPD_L2_PREFETCH_SITES", "wqkv,wo,w13,w2").split(","))
        self.calls = 0

    def __call__(self, site: str, weight: torch.Tensor) -> None:
        if site not in self.sites:
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # after the GEMV just launched
        with torch.cuda.stream(self.stream):
            prefetch_l2_(weight, prefetch_bytes(weight, self.budget), self.mode)
        self.calls += 1

    def join(self) -> None:
        """The main stream waits for every prefetch so far (once a step: a CUDA graph capture needs it)."""
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

