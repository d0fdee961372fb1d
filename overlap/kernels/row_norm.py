"""RMSNorm of a few decode rows, spread over many programs and launched with programmatic dependent launch.

    y = row_norm(x, g, eps)       x (M, K), g (K,): x * rsqrt(mean(x^2) + eps) * g, fp32 inside, one rounding

The compiled RMSNorm (torch.compile) runs one program a row: at 16 decode rows of LLaMA-2-70B that is 16 SMs
reading 256 KB, 2.6-2.7 us between the GEMVs around it, twice a block (docs/benchmarks/kernel_kinds.md,
"Decode and prefill at 5c12e59"). Here program (m, c) reads row m whole for its statistics (from L2: the
previous kernel just wrote it) and writes only its CHUNK columns, so a 16-row norm runs on 16 x K / CHUNK
programs; with pdl each waits for the previous kernel and at once lets the next launch, whose weight loads then
overlap this kernel (as overlap.kernels.norm_gemv's do).

The reference is overlap.ops.rms_norm (F.rms_norm). `decode_norm` routes an Ops.norm's decode rows here.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from overlap.kernels.checks import KernelArgError, check_dtype
from overlap.kernels.compile_options import FP_FUSION
from overlap.kernels.schedule import DECODE_MAX_M

OP = "row_norm"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CHUNK = 1024  # columns a program writes: 8 programs a row at K = 8192
MAX_BLOCK = 8192  # elements a program loads at once for the statistics (K above it: a loop)
WITH_PDL = True  # overlap.model routes decode rows' norms here when the step runs with PDL
PDL_WAIT = True  # with pdl: launched early, waiting inside for the previous kernel; False: launched in stream
# order (after the previous kernel ends), still letting the next kernel launch at its start


@triton.jit
def row_norm_kernel(x_ptr, g_ptr, y_ptr, K, stride_x, stride_y, eps,
                    BLOCK: tl.constexpr, CHUNK: tl.constexpr, GDC: tl.constexpr = False, WAIT: tl.constexpr = True):
    row = tl.program_id(0)
    c = tl.program_id(1)
    if GDC:  # x is the previous kernel's output; the next kernel may launch now (it waits for this one's end)
        if WAIT:
            tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x_row = x_ptr + row * stride_x
    sq = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        xf = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        sq += xf * xf
    rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / K + eps)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    mask = offs < K
    xf = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (xf * rstd * g).to(y_ptr.dtype.element_ty), mask=mask)


def row_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, pdl: bool = False, chunk: int = CHUNK,
             num_warps: int = 4) -> torch.Tensor:
    """rms_norm(x, weight, eps) for decode rows x (M, K), M <= 16, with unit stride in K: (M, K) in x's dtype.
    pdl (CUDA, compute capability >= 9): launched with programmatic dependent launch."""
    if x.dim() != 2:
        raise KernelArgError(f"{OP}: x must be (rows, K), got shape {tuple(x.shape)}")
    M, K = x.shape
    if not 1 <= M <= DECODE_MAX_M:
        raise KernelArgError(f"{OP}: handles 1..{DECODE_MAX_M} rows (a decode step's), got {M}; "
                             "more rows take overlap.ops.rms_norm")
    check_dtype(x, DTYPES, OP)
    if tuple(weight.shape) != (K,):
        raise KernelArgError(f"{OP}: weight has shape {tuple(weight.shape)}, x's rows need ({K},)")
    if x.stride(1) != 1:
        raise KernelArgError(f"{OP}: x needs unit stride along K (strides {x.stride()}); pass x.contiguous()")
    if chunk < 16 or chunk & (chunk - 1):
        raise KernelArgError(f"{OP}: chunk={chunk}; valid: a power of two >= 16")
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    gdc = pdl and x.is_cuda
    launch = {"launch_pdl": True} if gdc and PDL_WAIT else {}
    row_norm_kernel[(M, triton.cdiv(K, chunk))](
        x, weight, y, K, x.stride(0), y.stride(0), eps, BLOCK=min(triton.next_power_of_2(K), MAX_BLOCK),
        CHUNK=chunk, GDC=gdc, WAIT=PDL_WAIT, num_warps=num_warps, **launch, **FP_FUSION)
    return y


def decode_norm(fallback):
    """An Ops.norm (x (..., K), weight, eps) that runs CUDA calls of at most DECODE_MAX_M rows (a decode step's)
    through row_norm with PDL, and every other call (prefill rows, the CPU) through fallback."""
    def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        on_device = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
        if not on_device or rows > DECODE_MAX_M or not x.is_contiguous() or torch.compiler.is_compiling():
            return fallback(x, weight, eps)
        return row_norm(x.view(rows, x.shape[-1]), weight, eps, pdl=True).view(x.shape)

    return norm
