"""Decode GEMV (one row) whose weight tiles stream through shared memory, the first ones before the PDL wait.

    y = act(norm(x) @ w.T)        x (1, K) a decode row, w (N, K) an nn.Linear weight, y (1, N)
    norm, act: optional RMSNorm before (weight g) and SwiGLU after (w's rows [gate; up], y (1, N/2)), as in
    overlap.kernels.norm_gemv: the norm's rstd factors out of the product (rstd * ((x * g) @ w.T)), so the K loop
    sums x's squares and multiplies x by g; rstd and SwiGLU are applied to the fp32 sums at the end.

The Triton GEMV (overlap.kernels.norm_gemv) can load one weight tile before griddepcontrol.wait: held in
registers, more tiles cost occupancy (docs/benchmarks/pdl.md). Here each program (BLOCK_N rows, the s-th of
SPLIT_K shares of K) issues TMA copies of its first STAGES weight tiles into shared memory (one mbarrier a
buffer), then waits for the previous kernel (x is its output), then runs its K loop over the ring of STAGES
buffers: wait for tile i's barrier, multiply the tile by x's (fp32 products, summed per row), refill that
buffer with the tile STAGES ahead. So with programmatic dependent launch up to STAGES x BLOCK_N x BLOCK_K
weight elements a program are read from HBM while the previous kernel (attention, a norm) still runs.

A program lets the next kernel launch right after its wait when a split-K reduce follows (the reduce, small,
then launches its own successor only after its wait), and after its K loop otherwise (LATE): launched at once,
the next GEMV (w13's unsplit program before w2's at R = 4) set its programs and tile copies beside this one's
and the batch-1 step was 0.5 ms slower on an H200; after the K loop for every split, 0.05 ms slower
(docs/benchmarks/pdl.md, section "The residual in the output GEMMs' epilogue; when the next kernel launches").

Written in Gluon (triton.experimental.gluon, explicit layouts and shared memory), which Triton's CPU
interpreter does not run: parity is tested on the GPU (tests/test_kernels_stream_gemv.py) against
`reference`, plain torch. With SPLIT_K > 1 the fp32 partials (and the shares' sums of squares) are summed, in
split order, by norm_gemv's reduce kernel, which applies rstd and SwiGLU. In the runtime (`streamed`,
`streamed_norm_linear`) a batch-1 decode block runs attn_norm + wqkv, wo, mlp_norm + w13 + SwiGLU and w2 through
it: four launches (plus split-K reduces) where the separate steps took seven.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from overlap.kernels.checks import KernelArgError, check_addend, check_dtype, check_matmul
from overlap.kernels.compile_options import FP_FUSION
from overlap.kernels.norm_gemv import split_k_reduce_kernel
from overlap.ops import norm_linear

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
def stream_gemv_kernel(w_desc, x_ptr, g_ptr, y_ptr, part_ptr, ss_ptr, N_OUT, K, eps,
                       K_SHARE: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                       SPLIT_K: gl.constexpr, GDC: gl.constexpr, NORM: gl.constexpr = False,
                       SWIGLU: gl.constexpr = False, LATE: gl.constexpr = False):
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
    N_TILES: gl.constexpr = K_SHARE // BLOCK_K
    HALVES: gl.constexpr = 2 if SWIGLU else 1  # with SwiGLU a stage holds the gate tile and the matching up tile
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
    acc = gl.zeros([BLOCK_N, BLOCK_K], gl.float32, layout)
    acc_up = gl.zeros([BLOCK_N, BLOCK_K], gl.float32, layout)
    ssv = gl.zeros([BLOCK_K], gl.float32, gl.SliceLayout(0, layout))  # x's squares, this share (summed at the end:
    # a sum across warps every step would sync the CTA there)
    offs_k = k_lo + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, layout))
    # x's tile (and g's) one step ahead: its L2 latency overlaps the wait for the weight tile and the products
    xn = gl.load(x_ptr + offs_k)
    gn = gl.load(g_ptr + offs_k) if NORM else xn
    for i in range(N_TILES):
        slot = i % STAGES
        xt = xn.to(gl.float32)  # (BLOCK_K,)
        gt = gn.to(gl.float32)
        ahead = offs_k + (i + 1) * BLOCK_K
        more = ahead < k_lo + K_SHARE
        xn = gl.load(x_ptr + ahead, mask=more, other=0.0)
        if NORM:  # norm(x) = rstd * x * g: the squares summed here, rstd applied to the sums at the end
            gn = gl.load(g_ptr + ahead, mask=more, other=0.0)
            ssv += xt * xt
            xt = (xt * gt).to(x_ptr.dtype.element_ty).to(gl.float32)  # rounded where the unfused norm rounds
        mbarrier.wait(bars.index(slot), (i // STAGES) & 1)  # tile i has landed
        acc += ring.index(slot * HALVES).load(layout).to(gl.float32) * xt[None, :]
        if SWIGLU:
            acc_up += ring.index(slot * HALVES + 1).load(layout).to(gl.float32) * xt[None, :]
        # refill with the tile STAGES ahead (the compiler syncs the CTA before the buffer is overwritten)
        _copy(w_desc, ring, bars, slot, n0, N_OUT, k_lo + (i + STAGES) * BLOCK_K, i + STAGES < N_TILES, HALVES)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))
    if GDC and LATE:
        _launch_dependents()
    out: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])  # one thread an output
    y = gl.convert_layout(gl.sum(acc, axis=1), out)  # (BLOCK_N,)
    up = gl.convert_layout(gl.sum(acc_up, axis=1), out)
    offs_n = n0 + gl.arange(0, BLOCK_N, layout=out)
    ss = gl.sum(ssv, axis=0)
    if SPLIT_K == 1:
        if NORM:
            rstd = 1.0 / gl.sqrt(ss / K + eps)
            y = y * rstd
            up = up * rstd
        if SWIGLU:  # silu(gate) * up with the unfused steps' roundings: gate, up and silu(gate) in y's dtype
            dt: gl.constexpr = y_ptr.dtype.element_ty
            gate = y.to(dt).to(gl.float32)
            y = (gate / (1.0 + gl.exp(-gate))).to(dt).to(gl.float32) * up.to(dt).to(gl.float32)
        gl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N_OUT)
    else:  # fp32 partials (gate and up side by side) and the share's sum of squares: norm_gemv's reduce finishes
        gl.store(part_ptr + pid_k * N_OUT * HALVES + offs_n, y, mask=offs_n < N_OUT)
        if SWIGLU:
            gl.store(part_ptr + pid_k * N_OUT * HALVES + N_OUT + offs_n, up, mask=offs_n < N_OUT)
        if NORM:
            if pid_n == 0:
                gl.store(ss_ptr + pid_k, ss)


@gluon.jit
def _launch_dependents():
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _copy(w_desc, ring, bars, slot, n0, N_OUT, k, pred, HALVES: gl.constexpr):
    """TMA copies of the weight tile at rows n0 (and with SwiGLU the up rows n0 + N_OUT), columns k, into the
    ring's buffer(s) of stage `slot`, completing on its mbarrier; nothing when pred is false."""
    mbarrier.expect(bars.index(slot), HALVES * w_desc.block_type.nbytes, pred=pred)
    _tma_load(w_desc, [n0, k], bars.index(slot), ring.index(slot * HALVES), pred=pred)
    if HALVES == 2:
        _tma_load(w_desc, [n0 + N_OUT, k], bars.index(slot), ring.index(slot * HALVES + 1), pred=pred)


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


