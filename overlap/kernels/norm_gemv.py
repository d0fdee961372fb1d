"""Decode GEMV with the steps around it fused: RMSNorm before, SwiGLU after, split-K for skinny weights.

    y = act(norm(x) @ w.T)        x (M, K) with M = 1..16 decode rows, w (N, K) an nn.Linear weight
    norm(x) = rms_norm(x, g, eps) when g is given: fp32 statistics, rounded to x's dtype (F.rms_norm)
    act(y)  = silu(y[:, :F]) * y[:, F:] when swiglu (w's rows are [gate; up], F = N / 2), else y

In overlap.model's decode step these are attn_norm + wqkv and mlp_norm + w13 + SwiGLU: one launch (two
with split-K) instead of two or three, and the norm's output and w13's (M, 2F) never go through memory.

The norm's per-row scale factors out of the product: norm(x) @ w.T = rstd * ((x * g) @ w.T), rstd =
1 / sqrt(mean(x^2) + eps). So the kernel streams x once: each step of its K loop adds the tile's squares to
the rows' sums, and multiplies the tile by g before tl.dot; rstd is applied to the fp32 sums at the end.
(A first version computed the statistics in a separate loop over the whole K before the product: on an
H200 that serial prologue took the R = 4 shard's decode step from 10.8 to 17.0 ms: docs/benchmarks/norm_gemv.md.)
Roundings: x * g is rounded to x's dtype where the unfused steps round norm(x) (a per-row scale apart);
gate and up are rounded to x's dtype before SwiGLU, as the steps store them; products accumulate in fp32.

Program (n, s) owns BLOCK_N output columns (with swiglu: BLOCK_N gate and the matching up columns) and the
s-th of SPLIT_K equal shares of K. With SPLIT_K = 1 it applies rstd and the epilogue and stores y;
otherwise it stores fp32 partials (and, for program column 0, its share's sums of squares) and a second
kernel sums them in split order (deterministic), then applies rstd and the epilogue. split_k="auto" picks
the smallest power of two that gives about PROGRAMS_PER_SM weight tiles per SM in flight (a SwiGLU program's
gate and up tiles count as two, so w13 splits alike with SwiGLU or without), so a weight with few output
columns (wqkv, wo of a TP shard) still reads its bytes with every SM.

The reference is `reference` (overlap.ops.norm_linear): rms_norm, F.linear and swiglu, what the eager runtime runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from overlap.kernels.checks import KernelArgError, check_addend, check_decode_rows, check_dtype, check_matmul
from overlap.kernels.compile_options import FP_FUSION
from overlap.kernels.schedule import DECODE_MAX_M
from overlap.ops import norm_linear

OP = "norm_gemv"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PDL_PRELOAD_TILES = 1  # with pdl: K tiles a program loads before it waits for the previous kernel; on an H200
# 4 bought nothing measurable over 1 (docs/benchmarks/pdl.md)
PROGRAMS_PER_SM = 2  # split-K target: programs in flight per SM; 4 made the R = 4 decode step 0.2 ms slower on an
# H200 (docs/benchmarks/pdl.md)
TMA = False  # the runtime's ops (gemv_op, gemv_down_op, swiglu_gemv_op, norm_linear_op) read w through TMA


@triton.jit
def norm_gemv_kernel(
    x_ptr, g_ptr, w_ptr, y_ptr, r_ptr, part_ptr, ss_ptr,  # x (M, K), g (K,), w (N, K), y and r (M, N_OUT),
    M, N_OUT, K, K_SHARE, stride_xm, stride_wn, eps,  # part (SPLIT_K, M, N), ss (SPLIT_K, M); N_OUT: F with swiglu
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORM: tl.constexpr, SWIGLU: tl.constexpr, SPLIT_K: tl.constexpr,
    PRELOAD: tl.constexpr = 0, GDC: tl.constexpr = False, RESIDUAL: tl.constexpr = False, TMA: tl.constexpr = False,
):  # TMA: w_ptr is a (BLOCK_N, BLOCK_K) tensor descriptor of w
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_OUT
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ss = tl.zeros((BLOCK_M,), dtype=tl.float32)  # the rows' sums of squares over this program's share of K
    k_lo = pid_k * K_SHARE
    k_start = k_lo
    if PRELOAD:  # the first PRELOAD weight tiles, loaded before waiting on the previous kernel: with PDL they
        # stream while that kernel finishes (weights do not depend on it); one wide step, within the share
        k_end = tl.minimum(K, k_lo + K_SHARE)
        wt0, wu0 = _weights(w_ptr, offs_n, mask_n, k_lo, k_end, N_OUT, stride_wn, BLOCK_K * PRELOAD, SWIGLU, TMA,
                            pid_n * BLOCK_N)
        if GDC:
            tl.extra.cuda.gdc_wait()  # x is the previous kernel's output: visible after this
            tl.extra.cuda.gdc_launch_dependents()  # the next kernel may launch (it waits for this one's end)
        acc, acc_up, ss = _tile(x_ptr, g_ptr, wt0, wu0, acc, acc_up, ss, offs_m, mask_m, k_lo, k_end, stride_xm,
                                BLOCK_K * PRELOAD, NORM, SWIGLU)
        k_start = k_lo + BLOCK_K * PRELOAD
    elif GDC:  # nothing loaded before the wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    for k0 in range(k_start, k_lo + K_SHARE, BLOCK_K):
        wt, wu = _weights(w_ptr, offs_n, mask_n, k0, K, N_OUT, stride_wn, BLOCK_K, SWIGLU, TMA, pid_n * BLOCK_N)
        acc, acc_up, ss = _tile(x_ptr, g_ptr, wt, wu, acc, acc_up, ss, offs_m, mask_m, k0, K, stride_xm,
                                BLOCK_K, NORM, SWIGLU)
    tile_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if NORM:
            rstd = 1.0 / tl.sqrt(ss / K + eps)
            acc = acc * rstd[:, None]
            if SWIGLU:
                acc_up = acc_up * rstd[:, None]
        if SWIGLU:
            acc = _swiglu(acc, acc_up, y_ptr)
        offs = offs_m[:, None] * N_OUT + offs_n[None, :]
        tl.store(y_ptr + offs, _with_residual(acc, r_ptr, offs, tile_mask, y_ptr, RESIDUAL), mask=tile_mask)
    else:
        n_all = N_OUT  # a partial holds gate and up columns side by side
        if SWIGLU:
            n_all = N_OUT * 2
        base = part_ptr + pid_k * M * n_all + offs_m[:, None] * n_all + offs_n[None, :]
        tl.store(base, acc, mask=tile_mask)
        if SWIGLU:
            tl.store(base + N_OUT, acc_up, mask=tile_mask)
        if NORM:
            if pid_n == 0:
                tl.store(ss_ptr + pid_k * M + offs_m, ss, mask=mask_m)


@triton.jit
def _weights(w_ptr, offs_n, mask_n, k0, K, N_OUT, stride_wn, BLOCK_K: tl.constexpr, SWIGLU: tl.constexpr,
             TMA: tl.constexpr = False, n0=0):
    """The (BLOCK_N, BLOCK_K) weight tile at k0, columns below K (and with swiglu the matching up rows; else
    the same tile)."""
    if TMA:  # a tensor descriptor: the copy engine's loads, zeros past w's edges
        wt = w_ptr.load([n0, k0])
        wu = wt
        if SWIGLU:
            wu = w_ptr.load([n0 + N_OUT, k0])
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] & (offs_k < K)[None, :]
        wt = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0.0)
        wu = wt
        if SWIGLU:
            wu = tl.load(w_ptr + (offs_n[:, None] + N_OUT) * stride_wn + offs_k[None, :], mask=mask, other=0.0)
    return wt, wu


@triton.jit
def _tile(x_ptr, g_ptr, wt, wu, acc, acc_up, ss, offs_m, mask_m, k0, K, stride_xm, BLOCK_K: tl.constexpr,
          NORM: tl.constexpr, SWIGLU: tl.constexpr):
    """One step of the K loop: x's tile at k0 (with the norm: its sums of squares, times g), times the weight
    tile(s) into the fp32 accumulators."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    dt = x_ptr.dtype.element_ty
    xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                 mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
    if NORM:
        xf = xt.to(tl.float32)
        ss += tl.sum(xf * xf, axis=1)
        gt = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        xt = (xf * gt[None, :]).to(dt)
    acc = tl.dot(xt, tl.trans(wt), acc)
    if SWIGLU:
        acc_up = tl.dot(xt, tl.trans(wu), acc_up)
    return acc, acc_up, ss


