"""One-shot collectives over a symmetric workspace: every rank reads every peer's buffer once (pull).

    reduce: out[i]         = sum_s buf_s[offset + i]     i < numel   (all-reduce: offset 0, numel M N;
                                                                      reduce-scatter: offset r m N, numel m N)
    gather: out[s numel + i] = buf_s[offset + i]          (all-gather of equal shards)

for small messages (latency-bound: prefill M <= a few hundred tokens), where one NVLink round trip of
loads beats ring algorithms and copy-engine pipelines. The caller first writes its part into its own
workspace (for example torch.mm(..., out=ws.local(...))) on the same stream.

Each program: block_barrier (every rank's buffer is written: the writes were made by earlier kernels
on each rank's stream, then released at system scope), grid-stride loop over BLOCK elements reading
all R buffers (fp32 accumulation, ranks summed in order 0..R-1 so every rank gets identical bits),
then a second block_barrier so that no rank overwrites its buffer while a peer still reads it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from overlap.kernels.checks import KernelArgError, check_dtype
from overlap.kernels.compile_options import FP_FUSION
from overlap.kernels.schedule import max_programs, one_shot_config
from overlap.kernels.signal import block_barrier
from overlap.kernels.symm import PeerTables

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def one_shot_kernel(buf_ptrs, pad_ptrs, state_ptr, out_ptr, offset, numel,
                    RANK: tl.constexpr, WORLD: tl.constexpr, REDUCE: tl.constexpr, BLOCK: tl.constexpr,
                    SYS_FENCE: tl.constexpr, MAX_SPIN: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    dtype = out_ptr.dtype.element_ty
    block_barrier(pad_ptrs, pid, state_ptr, RANK, WORLD, SYS_FENCE, MAX_SPIN)
    for start in range(pid * BLOCK, numel, nprog * BLOCK):
        offs = tl.arange(0, BLOCK).to(tl.int64) + start
        mask = offs < numel
        if REDUCE:
            acc = tl.zeros((BLOCK,), dtype=tl.float32)
            for s in tl.static_range(WORLD):
                src = tl.load(buf_ptrs + s).to(tl.pointer_type(dtype))
                acc += tl.load(src + offset + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs, acc.to(dtype), mask=mask)
        else:
            for i in tl.static_range(WORLD):
                s = (RANK + i) % WORLD  # stagger: at each step every rank reads a different peer
                src = tl.load(buf_ptrs + s).to(tl.pointer_type(dtype))
                tl.store(out_ptr + s * numel + offs, tl.load(src + offset + offs, mask=mask), mask=mask)
    block_barrier(pad_ptrs, pid, state_ptr, RANK, WORLD, SYS_FENCE, MAX_SPIN)


def _launch(tables: PeerTables, out: torch.Tensor, offset: int, numel: int, reduce: bool,
            block: int, num_warps: int) -> torch.Tensor:
    check_dtype(out, DTYPES, "one-shot collective", "out")
    end = (offset + numel) * out.element_size()
    if end > tables.nbytes:
        raise KernelArgError(f"one-shot collective: elements [{offset}, {offset + numel}) of {out.dtype} end at "
                             f"byte {end}, beyond the {tables.nbytes}-byte workspace")
    if not out.is_contiguous():
        raise KernelArgError("one-shot collective: out must be contiguous")
    block, grid = one_shot_config(numel, max_programs(tables.pad_bytes, tables.world, tables.sm_count), block)
    one_shot_kernel[(grid,)](tables.buf_table, tables.pad_table, tables.state, out, offset, numel,
                             RANK=tables.rank, WORLD=tables.world, REDUCE=reduce, BLOCK=block,
                             SYS_FENCE=tables.sys_fence, MAX_SPIN=tables.max_spin, num_warps=num_warps,
                             **FP_FUSION)
    return out


def one_shot_reduce(tables: PeerTables, out: torch.Tensor, offset: int = 0, block: int = 2048,
                    num_warps: int = 8) -> torch.Tensor:
    """out (numel,) or any contiguous shape = sum over ranks of their workspace elements [offset, offset+numel)."""
    return _launch(tables, out, offset, out.numel(), True, block, num_warps)


def one_shot_gather(tables: PeerTables, out: torch.Tensor, numel: int, offset: int = 0, block: int = 2048,
                    num_warps: int = 8) -> torch.Tensor:
    """out (R * numel elements) = the concatenation over ranks of their workspace elements [offset, +numel)."""
    if out.numel() != tables.world * numel:
        raise KernelArgError(f"one-shot gather: out has {out.numel()} elements, expected {tables.world} x {numel}")
    return _launch(tables, out, offset, numel, False, block, num_warps)


def reference_all_reduce(y: torch.Tensor, group) -> torch.Tensor:
    """sum over ranks of y, in fp32 through torch.distributed, cast back."""
    t = y.float().clone()
    if group is not None:
        dist.all_reduce(t, group=group)
    return t.to(y.dtype)


def reference_all_gather(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """(world * rows, ...) concatenation of every rank's x along dim 0."""
    if group is None:
        return x.clone()
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out