def stream_gemv(x: torch.Tensor, w: torch.Tensor, *, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
                swiglu: bool = False, block_n: int = BLOCK_N, block_k: int = BLOCK_K, stages: int = STAGES,
                split_k: int = 1, num_warps: int = 4, pdl: bool = False,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """act(norm(x) @ w.T) for one decode row x (1, K), w (N, K) -> (1, N), or (1, N/2) with swiglu (w's rows
    [gate; up]); norm: RMSNorm with weight norm_weight (K,) when given. pdl: launch with programmatic dependent
    launch (compute capability >= 9): the first `stages` weight tiles are copied before the wait on the previous
    kernel. residual (the output's shape): added in the split-K reduce's epilogue (without split-K, by torch)."""
    M, N, K = check_matmul(x, w, OP)
    check_dtype(x, DTYPES, OP)
    if M != 1:
        raise KernelArgError(f"{OP}: takes one row, got x of {M} rows; use overlap.kernels.norm_gemv for more")
    if block_k not in (64, 128, 256):
        raise KernelArgError(f"{OP}: block_k={block_k}; valid: a power of two from 64 to 256")
    if K % (block_k * split_k):
        raise KernelArgError(f"{OP}: K={K} is not a multiple of block_k x split_k = {block_k} x {split_k}")
    if norm_weight is not None and tuple(norm_weight.shape) != (K,):
        raise KernelArgError(f"{OP}: norm_weight has shape {tuple(norm_weight.shape)}, x's rows need ({K},)")
    if swiglu and N % 2:
        raise KernelArgError(f"{OP}: swiglu needs w's rows to be [gate; up] (an even count), got {N}")
    if not x.is_cuda or w.stride(1) != 1 or x.stride(-1) != 1:
        raise KernelArgError(f"{OP}: needs CUDA tensors with contiguous rows (x {x.device}, strides "
                             f"{x.stride()}, {w.stride()})")
    norm = norm_weight is not None
    n_out = N // 2 if swiglu else N
    residual = check_addend(residual, (1, n_out), x, OP, "residual")
    y = torch.empty((1, n_out), dtype=x.dtype, device=x.device)
    part = torch.empty((split_k, 1, N), dtype=torch.float32, device=x.device) if split_k > 1 else y
    ss = torch.empty((split_k, 1), dtype=torch.float32, device=x.device) if split_k > 1 and norm else part
    launch = {"launch_pdl": True} if pdl else {}
    dtype = gl.bfloat16 if w.dtype == torch.bfloat16 else gl.float16
    desc = TensorDescriptor.from_tensor(w, [block_n, block_k], gl.NVMMASharedLayout.get_default_for([block_n, block_k],
                                                                                                   dtype))
    stream_gemv_kernel[(triton.cdiv(n_out, block_n), split_k)](
        desc, x, norm_weight if norm else x, y, part, ss, n_out, K, eps, K_SHARE=K // split_k, BLOCK_N=block_n,
        BLOCK_K=block_k, STAGES=stages, SPLIT_K=split_k, GDC=pdl, NORM=norm, SWIGLU=swiglu, num_warps=num_warps,
        LATE=split_k == 1, **launch, **FP_FUSION)
    if split_k == 1:  # the next kernel (LATE: launched after the K loop) consumes y
        return y if residual is None else y + residual
    block = 256
    split_k_reduce_kernel[(triton.cdiv(n_out, block),)](part, ss, y, y if residual is None else residual, 1, n_out,
                                                        K, eps, BLOCK=block, NORM=norm, SWIGLU=swiglu,
                                                        SPLIT_K=split_k, GDC=pdl, LAUNCH_AFTER_WAIT=True,
                                                        RESIDUAL=residual is not None, **launch, **FP_FUSION)
    return y


def config(n: int, k: int, sm_count: int, swiglu: bool = False) -> dict:
    """The runtime's configuration for w (n, k): BLOCK_N x BLOCK_K tiles (with swiglu BLOCK_N / 2 gate rows and
    as many up rows: the same bytes a stage), STAGES of them in flight, split-K to about PROGRAMS_PER_SM programs
    an SM (the smallest power of two; K's tiles divide evenly among the shares)."""
    block_n = BLOCK_N // 2 if swiglu else BLOCK_N
    programs = triton.cdiv(n // 2 if swiglu else n, block_n)
    split, tiles = 1, k // BLOCK_K
    while programs * split < PROGRAMS_PER_SM * sm_count and tiles % (split * 2) == 0:
        split *= 2
    return dict(block_n=block_n, block_k=BLOCK_K, stages=STAGES, split_k=split)


def streamed(fallback):
    """An Ops.gemv / Ops.gemv_down (x (M, K), w[, residual]) -> (M, N) that runs one-row CUDA calls through
    stream_gemv with PDL (config), 2 to 16 rows through stream_mma where stream_mma.RUNTIME (its config), and every
    other call through fallback (the Triton GEMV)."""
    from overlap.kernels import stream_mma as sm

    def gemv(x: torch.Tensor, w: torch.Tensor, **residual) -> torch.Tensor:
        if sm.RUNTIME and sm.supported(x, w):
            return sm.stream_mma(x, w, pdl=True, **residual, **sm.config(w.shape[0], w.shape[1], _device(x.device)[1]))
        if not supported(x, w, BLOCK_K):
            return fallback(x, w, **residual)
        return stream_gemv(x, w, pdl=True, **residual, **config(w.shape[0], w.shape[1], _device(x.device)[1]))

    return gemv


def streamed_norm_linear(ops):
    """An Ops.norm_linear (x (M, K), w, norm_weight, eps, gated) that runs one-row CUDA calls through stream_gemv
    (2 to 16 rows through stream_mma where stream_mma.RUNTIME) with the norm (and SwiGLU when gated) fused, with PDL;
    every other call through ops.norm_linear when set (the norm_gemv kernel), else as ops' separate steps (norm,
    gemv, swiglu)."""
    from overlap.kernels import stream_mma as sm

    def norm_linear(x: torch.Tensor, w: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    gated: bool) -> torch.Tensor:
        sms = _device(x.device)[1] if x.is_cuda else 1
        if sm.RUNTIME and sm.supported(x, w, sm.BLOCK_K // 2 if gated else sm.BLOCK_K):
            return sm.stream_mma(x, w, norm_weight=norm_weight, eps=eps, swiglu=gated, pdl=True,
                                 **sm.config(w.shape[0], w.shape[1], sms, swiglu=gated))
        if not supported(x, w, BLOCK_K):
            if ops.norm_linear is not None:
                return ops.norm_linear(x, w, norm_weight, eps, gated)
            y = ops.gemv(ops.norm(x, norm_weight, eps), w)
            return ops.swiglu(y, w.shape[0] // 2) if gated else y
        return stream_gemv(x, w, norm_weight=norm_weight, eps=eps, swiglu=gated, pdl=True,
                           **config(w.shape[0], w.shape[1], sms, swiglu=gated))

    return norm_linear


def reference(x: torch.Tensor, w: torch.Tensor, *, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
              swiglu: bool = False) -> torch.Tensor:
    """Plain torch: the unfused steps (overlap.ops.norm_linear: rms_norm, F.linear with fp32 accumulation,
    swiglu), what the eager runtime runs."""
    if norm_weight is None and not swiglu:
        return (x.float() @ w.float().T).to(x.dtype)
    return norm_linear(x, w, norm_weight, eps, swiglu)