@triton.jit
def _swiglu(gate, up, y_ptr):
    """silu(gate) * up with the unfused steps' roundings: gate, up and silu(gate) in y's dtype."""
    dt = y_ptr.dtype.element_ty
    g = gate.to(dt).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    return s * up.to(dt).to(tl.float32)


@triton.jit
def _with_residual(acc, r_ptr, offs, mask, y_ptr, RESIDUAL: tl.constexpr):
    """acc in y's dtype, plus the residual r (same layout as y) when RESIDUAL, with the unfused steps' roundings:
    y rounded to its dtype, then y + r computed in fp32 and rounded once (torch's add)."""
    y = acc.to(y_ptr.dtype.element_ty)
    if RESIDUAL:
        y = (y.to(tl.float32) + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(y.dtype)
    return y


@triton.jit
def split_k_reduce_kernel(part_ptr, ss_ptr, y_ptr, r_ptr, M, N_OUT, K, eps, BLOCK: tl.constexpr,
                          NORM: tl.constexpr, SWIGLU: tl.constexpr, SPLIT_K: tl.constexpr, GDC: tl.constexpr = False,
                          LAUNCH_AFTER_WAIT: tl.constexpr = False, RESIDUAL: tl.constexpr = False):
    # Launched with PDL, the partials are the previous kernel's output. The next kernel may launch at once (its
    # own wait covers this kernel's end, and so the wait here), or only after the wait (LAUNCH_AFTER_WAIT). On one
    # H200 at R = 4, launching after the wait made norm_gemv's batch-16 step 0.5 ms slower and stream_gemv's
    # batch-1 step 0.09-0.10 ms faster, in two calls each (docs/benchmarks/pdl.md, "... the reduce's launch
    # order"): stream_gemv launches its reduce with LAUNCH_AFTER_WAIT, norm_gemv without.
    if GDC:
        if not LAUNCH_AFTER_WAIT:
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
        if LAUNCH_AFTER_WAIT:
            tl.extra.cuda.gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat (m, n) of the output
    mask = offs < M * N_OUT
    m = offs // N_OUT
    n = offs % N_OUT
    n_all = N_OUT
    if SWIGLU:
        n_all = N_OUT * 2
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK,), dtype=tl.float32)
    ss = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # split order: the same sums on every call
        base = part_ptr + s * M * n_all + m * n_all + n
        acc += tl.load(base, mask=mask, other=0.0)
        if SWIGLU:
            acc_up += tl.load(base + N_OUT, mask=mask, other=0.0)
        if NORM:
            ss += tl.load(ss_ptr + s * M + m, mask=mask, other=0.0)
    if NORM:
        rstd = 1.0 / tl.sqrt(ss / K + eps)
        acc = acc * rstd
        if SWIGLU:
            acc_up = acc_up * rstd
    if SWIGLU:
        acc = _swiglu(acc, acc_up, y_ptr)
    tl.store(y_ptr + offs, _with_residual(acc, r_ptr, offs, mask, y_ptr, RESIDUAL), mask=mask)


