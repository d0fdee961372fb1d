"""Decode GEMV (one row) whose weight tiles stream through shared memory, the first ones before the PDL wait.

    y = x @ w.T        x (1, K) a decode row, w (N, K) an nn.Linear weight, y (1, N)

The Triton GEMV (overlap.kernels.norm_gemv) can load one weight tile before griddepcontrol.wait: held in
registers, more tiles cost occupancy (docs/benchmarks/pdl.md). Here each program (BLOCK_N rows, the s-th of
SPLIT_K shares of K) issues TMA copies of its first STAGES weight tiles into shared memory (one mbarrier a
buffer), then waits for the previous kernel (x is its output), then runs its K loop over the ring of STAGES
buffers: wait for tile i's barrier, multiply the tile by x's (fp32 products, summed per row), refill that
buffer with the tile STAGES ahead. So with programmatic dependent launch up to STAGES x BLOCK_N x BLOCK_K
weight elements a program are read from HBM while the previous kernel (attention, a norm) still runs.

Written in Gluon (triton.experimental.gluon, explicit layouts and shared memory), which Triton's CPU
interpreter does not run: parity is tested on the GPU (tests/test_kernels_stream_gemv.py) against
`reference`, plain torch. With SPLIT_K > 1 the fp32 partials are summed, in split order, by norm_gemv's
reduce kernel.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from overlap.kernels.checks import KernelArgError, check_dtype, check_matmul
from overlap.kernels.norm_gemv import split_k_reduce_kernel

OP = "stream_gemv"
DTYPES = (torch.bfloat16, torch.float16)
BLOCK_N = 32  # the runtime's configuration (streamed): weight rows a program
BLOCK_K = 128  # columns a tile
STAGES = 3  # tiles in flight a program (3 x 32 x 128 bf16: 24 KB of shared memory), all copied before the PDL wait;
# of 2, 3, 4 and 8, 3 made the R = 4 batch-1 step fastest on an H200 (docs/benchmarks/pdl.md, "stream_gemv")
PROGRAMS_PER_SM = 2  # split-K target, as norm_gemv's
# the TMA load: Triton 3.6 names it async_copy_global_to_shared, later releases async_load
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def stream_gemv_kernel(w_desc, x_ptr, y_ptr, part_ptr, N,
                       K_SHARE: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                       SPLIT_K: gl.constexpr, GDC: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
    N_TILES: gl.constexpr = K_SHARE // BLOCK_K
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n0 = pid_n * BLOCK_N
    k_lo = pid_k * K_SHARE
    ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    fence_async_shared()
    for s in gl.static_range(STAGES):  # weights do not depend on the previous kernel: copy before the wait
        mbarrier.expect(bars.index(s), w_desc.block_type.nbytes, pred=s < N_TILES)
        _tma_load(w_desc, [n0, k_lo + s * BLOCK_K], bars.index(s), ring.index(s), pred=s < N_TILES)
    if GDC:
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)
    acc = gl.zeros([BLOCK_N, BLOCK_K], gl.float32, layout)
    offs_k = k_lo + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, layout))
    for i in range(N_TILES):
        slot = i % STAGES
        xt = gl.load(x_ptr + offs_k + i * BLOCK_K).to(gl.float32)  # (BLOCK_K,), from L2
        mbarrier.wait(bars.index(slot), (i // STAGES) & 1)  # tile i has landed
        acc += ring.index(slot).load(layout).to(gl.float32) * xt[None, :]
        refill = i + STAGES < N_TILES  # the compiler syncs the CTA before the buffer is overwritten
        mbarrier.expect(bars.index(slot), w_desc.block_type.nbytes, pred=refill)
        _tma_load(w_desc, [n0, k_lo + (i + STAGES) * BLOCK_K], bars.index(slot), ring.index(slot), pred=refill)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))
    out: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])  # one thread an output
    y = gl.convert_layout(gl.sum(acc, axis=1), out)  # (BLOCK_N,)
    offs_n = n0 + gl.arange(0, BLOCK_N, layout=out)
    if SPLIT_K == 1:
        gl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)
    else:
        gl.store(part_ptr + pid_k * N + offs_n, y, mask=offs_n < N)


def supported(x: torch.Tensor, w: torch.Tensor, block_k: int) -> bool:
    """Whether stream_gemv runs here: one row, CUDA (compute capability >= 9: TMA), a 16-bit dtype, rows of w
    contiguous and 16-byte aligned (TMA) and K a multiple of block_k."""
    return (x.is_cuda and x.shape[0] == 1 and x.dtype in DTYPES and w.dtype == x.dtype and w.stride(1) == 1
            and x.stride(-1) == 1 and w.shape[1] % block_k == 0
            and w.data_ptr() % 16 == 0 and w.stride(0) * w.element_size() % 16 == 0 and _device(x.device)[0] >= 9)


@functools.cache
def _device(device: torch.device) -> tuple[int, int]:
    """(compute capability major, multiprocessors) of a CUDA device."""
    p = torch.cuda.get_device_properties(device)
    return p.major, p.multi_processor_count


def stream_gemv(x: torch.Tensor, w: torch.Tensor, *, block_n: int = BLOCK_N, block_k: int = BLOCK_K,
                stages: int = STAGES, split_k: int = 1, num_warps: int = 4, pdl: bool = False) -> torch.Tensor:
    """x @ w.T for one decode row x (1, K), w (N, K) -> (1, N). pdl: launch with programmatic dependent launch
    (compute capability >= 9): the first `stages` weight tiles are copied before the wait on the previous kernel."""
    M, N, K = check_matmul(x, w, OP)
    check_dtype(x, DTYPES, OP)
    if M != 1:
        raise KernelArgError(f"{OP}: takes one row, got x of {M} rows; use overlap.kernels.norm_gemv for more")
    if block_k not in (64, 128, 256):
        raise KernelArgError(f"{OP}: block_k={block_k}; valid: a power of two from 64 to 256")
    if K % (block_k * split_k):
        raise KernelArgError(f"{OP}: K={K} is not a multiple of block_k x split_k = {block_k} x {split_k}")
    if not x.is_cuda or w.stride(1) != 1 or x.stride(-1) != 1:
        raise KernelArgError(f"{OP}: needs CUDA tensors with contiguous rows (x {x.device}, strides "
                             f"{x.stride()}, {w.stride()})")
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    part = torch.empty((split_k, 1, N), dtype=torch.float32, device=x.device) if split_k > 1 else y
    launch = {"launch_pdl": True} if pdl else {}
    dtype = gl.bfloat16 if w.dtype == torch.bfloat16 else gl.float16
    desc = TensorDescriptor.from_tensor(w, [block_n, block_k], gl.NVMMASharedLayout.get_default_for([block_n, block_k],
                                                                                                   dtype))
    stream_gemv_kernel[(triton.cdiv(N, block_n), split_k)](
        desc, x, y, part, N, K_SHARE=K // split_k, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages,
        SPLIT_K=split_k, GDC=pdl, num_warps=num_warps, **launch)
    if split_k > 1:
        block = 256
        split_k_reduce_kernel[(triton.cdiv(N, block),)](part, part, y, 1, N, K, 0.0, BLOCK=block, NORM=False,
                                                        SWIGLU=False, SPLIT_K=split_k, GDC=pdl, **launch)
    return y


def config(n: int, k: int, sm_count: int) -> dict:
    """The runtime's configuration for w (n, k): BLOCK_N x BLOCK_K tiles, STAGES of them in flight, split-K to
    about PROGRAMS_PER_SM programs an SM (the smallest power of two; K's tiles divide evenly among the shares)."""
    split, tiles = 1, k // BLOCK_K
    while triton.cdiv(n, BLOCK_N) * split < PROGRAMS_PER_SM * sm_count and tiles % (split * 2) == 0:
        split *= 2
    return dict(block_n=BLOCK_N, block_k=BLOCK_K, stages=STAGES, split_k=split)


def streamed(fallback):
    """An Ops.gemv / Ops.gemv_down (x (M, K), w) -> (M, N) that runs one-row CUDA calls through stream_gemv with
    PDL (config) and every other call through fallback (the Triton GEMV)."""
    def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if not supported(x, w, BLOCK_K):
            return fallback(x, w)
        return stream_gemv(x, w, pdl=True, **config(w.shape[0], w.shape[1], _device(x.device)[1]))

    return gemv


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Plain torch: x @ w.T with fp32 accumulation, rounded to x's dtype."""
    return (x.float() @ w.float().T).to(x.dtype)
