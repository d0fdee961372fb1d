"""Decode GEMV for 2 to 16 rows on tensor cores, its weight tiles streamed through shared memory before the PDL wait.

    y = act(norm(x) @ w.T) (+ residual)    x (M, K) decode rows, 2 <= M <= 16; w (N, K); y (M, N) or (M, N/2)

overlap.kernels.stream_gemv's scheme (TMA copies of each program's first STAGES weight tiles into a ring of shared
memory before griddepcontrol.wait, then the K loop over the ring) for batch-16 decode, where one row's CUDA-core
products no longer keep up with the weight stream: each step multiplies the (BLOCK_N, BLOCK_K) weight tile, read from
shared memory in mma's A-operand layout, by x's (BLOCK_K, 16) tile (its rows past M are zeros), loaded from global
memory straight into the B-operand layout, with mma.sync (m16n8k16, fp32 sums): the output tile is y's transpose,
(BLOCK_N, 16). norm (RMSNorm, weight g) and SwiGLU are folded in as in stream_gemv and norm_gemv: x times g in the
K loop, its squares summed, rstd (and SwiGLU) applied to the fp32 sums at the end; with split-K the fp32 partials
and squares go to norm_gemv's reduce, which finishes them (and adds the residual).

Gluon, GPU-only (Triton's CPU interpreter does not run it): parity is tested on the GPU against `reference`
(tests/test_kernels_stream_mma.py), and its PTX compiled ahead of time on any machine.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from overlap.kernels.checks import KernelArgError, check_addend, check_dtype, check_matmul
from overlap.kernels.compile_options import FP_FUSION
from overlap.kernels.norm_gemv import split_k_reduce_kernel
from overlap.kernels.stream_gemv import DTYPES, _copy, _device, _launch_dependents, reference  # noqa: F401

OP = "stream_mma"
MAX_ROWS = 16  # the mma's N: x's rows, zero-padded to 16
BLOCK_N = 64  # weight rows a program (16 a warp; with SwiGLU as many gate rows and as many up rows)
BLOCK_K = 128  # columns a tile (64 with SwiGLU: the same bytes a stage)
STAGES = 4  # tiles in flight a program, all copied before the PDL wait
PROGRAMS_PER_SM = 2  # split-K target, as stream_gemv's (a SwiGLU program counts twice)
RUNTIME = True  # the runtime's stream_gemv=True also runs 2 to 16 decode rows through this kernel (Transformer.set_fused_)


@gluon.jit
def stream_mma_kernel(w_desc, x_ptr, g_ptr, y_ptr, r_ptr, part_ptr, ss_ptr, M, N_OUT, K, eps,
                      K_SHARE: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                      SPLIT_K: gl.constexpr, GDC: gl.constexpr, NORM: gl.constexpr = False,
                      SWIGLU: gl.constexpr = False, RESIDUAL: gl.constexpr = False, LATE: gl.constexpr = False):
    BLOCK_M: gl.constexpr = 16
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[gl.num_warps(), 1],
                                                   instr_shape=[16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8)
    N_TILES: gl.constexpr = K_SHARE // BLOCK_K
    HALVES: gl.constexpr = 2 if SWIGLU else 1
    dt: gl.constexpr = x_ptr.dtype.element_ty
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n0 = pid_n * BLOCK_N
    k_lo = pid_k * K_SHARE
    ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES * HALVES, BLOCK_N, BLOCK_K], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    fence_async_shared()
    for s in gl.static_range(STAGES):  # weights do not depend on the previous kernel: copy before the wait
        _copy(w_desc, ring, bars, s, n0, N_OUT, k_lo + s * BLOCK_K, s < N_TILES, HALVES)
    if GDC:
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)
        if not LATE:
            _launch_dependents()
    # x's (BLOCK_K, BLOCK_M) tile, transposed: row m of x is column m; rows past M read as zeros
    offs_k = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, b_layout))
    offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, b_layout))
    x_tile = x_ptr + offs_m[None, :] * K + (k_lo + offs_k)[:, None]
    rows = (offs_m < M)[None, :] & (offs_k >= 0)[:, None]
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, mma)
    acc_up = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, mma)
    ssv = gl.zeros([BLOCK_K, BLOCK_M], gl.float32, b_layout)  # x's squares, summed over K at the end
    xn = gl.load(x_tile, mask=rows, other=0.0)  # one step ahead: its latency overlaps the weight tile's wait
    gn = gl.load(g_ptr + k_lo + offs_k) if NORM else offs_k
    for i in range(N_TILES):
        slot = i % STAGES
        xt = xn
        gt = gn
        more = i + 1 < N_TILES
        xn = gl.load(x_tile + (i + 1) * BLOCK_K, mask=rows & more, other=0.0)
        if NORM:  # norm(x) = rstd * x * g: the squares summed here, rstd applied to the sums at the end
            gn = gl.load(g_ptr + k_lo + (i + 1) * BLOCK_K + offs_k, mask=(offs_k >= 0) & more, other=0.0)
            xf = xt.to(gl.float32)
            ssv += xf * xf
            xt = (xf * gt.to(gl.float32)[:, None]).to(dt)  # rounded where the unfused norm rounds
        mbarrier.wait(bars.index(slot), (i // STAGES) & 1)  # tile i has landed
        acc = mma_v2(ring.index(slot * HALVES).load(a_layout), xt, acc)
        if SWIGLU:
            acc_up = mma_v2(ring.index(slot * HALVES + 1).load(a_layout), xt, acc_up)
        # refill with the tile STAGES ahead (the compiler syncs the CTA before the buffer is overwritten)
        _copy(w_desc, ring, bars, slot, n0, N_OUT, k_lo + (i + STAGES) * BLOCK_K, i + STAGES < N_TILES, HALVES)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))
    if GDC and LATE:
        _launch_dependents()
    ss = gl.convert_layout(gl.sum(ssv, axis=0), gl.SliceLayout(0, mma))  # (BLOCK_M,)
    out_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    out_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
    mask = (out_n < N_OUT)[:, None] & (out_m < M)[None, :]
    if SPLIT_K == 1:
        y = acc
        up = acc_up
        if NORM:
            rstd = 1.0 / gl.sqrt(ss / K + eps)
            y = y * rstd[None, :]
            up = up * rstd[None, :]
        if SWIGLU:  # silu(gate) * up with the unfused steps' roundings: gate, up and silu(gate) in y's dtype
            gate = y.to(dt).to(gl.float32)
            y = (gate / (1.0 + gl.exp(-gate))).to(dt).to(gl.float32) * up.to(dt).to(gl.float32)
        offs = out_m[None, :] * N_OUT + out_n[:, None]
        y = y.to(dt)
        if RESIDUAL:  # y rounded, then y + r in fp32, rounded once (torch's add)
            y = (y.to(gl.float32) + gl.load(r_ptr + offs, mask=mask, other=0.0).to(gl.float32)).to(dt)
        gl.store(y_ptr + offs, y, mask=mask)
    else:  # fp32 partials (gate and up side by side) and the share's squares: norm_gemv's reduce finishes them
        base = part_ptr + pid_k * M * N_OUT * HALVES + out_m[None, :] * (N_OUT * HALVES) + out_n[:, None]
        gl.store(base, acc, mask=mask)
        if SWIGLU:
            gl.store(base + N_OUT, acc_up, mask=mask)
        if NORM:
            if pid_n == 0:
                gl.store(ss_ptr + pid_k * M + out_m, ss, mask=out_m < M)


def supported(x: torch.Tensor, w: torch.Tensor, block_k: int = BLOCK_K) -> bool:
    """Whether stream_mma runs here: 2 to 16 contiguous rows, CUDA of compute capability >= 9 (TMA), a 16-bit
    dtype, w's rows contiguous and 16-byte aligned, K a multiple of block_k."""
    return (x.is_cuda and 2 <= x.shape[0] <= MAX_ROWS and x.dtype in DTYPES and w.dtype == x.dtype
            and x.is_contiguous() and w.stride(1) == 1 and w.shape[1] % block_k == 0
            and w.data_ptr() % 16 == 0 and w.stride(0) * w.element_size() % 16 == 0 and _device(x.device)[0] >= 9)