def auto_split_k(tiles: int, k_blocks: int, sm_count: int) -> int:
    """The smallest power of two s with tiles * s >= PROGRAMS_PER_SM * sm_count, at most k_blocks. tiles: the
    BLOCK_N-row weight tiles a K step reads across the programs (a SwiGLU program reads two: gate and up)."""
    s = 1
    while tiles * s < PROGRAMS_PER_SM * sm_count and s * 2 <= k_blocks:
        s *= 2
    return s


def norm_gemv(x: torch.Tensor, w: torch.Tensor, *, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
              swiglu: bool = False, split_k: int | str = "auto", block_n: int = 64, block_k: int = 64,
              sm_count: int | None = None, num_warps: int = 4, num_stages: int = 4,
              pdl: bool = False, preload: int = PDL_PRELOAD_TILES,
              residual: torch.Tensor | None = None, tma: bool = False) -> torch.Tensor:
    """act(rms_norm(x) @ w.T) for decode rows x (M, K), M <= 16, w (N, K): (M, N) or (M, N/2) with swiglu;
    plus residual (the output's shape and dtype) when given, added in the epilogue (of the reduce with split-K).
    pdl: launch with programmatic dependent launch (CUDA, compute capability >= 9): the kernel loads its first
    `preload` weight tiles, then waits for the previous kernel (griddepcontrol.wait) before it reads x, and
    lets the next kernel launch early; so a launch's ramp-up and those weight loads overlap the previous
    kernel. On the CPU interpreter pdl only peels those tiles (the same arithmetic; the waits need a GPU).

    Defaults: the fastest configuration for both attn_norm + wqkv and mlp_norm + w13 + SwiGLU at the LLaMA-2-70B
    R = 4 shard, M = 1 and 16, in the H200 sweep of this version (docs/benchmarks/norm_gemv.md). Still slower
    there than the runtime's compiled norm + cuBLAS, so the runtime uses it only with bench.norm_gemv=true."""
    M, N, K = check_matmul(x, w, OP)
    check_decode_rows(M, DECODE_MAX_M, OP)
    check_dtype(x, DTYPES, OP)
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise KernelArgError(f"{OP}: x and w need contiguous rows (strides {x.stride()}, {w.stride()}); "
                             "pass .contiguous() tensors")
    if norm_weight is not None and tuple(norm_weight.shape) != (K,):
        raise KernelArgError(f"{OP}: norm_weight has shape {tuple(norm_weight.shape)}, x's rows need ({K},)")
    if swiglu and N % 2:
        raise KernelArgError(f"{OP}: swiglu needs w's rows to be [gate; up] (an even count), got {N}")
    n_out = N // 2 if swiglu else N
    residual = check_addend(residual, (M, n_out), x, OP, "residual")
    programs = triton.cdiv(n_out, block_n)
    k_blocks = triton.cdiv(K, block_k)
    if split_k == "auto":
        if sm_count is None:
            sm_count = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        split_k = auto_split_k(programs * (2 if swiglu else 1), k_blocks, sm_count)  # w13's split, SwiGLU or not
    if preload < 0 or preload & (preload - 1):
        raise KernelArgError(f"{OP}: preload={preload}; valid: 0 or a power of two (tiles loaded before the wait)")
    if not isinstance(split_k, int) or not 1 <= split_k <= k_blocks:
        raise KernelArgError(f"{OP}: split_k={split_k!r}; valid: 'auto' or 1..{k_blocks} (K / block_k)")
    k_share = triton.cdiv(k_blocks, split_k) * block_k
    y = torch.empty((M, n_out), dtype=x.dtype, device=x.device)
    part = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device) if split_k > 1 else y
    norm = norm_weight is not None
    ss = torch.empty((split_k, M), dtype=torch.float32, device=x.device) if split_k > 1 and norm else part
    g = norm_weight if norm else x  # unused pointer when there is no norm
    gdc = pdl and x.is_cuda
    launch = {"launch_pdl": True} if gdc else {}
    r = y if residual is None else residual  # unused pointer without a residual
    wd = w
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        if pdl and preload > 1:
            raise KernelArgError(f"{OP}: tma takes preload 0 or 1 (one descriptor tile), got {preload}")
        wd = TensorDescriptor.from_tensor(w, [block_n, block_k])
    norm_gemv_kernel[(programs, split_k)](
        x, g, wd, y, r, part, ss, M, n_out, K, k_share, x.stride(0), w.stride(0), eps,
        BLOCK_M=DECODE_MAX_M, BLOCK_N=block_n, BLOCK_K=block_k, NORM=norm, SWIGLU=swiglu,
        SPLIT_K=split_k, PRELOAD=preload if pdl else 0, GDC=gdc, RESIDUAL=residual is not None and split_k == 1,
        TMA=tma, num_warps=num_warps, num_stages=num_stages, **launch, **FP_FUSION)
    if split_k > 1:
        block = 256
        split_k_reduce_kernel[(triton.cdiv(M * n_out, block),)](part, ss, y, r, M, n_out, K, eps, BLOCK=block,
                                                                NORM=norm, SWIGLU=swiglu, SPLIT_K=split_k,
                                                                GDC=gdc, RESIDUAL=residual is not None, **launch,
                                                                **FP_FUSION)
    return y


