"""Fused GEMV + one-shot all-reduce for decode: one Triton kernel, no host sync, CUDA-graph safe.

    out = residual + sum_r (x_r @ w_r.T + add_r)        x_r (M, K_r), w_r (N, K_r), M = 1..16 tokens

the row-parallel output projection (W_o or W_2) of a decode step together with its all-reduce; add is
SPD's a_r (the block's single sync reduces a_r + mlp_r), residual the block input x.

Each program owns BLOCK_N output columns. It computes its (M, BLOCK_N) partial over the whole K with
tl.dot (fp32 accumulator), adds `add`, and pushes the fp32 tile into every rank's workspace at slot
[this rank] (remote stores over NVLink). Then it meets the program of the same id on every rank
(signal.block_barrier: one release/acquire round trip) and sums the R slots of its tile from local
memory in rank order 0..R-1 (the same order on every rank, so all ranks get bit-identical results),
adds the residual and stores the output.

Double buffer with a device epoch: the workspace holds two halves; a call writes half epoch % 2, and
the last program to finish increments the epoch (state[1], counted in state[2]), so the next call,
eager or a graph replay, uses the other half with no host involvement. A rank can only overwrite a
half two calls later, after every peer has passed the barrier of the call in between, which it
reaches only once it has finished reading the half (stream order): no second barrier is needed.
The grid never exceeds the SM count or the signal pad's channels, so every program is resident.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from overlap.kernels.checks import KernelArgError, check_addend, check_decode_rows, check_dtype, check_matmul
from overlap.kernels.compile_options import FP_FUSION
from overlap.kernels.schedule import DECODE_MAX_M, decode_config, max_programs
from overlap.kernels.signal import block_barrier
from overlap.kernels.symm import PeerTables

OP = "matmul_all_reduce (decode)"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def workspace_bytes(n: int, world: int) -> int:
    """Bytes the workspace needs for outputs of width n: two halves of R fp32 (DECODE_MAX_M, n) slots."""
    return 2 * world * DECODE_MAX_M * n * 4


@triton.jit
def gemv_all_reduce_kernel(
    x_ptr, w_ptr, add_ptr, res_ptr, out_ptr,  # x (M, K), w (N, K), add/res/out (M, N) contiguous
    buf_ptrs, pad_ptrs, state_ptr,  # PeerTables
    M, N, K, stride_xm, stride_wn, half_stride,  # half_stride: fp32 elements per buffer half
    RANK: tl.constexpr, WORLD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_ADD: tl.constexpr, HAS_RES: tl.constexpr, SYS_FENCE: tl.constexpr, MAX_SPIN: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    epoch = tl.load(state_ptr + 1)
    half = (epoch % 2).to(tl.int64) * half_stride
    mine = tl.load(buf_ptrs + RANK).to(tl.pointer_type(tl.float32))
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    slot = M * N  # fp32 elements of one rank's slot in this call
    for tile in range(pid, tl.cdiv(N, BLOCK_N), nprog):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
            wt = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                         mask=mask_n[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
            acc = tl.dot(xt, tl.trans(wt), acc)  # (BLOCK_M, BLOCK_N)
        tile_mask = mask_m[:, None] & mask_n[None, :]
        tile_off = offs_m[:, None] * N + offs_n[None, :]
        if HAS_ADD:
            acc += tl.load(add_ptr + tile_off, mask=tile_mask, other=0.0).to(tl.float32)
        for p in tl.static_range(WORLD):  # push this rank's partial tile to every rank's slot [RANK]
            peer = tl.load(buf_ptrs + p).to(tl.pointer_type(tl.float32))
            tl.store(peer + half + RANK * slot + tile_off, acc, mask=tile_mask)
        block_barrier(pad_ptrs, pid, state_ptr, RANK, WORLD, SYS_FENCE, MAX_SPIN)
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in tl.static_range(WORLD):  # fixed order: bit-identical sums on every rank
            total += tl.load(mine + half + s * slot + tile_off, mask=tile_mask, other=0.0)
        if HAS_RES:
            total += tl.load(res_ptr + tile_off, mask=tile_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + tile_off, total.to(out_ptr.dtype.element_ty), mask=tile_mask)
    # The last program to finish flips the epoch; every program read it before arriving here.
    arrived = tl.atomic_add(state_ptr + 2, 1, sem="acq_rel", scope="gpu")
    if arrived == nprog - 1:
        tl.store(state_ptr + 2, 0)
        tl.store(state_ptr + 1, epoch + 1)


def gemv_all_reduce(x: torch.Tensor, w: torch.Tensor, tables: PeerTables, *, add: torch.Tensor | None = None,
                    residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    block_k: int = 128, num_warps: int = 4, num_stages: int = 4) -> torch.Tensor:
    """residual + all_reduce(x @ w.T + add) for x (M, K) with M <= 16, w (N, K): (M, N) in x's dtype.

    Every rank of tables' group must call it with the same shapes, in the same order (a collective).
    """
    M, N, K = check_matmul(x, w, OP)
    check_decode_rows(M, DECODE_MAX_M, OP)
    check_dtype(x, DTYPES, OP)
    if x.stride(1) != 1:
        raise KernelArgError(f"{OP}: x must have contiguous rows (stride {x.stride()}); pass x.contiguous()")
    add = check_addend(add, (M, N), x, OP, "add")
    residual = check_addend(residual, (M, N), x, OP, "residual")
    need = workspace_bytes(N, tables.world)
    if tables.nbytes < need:
        raise KernelArgError(f"{OP}: the workspace has {tables.nbytes} bytes, N={N} needs {need}")
    out = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    block_n, grid = decode_config(N, max_programs(tables.pad_bytes, tables.world, tables.sm_count))
    gemv_all_reduce_kernel[(grid,)](
        x, w, add if add is not None else out, residual if residual is not None else out, out,
        tables.buf_table, tables.pad_table, tables.state,
        M, N, K, x.stride(0), w.stride(0), tables.nbytes // 8,
        RANK=tables.rank, WORLD=tables.world, BLOCK_M=DECODE_MAX_M, BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_ADD=add is not None, HAS_RES=residual is not None, SYS_FENCE=tables.sys_fence,
        MAX_SPIN=tables.max_spin, num_warps=num_warps, num_stages=num_stages, **FP_FUSION)
    return out


def reference(x: torch.Tensor, w: torch.Tensor, group, *, add: torch.Tensor | None = None,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """The same result through torch.distributed (any backend), accumulated in fp32: the parity reference."""
    y = x.float() @ w.float().T  # (M, N) this rank's partial
    if add is not None:
        y += add.float()
    if group is not None:
        dist.all_reduce(y, group=group)
    if residual is not None:
        y += residual.float()
    return y.to(x.dtype)
