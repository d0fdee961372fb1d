"""All-gather + GEMM, overlapped chunk by chunk: copy-engine pulls from peers' symmetric buffers on a
side stream, one cuBLAS GEMM per chunk on the compute streams, ordered by per-chunk CUDA events.

    out = prologue(cat_s x_s) @ w.T          x_s (m, K) rank s's token shard, w (N_r, K) column-parallel
    out (R m, N_r), rows in rank order (the sequence-parallel layout); optionally also cat_s x_s

prologue is a token-wise function (an RMSNorm) applied to each chunk before its GEMM: because it acts
row by row it commutes with the gather, which is what lets an SPD block gather the raw residual x
(return_gathered) and still fuse its norm1 + qkv GEMM with the gather.

Side stream (high priority), per call:
    copy x -> my workspace; put_flags(READY)           my shard is readable by every peer
    for s in r+1, r+2, ...: wait_for(s, READY); gathered[s rows].copy_(peer s's workspace); record ev[s]
    barrier(DONE)                                       every rank has finished reading every workspace
Compute streams: GEMM of the own chunk straight from x (no wait), then for each s: wait ev[s], GEMM,
alternating between the current stream and a second one. The current stream joins both at the end,
so the next call (which overwrites the workspace) is ordered after the DONE barrier. Flags are the
self-resetting ones of signal.py.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from overlap.kernels import signal
from overlap.kernels.checks import check_matmul
from overlap.kernels.schedule import DONE, READY, ag_chunk_order
from overlap.kernels.symm import SymmWorkspace

OP = "all_gather_matmul"


def pipelined_all_gather(x: torch.Tensor, ws: SymmWorkspace, side: torch.cuda.Stream,
                         events: list[torch.cuda.Event], gathered: torch.Tensor,
                         copy_own: bool = True) -> list[int]:
    """Queue the pulls of every peer's shard into gathered (R m, ...) on `side`; returns the chunk order.

    events[s] is recorded on `side` once chunk s has landed (the caller waits on it). The caller must
    have made `side` wait for the producer of x. The own chunk is copied too when copy_own.
    """
    rank, world = ws.rank, ws.world
    numel = x.numel()
    order = ag_chunk_order(rank, world)
    chunks = gathered.view(world, numel)  # (R, m * K)
    with torch.cuda.stream(side):
        ws.local(x.dtype, numel).copy_(x.reshape(-1))
        signal.put_flags(ws.tables, READY)
        if copy_own:
            chunks[rank].copy_(x.reshape(-1))
        for s in order[1:]:
            signal.wait_for(ws.tables, s, READY)
            chunks[s].copy_(ws.peer(s, x.dtype, numel))
            events[s].record(side)
        signal.barrier(ws.tables, DONE)
    x.record_stream(side)
    gathered.record_stream(side)
    return order


def all_gather_matmul_pipelined(x_shard: torch.Tensor, w: torch.Tensor, ws: SymmWorkspace,
                                side: torch.cuda.Stream, events: list[torch.cuda.Event],
                                second: torch.cuda.Stream | None = None, *,
                                prologue: Callable[[torch.Tensor], torch.Tensor] | None = None,
                                return_gathered: bool = False):
    """prologue(all_gather(x_shard)) @ w.T as R chunk GEMMs overlapped with the pulls.

    x_shard (m, K), w (N, K) -> out (R m, N) [, gathered (R m, K) when return_gathered]. With a
    `second` compute stream, chunk GEMMs alternate between it and the current stream (as torch's own
    pipeline does), so one GEMM's last partial wave of tiles overlaps the next GEMM's first.
    """
    m, n, _ = check_matmul(x_shard, w, OP, "x_shard")
    world = ws.world
    x_shard = x_shard.contiguous()
    cur = torch.cuda.current_stream()
    gathered = x_shard.new_empty((world * m, x_shard.shape[1]))  # (R m, K)
    out = x_shard.new_empty((world * m, n))  # (R m, N)
    side.wait_stream(cur)
    order = pipelined_all_gather(x_shard, ws, side, events, gathered, copy_own=return_gathered)
    streams = [cur] if second is None else [cur, second]
    if second is not None:
        second.wait_stream(cur)  # x_shard, w and the prologue's inputs are ready
        for t in (x_shard, gathered, out, w):
            t.record_stream(second)
    for i, s in enumerate(order):
        stream = streams[i % len(streams)]
        with torch.cuda.stream(stream):
            if i == 0:
                a = x_shard  # own chunk: local, no wait
            else:
                stream.wait_event(events[s])
                a = gathered[s * m:(s + 1) * m]
            if prologue is not None:
                a = prologue(a)
            torch.mm(a, w.t(), out=out[s * m:(s + 1) * m])
    if second is not None:
        cur.wait_stream(second)
    cur.wait_stream(side)
    return (out, gathered) if return_gathered else out


def reference(x_shard: torch.Tensor, w: torch.Tensor, group, world: int, *,
              prologue: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Gather with torch.distributed, then one fp32 GEMM: the parity reference, (R m, N) in x's dtype."""
    full = x_shard.new_empty((world * x_shard.shape[0], x_shard.shape[1]))
    if group is None:
        full.copy_(x_shard)
    else:
        dist.all_gather_into_tensor(full, x_shard.contiguous(), group=group)
    a = prologue(full) if prologue is not None else full
    return (a.float() @ w.float().T).to(x_shard.dtype)
