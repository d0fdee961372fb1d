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


def prefetch_bytes(weight: torch.Tensor, budget: int) -> int:
    """Bytes of weight's leading rows to prefetch: at most budget, a multiple of 16 (the bulk op's unit)."""
    return min(weight.numel() * weight.element_size(), budget) // 16 * 16


def prefetch_l2_(weight: torch.Tensor, nbytes: int) -> None:
    """Ask L2 for the first nbytes of weight (contiguous, CUDA), on the current stream; returns at once."""
    if nbytes <= 0:
        return
    if not weight.is_cuda or not weight.is_contiguous():
        raise ValueError(f"prefetch_l2_ needs a contiguous CUDA tensor, got device {weight.device}, "
                         f"strides {weight.stride()}")
    bulk = torch.cuda.get_device_capability(weight.device) >= (9, 0)
    chunk = BULK_CHUNK if bulk else LINE
    grid = (triton.cdiv(triton.cdiv(nbytes, chunk), LANES),)
    _prefetch_kernel[grid](weight.view(-1).view(torch.uint8), nbytes, CHUNK=chunk, BULK=bulk, LANES=LANES,
                           num_warps=4)


class L2Prefetcher:
    """Forks a side stream at each call and prefetches the weight's leading bytes there; join() rejoins.

    budget: bytes a prefetch may ask for, default DEFAULT_L2_FRACTION of the device's L2 (or l2_fraction)."""

    def __init__(self, device: torch.device, l2_fraction: float = DEFAULT_L2_FRACTION):
        if not 0.0 < l2_fraction <= 1.0:
            raise ValueError(f"l2_fraction must be in (0, 1], got {l2_fraction}")
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"L2 prefetch runs on CUDA devices only, got {device}")
        self.device = device
        self.l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
        self.budget = int(self.l2_bytes * l2_fraction)
        self.stream = torch.cuda.Stream(device)
        self.calls = 0

    def __call__(self, weight: torch.Tensor) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # after the GEMV just launched
        with torch.cuda.stream(self.stream):
            prefetch_l2_(weight, prefetch_bytes(weight, self.budget))
        self.calls += 1

    def join(self) -> None:
        """The main stream waits for every prefetch so far (once a step: a CUDA graph capture needs it)."""
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