def reference(x: torch.Tensor, w: torch.Tensor, *, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
              swiglu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The unfused steps in plain torch (overlap.ops.norm_linear, then + residual): the parity reference."""
    y = norm_linear(x, w, norm_weight, eps, swiglu)
    return y if residual is None else y + residual


def norm_linear_op(x: torch.Tensor, w: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                   gated: bool, pdl: bool = False) -> torch.Tensor:
    """overlap.ops.Ops.norm_linear through this kernel (split_k auto)."""
    return norm_gemv(x, w, norm_weight=norm_weight, eps=eps, swiglu=gated, pdl=pdl, tma=TMA and x.is_cuda)


def gemv_op(x: torch.Tensor, w: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """overlap.ops.Ops.gemv through this kernel: x @ w.T for decode rows, no norm, no SwiGLU (split_k auto). At
    the LLaMA-2-70B R = 4 and 8 shards' wqkv and w13 it is faster than cuBLAS on an H200; at wo and w2 it is
    not (docs/benchmarks/norm_gemv.md), so the runtime uses it for wqkv and w13 (and gemv_down_op with PDL)."""
    return norm_gemv(x, w, pdl=pdl, tma=TMA and x.is_cuda)


def gemv_down_op(x: torch.Tensor, w: torch.Tensor, pdl: bool = False,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """overlap.ops.Ops.gemv_down through this kernel: wo's and w2's x @ w.T for decode rows, at those weights'
    fastest configuration in the H200 sweep (32/128/4, no split: level with cuBLAS, docs/benchmarks/norm_gemv.md;
    gemv_op's split-K made the decode step 0.1-0.2 ms slower with PDL, docs/benchmarks/pdl.md).
    The runtime uses it with PDL only, where cuBLAS would break the chain of early launches. residual: added in
    the epilogue (the block's residual stream, on the rank that adds it: overlap.model)."""
    return norm_gemv(x, w, block_n=32, block_k=128, split_k=1, pdl=pdl, residual=residual, tma=TMA and x.is_cuda)


def swiglu_gemv_op(x: torch.Tensor, w: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """overlap.ops.Ops.swiglu_gemv through this kernel: swiglu(x @ w13.T) for decode rows, w13's GEMV with
    SwiGLU in its epilogue (the split-K reduce's; one kernel fewer than GEMV + SwiGLU). Defaults as gemv_op's."""
    return norm_gemv(x, w, swiglu=True, pdl=pdl, tma=TMA and x.is_cuda)
