"""The residual add of a decode step as a Triton kernel that lets the next kernel launch at once (PDL).

    out = x + y        x, y (..., D) of one dtype: fp32 sum, rounded to the dtype (what torch's x + y does)

In a decode step launched with programmatic dependent launch every kernel waits for the one before it
(griddepcontrol.wait) and lets the next one launch (griddepcontrol.launch_dependents). Inductor's kernels let it
launch only at their end, so the GEMV after a compiled add could not copy its first weight tiles while the add and
the kernels before it ran (docs/benchmarks/pdl.md). This kernel lets the next one launch first thing, then waits:
safe, since the next kernel's own wait covers this one's end. The reference is `reference` (plain torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements a program: 8 programs for a 70B decode row


@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr, GDC: tl.constexpr):
    if GDC:  # the next kernel may launch now; its own wait covers this kernel's end
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, (x + y).to(out_ptr.dtype.element_ty), mask=mask)


def pdl_add(x: torch.Tensor, y: torch.Tensor, pdl: bool = True) -> torch.Tensor:
    """x + y through add_kernel (launched with PDL when pdl and on CUDA) for same-shape, same-dtype contiguous
    tensors on one device; any other pair through plain torch (broadcasting, dtype promotion)."""
    if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device or not (x.is_contiguous() and y.is_contiguous()):
        return x + y
    out = torch.empty_like(x)
    gdc = pdl and x.is_cuda
    add_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, y, out, x.numel(), BLOCK=BLOCK, GDC=gdc,
                                                 **({"launch_pdl": True} if gdc else {}))
    return out


def reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Plain torch: x + y."""
    return x + y
