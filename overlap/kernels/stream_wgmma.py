"""Decode GEMV for 2 to 16 rows on Hopper's warp-group MMA, weights and x both read by the MMA from shared memory.

    y = act(x @ w.T)    x (M, K) decode rows, M <= 16; w (N, K); y (M, N), or (M, N/2) with SwiGLU

The weight is the MMA's A operand (BLOCK_N weight rows as M, 64 a warp group) and x's tile its B operand (16
columns, rows past M zero-filled by TMA), so y's transpose accumulates in registers. Weight tiles stream through
a ring of STAGES shared-memory buffers by TMA (the first STAGES copied before the PDL wait); x's share of K is
copied once after it. Each step issues the tile's wgmma asynchronously and waits for the one before, whose
buffer it then refills, so copies, MMAs and the wait overlap. With split-K the fp32 partials go to norm_gemv's
reduce.

Gluon, GPU-only (sm_90): parity is checked against stream_gemv.reference on the GPU.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from overlap.kernels.checks import KernelArgError, check_matmul
from overlap.kernels.compile_options import FP_FUSION
from overlap.kernels.norm_gemv import split_k_reduce_kernel
from overlap.kernels.stream_gemv import _copy, _launch_dependents, _tma_load

OP = "stream_wgmma"
MAX_ROWS = 16
X_SMEM_BYTES = 128 << 10  # x's share of K held in shared memory: K / split_k x 16 rows x 2 bytes at most this


@gluon.jit
def stream_wgmma_kernel(w_desc, x_desc, y_ptr, part_ptr, M, N_OUT,
                        K_SHARE: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                        SPLIT_K: gl.constexpr, GDC: gl.constexpr, SWIGLU: gl.constexpr = False):
    BLOCK_M: gl.constexpr = 16
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                         instr_shape=[16, BLOCK_M, 16])
    N_TILES: gl.constexpr = K_SHARE // BLOCK_K
    HALVES: gl.constexpr = 2 if SWIGLU else 1
    dt: gl.constexpr = w_desc.dtype
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n0 = pid_n * BLOCK_N
    k_lo = pid_k * K_SHARE
    ring = gl.allocate_shared_memory(dt, [STAGES * HALVES, BLOCK_N, BLOCK_K], w_desc.layout)
    xs = gl.allocate_shared_memory(dt, [N_TILES, BLOCK_M, BLOCK_K], x_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    xbar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    mbarrier.init(xbar.index(0), count=1)
    fence_async_shared()
    for s in gl.static_range(STAGES):  # weights do not depend on the previous kernel: copy before the wait
        _copy(w_desc, ring, bars, s, n0, N_OUT, k_lo + s * BLOCK_K, s < N_TILES, HALVES)
    if GDC:
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)
        _launch_dependents()
    mbarrier.expect(xbar.index(0), N_TILES * x_desc.block_type.nbytes)
    for t in gl.static_range(N_TILES):
        _tma_load(x_desc, [0, k_lo + t * BLOCK_K], xbar.index(0), xs.index(t))
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, acc_layout)
    acc_up = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, acc_layout)
    mbarrier.wait(xbar.index(0), 0)
    for i in range(N_TILES):
        slot = i % STAGES
        mbarrier.wait(bars.index(slot), (i // STAGES) & 1)  # tile i has landed
        xt = xs.index(i).permute((1, 0))  # (BLOCK_K, 16): x's tile as B
        acc = warpgroup_mma(ring.index(slot * HALVES), xt, acc, is_async=True)
        if SWIGLU:
            acc_up = warpgroup_mma(ring.index(slot * HALVES + 1), xt, acc_up, is_async=True)
            acc, acc_up = warpgroup_mma_wait(num_outstanding=2, deps=[acc, acc_up])  # tile i - 1's are done
        else:
            acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])
        # tile i - 1's buffer is free: refill it with the tile STAGES after it
        prev = (i + STAGES - 1) % STAGES
        _copy(w_desc, ring, bars, prev, n0, N_OUT, k_lo + (i - 1 + STAGES) * BLOCK_K,
              (i >= 1) & (i - 1 + STAGES < N_TILES), HALVES)
    if SWIGLU:
        acc, acc_up = warpgroup_mma_wait(num_outstanding=0, deps=[acc, acc_up])
    else:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))
    mbarrier.invalidate(xbar.index(0))
    out_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))
    out_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_layout))
    mask = (out_n < N_OUT)[:, None] & (out_m < M)[None, :]
    if SPLIT_K == 1:
        y = acc
        if SWIGLU:  # silu(gate) * up with the unfused steps' roundings
            gate = acc.to(dt).to(gl.float32)
            y = (gate / (1.0 + gl.exp(-gate))).to(dt).to(gl.float32) * acc_up.to(dt).to(gl.float32)
        gl.store(y_ptr + out_m[None, :] * N_OUT + out_n[:, None], y.to(dt), mask=mask)
    else:  # fp32 partials, gate and up side by side: norm_gemv's reduce finishes them
        base = part_ptr + pid_k * M * N_OUT * HALVES + out_m[None, :] * (N_OUT * HALVES) + out_n[:, None]
        gl.store(base, acc, mask=mask)
        if SWIGLU:
            gl.store(base + N_OUT, acc_up, mask=mask)


def stream_wgmma(x: torch.Tensor, w: torch.Tensor, *, swiglu: bool = False, block_n: int = 64,
                 block_k: int = 128, stages: int = 4, split_k: int = 1, num_warps: int = 4,
                 pdl: bool = False) -> torch.Tensor:
    """act(x @ w.T) for up to 16 decode rows x (M, K), w (N, K) -> (M, N), or (M, N/2) with swiglu (w's rows
    [gate; up])."""
    M, N, K = check_matmul(x, w, OP)
    if not 1 <= M <= MAX_ROWS or block_n % (16 * num_warps) or K % (block_k * split_k):
        raise KernelArgError(f"{OP}: M={M} (1..{MAX_ROWS}), block_n={block_n} (a multiple of 16 x num_warps), "
                             f"K={K} (a multiple of block_k x split_k = {block_k} x {split_k})")
    if (K // split_k) * MAX_ROWS * x.element_size() > X_SMEM_BYTES:
        raise KernelArgError(f"{OP}: x's share of K ({K // split_k} columns) does not fit {X_SMEM_BYTES} bytes of "
                             f"shared memory; raise split_k")
    n_out = N // 2 if swiglu else N
    y = torch.empty((M, n_out), dtype=x.dtype, device=x.device)
    part = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device) if split_k > 1 else y
    dtype = gl.bfloat16 if w.dtype == torch.bfloat16 else gl.float16
    w_desc = TensorDescriptor.from_tensor(w, [block_n, block_k],
                                          gl.NVMMASharedLayout.get_default_for([block_n, block_k], dtype))
    x_desc = TensorDescriptor.from_tensor(x, [MAX_ROWS, block_k],
                                          gl.NVMMASharedLayout.get_default_for([MAX_ROWS, block_k], dtype))
    launch = {"launch_pdl": True} if pdl else {}
    stream_wgmma_kernel[(triton.cdiv(n_out, block_n), split_k)](
        w_desc, x_desc, y, part, M, n_out, K_SHARE=K // split_k, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages,
        SPLIT_K=split_k, GDC=pdl, SWIGLU=swiglu, num_warps=num_warps, **launch, **FP_FUSION)
    if split_k > 1:
        split_k_reduce_kernel[(triton.cdiv(M * n_out, 256),)](part, part, y, y, M, n_out, K, 1e-5, BLOCK=256,
                                                              NORM=False, SWIGLU=swiglu, SPLIT_K=split_k, GDC=pdl,
                                                              RESIDUAL=False, **launch, **FP_FUSION)
    return y