def stream_mma(x: torch.Tensor, w: torch.Tensor, *, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
               swiglu: bool = False, block_n: int = BLOCK_N, block_k: int | None = None, stages: int = STAGES,
               split_k: int = 1, num_warps: int = 4, pdl: bool = False,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """act(norm(x) @ w.T) (+ residual) for 2 to 16 decode rows x (M, K), w (N, K) -> (M, N), or (M, N/2) with
    swiglu (w's rows [gate; up]); norm: RMSNorm with weight norm_weight (K,) when given; residual (the output's
    shape) added in the epilogue (the split-K reduce's). pdl: programmatic dependent launch (the first `stages`
    weight tiles are copied before the wait on the previous kernel). block_k: BLOCK_K, 64 with swiglu."""
    M, N, K = check_matmul(x, w, OP)
    check_dtype(x, DTYPES, OP)
    block_k = block_k or (BLOCK_K // 2 if swiglu else BLOCK_K)
    if not 2 <= M <= MAX_ROWS:
        raise KernelArgError(f"{OP}: takes 2 to {MAX_ROWS} rows, got x of {M}; use overlap.kernels.stream_gemv for "
                             f"one row and cuBLAS for more")
    if block_k not in (64, 128) or block_n % (16 * num_warps):
        raise KernelArgError(f"{OP}: block_k={block_k}, block_n={block_n}; valid: block_k 64 or 128, block_n a "
                             f"multiple of 16 x num_warps ({16 * num_warps})")
    if K % (block_k * split_k):
        raise KernelArgError(f"{OP}: K={K} is not a multiple of block_k x split_k = {block_k} x {split_k}")
    if norm_weight is not None and tuple(norm_weight.shape) != (K,):
        raise KernelArgError(f"{OP}: norm_weight has shape {tuple(norm_weight.shape)}, x's rows need ({K},)")
    if swiglu and N % 2:
        raise KernelArgError(f"{OP}: swiglu needs w's rows to be [gate; up] (an even count), got {N}")
    if not x.is_cuda or w.stride(1) != 1 or not x.is_contiguous():
        raise KernelArgError(f"{OP}: needs CUDA tensors, x contiguous and w's rows contiguous (x {x.device}, "
                             f"strides {x.stride()}, {w.stride()})")
    norm = norm_weight is not None
    n_out = N // 2 if swiglu else N
    residual = check_addend(residual, (M, n_out), x, OP, "residual")
    y = torch.empty((M, n_out), dtype=x.dtype, device=x.device)
    part = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device) if split_k > 1 else y
    ss = torch.empty((split_k, M), dtype=torch.float32, device=x.device) if split_k > 1 and norm else part
    r = y if residual is None else residual
    launch = {"launch_pdl": True} if pdl else {}
    dtype = gl.bfloat16 if w.dtype == torch.bfloat16 else gl.float16
    desc = TensorDescriptor.from_tensor(w, [block_n, block_k],
                                        gl.NVMMASharedLayout.get_default_for([block_n, block_k], dtype))
    stream_mma_kernel[(triton.cdiv(n_out, block_n), split_k)](
        desc, x, norm_weight if norm else x, y, r, part, ss, M, n_out, K, eps, K_SHARE=K // split_k,
        BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, SPLIT_K=split_k, GDC=pdl, NORM=norm, SWIGLU=swiglu,
        RESIDUAL=residual is not None and split_k == 1, LATE=split_k == 1, num_warps=num_warps, **launch,
        **FP_FUSION)
    if split_k > 1:
        split_k_reduce_kernel[(triton.cdiv(M * n_out, 256),)](part, ss, y, r, M, n_out, K, eps, BLOCK=256,
                                                              NORM=norm, SWIGLU=swiglu, SPLIT_K=split_k, GDC=pdl,
                                                              RESIDUAL=residual is not None, **launch,
                                                              **FP_FUSION)
    return y


def config(n: int, k: int, sm_count: int, swiglu: bool = False) -> dict:
    """The runtime's configuration for w (n, k): BLOCK_N weight rows a program (with swiglu that many gate and as
    many up rows), BLOCK_K columns a tile (half with swiglu: the same bytes a stage), STAGES tiles in flight, split-K
    to about PROGRAMS_PER_SM programs an SM (the smallest power of two; K's tiles divide evenly among the shares)."""
    block_k = BLOCK_K // 2 if swiglu else BLOCK_K
    programs = triton.cdiv(n // 2 if swiglu else n, BLOCK_N) * (2 if swiglu else 1)
    split, tiles = 1, k // block_k
    while programs * split < PROGRAMS_PER_SM * sm_count and tiles % (split * 2) == 0:
        split *= 2
    return dict(block_n=BLOCK_N, block_k=block_k, stages=STAGES, split_k=split)
