"""Prefetch rows of a weight into the GPU's L2 cache from inside a Triton kernel (sm_90+).

    prefetch_rows(row_ptrs, n_el, mask, CHUNKS)   inside a @triton.jit kernel
        row_ptrs (R,) pointers to each row's first element, n_el the elements to prefetch from each (a runtime
        scalar), mask (R,) the rows that exist; CHUNKS pieces a row so that R * CHUNKS spans the program's threads
        (one prefetch instruction each instead of the same one from several threads).

One `cp.async.bulk.prefetch.L2.global [addr], bytes` per piece: the copy engine of the SM fetches the bytes into
L2 without registers or shared memory and the program goes on at once. A decode GEMV launched with programmatic
dependent launch issues them before it waits for the previous kernel (overlap.kernels.norm_gemv), so its weights
stream from HBM while that kernel (the attention, a norm) runs and HBM would otherwise idle; its own loads then
hit L2. Pieces start 16-byte aligned (the caller checks the rows' addresses and n_el's share) and hold a multiple
of 16 bytes. Only for a compiled CUDA kernel: Triton's CPU interpreter runs no inline PTX.
"""

from __future__ import annotations

import triton
import triton.language as tl

L2_BYTES_DEFAULT = 32 << 20  # bytes a GEMV launch prefetches in all: within an H100/H200's 50 MB L2


@triton.jit
def prefetch_rows(row_ptrs, n_el, mask, CHUNKS: tl.constexpr):
    ebytes: tl.constexpr = row_ptrs.dtype.element_ty.primitive_bitwidth // 8
    align: tl.constexpr = 16 // ebytes  # 16 bytes in elements
    n_el = n_el // align * align
    piece = tl.cdiv(n_el, CHUNKS * align) * align  # elements of a piece, a multiple of 16 bytes
    start = tl.arange(0, CHUNKS) * piece
    size = tl.minimum(piece, tl.maximum(n_el - start, 0))  # elements; 0 for a piece past the row's end
    nbytes = tl.where(mask[:, None], size[None, :] * ebytes, 0).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [row_ptrs[:, None] + start[None, :], nbytes], dtype=tl.int32, is_pure=False, pack=1)
