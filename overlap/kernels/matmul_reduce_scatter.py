"""GEMM + reduce-scatter, overlapped chunk by chunk: each rank computes its partial of the chunk owned by
r+1, r+2, ... into its symmetric workspace, flags the owner, and pulls (copy engine, side stream) the
partials of its own chunk as the peers produce them; its own partial is computed last, hiding the
last pull, and one reduction kernel sums the R partials.

    out = residual + sum_r (x_r[rows of this rank] @ w_r.T + add_r[rows of this rank])
    x_r (M, K_r), w_r (N, K_r) row-parallel, add (M, N), residual and out (M/R, N)

Rank r owns rows [r M/R, (r+1) M/R) (schedule.row_span). Workspace of rank s: R slots of (M/R, N);
slot d holds s's partial for rank d. Per call, with m = M/R and d_j = r+1+j, s_j = r-1-j (j = 0..R-2):

    compute stream: for j: GEMM x[rows of d_j] -> my slot d_j, record ev[j]
                    GEMM x[own rows] -> stack[r];  wait pulled;  out = stack.sum(0) (+ residual)
    side stream:    for j: wait ev[j]; put_flag(d_j, READY); wait_for(s_j, READY);
                           stack[s_j].copy_(slot r of s_j's workspace)
                    record pulled; barrier(DONE)   (nobody's next GEMMs overwrite a slot still being read)

Deadlock freedom: rank s produces d's chunk at step (d - s - 1) mod R (schedule.rs_step), exactly the
step at which d waits for it; a step's put depends only on the rank's own GEMM, and its wait only on
the peer's put of the same step, which depends on nothing later (tests/test_kernels_schedule.py
simulates this for every R up to 8).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from overlap.kernels import signal
from overlap.kernels.checks import check_addend, check_matmul, check_rows_divisible
from overlap.kernels.schedule import DONE, READY, rs_compute_order, rs_pull_order
from overlap.kernels.symm import SymmWorkspace

OP = "matmul_reduce_scatter"


def pipelined_reduce_scatter(produce: Callable[[int, torch.Tensor], None], m: int, n: int, dtype: torch.dtype,
                             ws: SymmWorkspace, side: torch.cuda.Stream, events: list[torch.cuda.Event],
                             pulled: torch.cuda.Event, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce-scatter of partials that produce(d, dst) writes for destination d into dst (m, n).

    produce runs on the current stream, in the order r+1, ..., r-1, r. Returns (m, n) for this rank.
    """
    rank, world = ws.rank, ws.world
    cur = torch.cuda.current_stream()
    stack = torch.empty((world, m, n), dtype=dtype, device=ws.tensor.device)  # (R, m, N) partials of my rows
    order = rs_compute_order(rank, world)
    side.wait_stream(cur)  # produce's inputs are ready
    for j, d in enumerate(order[:-1]):
        produce(d, ws.local(dtype, m * n, d * m * n).view(m, n))
        events[j].record(cur)
    with torch.cuda.stream(side):
        for j, (d, s) in enumerate(zip(order[:-1], rs_pull_order(rank, world))):
            side.wait_event(events[j])
            signal.put_flag(ws.tables, d, READY)
            signal.wait_for(ws.tables, s, READY)
            stack[s].copy_(ws.peer(s, dtype, m * n, rank * m * n).view(m, n))
        pulled.record(side)
        signal.barrier(ws.tables, DONE)
    stack.record_stream(side)
    produce(rank, stack[rank])  # own partial last: overlaps the last pull
    cur.wait_event(pulled)
    out = stack.sum(0)  # (m, N)
    if residual is not None:
        out += residual
    cur.wait_stream(side)
    return out


def matmul_reduce_scatter_pipelined(x: torch.Tensor, w: torch.Tensor, ws: SymmWorkspace, side: torch.cuda.Stream,
                                    events: list[torch.cuda.Event], pulled: torch.cuda.Event, *,
                                    add: torch.Tensor | None = None,
                                    residual: torch.Tensor | None = None) -> torch.Tensor:
    """reduce_scatter(x @ w.T + add) (+ residual): x (M, K), w (N, K), add (M, N), residual (M/R, N) -> (M/R, N)."""
    M, n, _ = check_matmul(x, w, OP)
    m = check_rows_divisible(M, ws.world, OP)
    add = check_addend(add, (M, n), x, OP, "add")
    residual = check_addend(residual, (m, n), x, OP, "residual")

    def produce(d: int, dst: torch.Tensor) -> None:
        rows = slice(d * m, (d + 1) * m)
        if add is None:
            torch.mm(x[rows], w.t(), out=dst)
        else:
            torch.addmm(add[rows], x[rows], w.t(), out=dst)

    return pipelined_reduce_scatter(produce, m, n, x.dtype, ws, side, events, pulled, residual)


def reference(x: torch.Tensor, w: torch.Tensor, group, world: int, *, add: torch.Tensor | None = None,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 partial, reduce-scatter with torch.distributed, (M/R, N) in x's dtype: the parity reference."""
    y = x.float() @ w.float().T  # (M, N) this rank's partial
    if add is not None:
        y += add.float()
    m = y.shape[0] // world
    out = y.new_empty((m, y.shape[1]))
    if group is None:
        out.copy_(y)
    else:
        dist.reduce_scatter_tensor(out, y.contiguous(), group=group)
    if residual is not None:
        out += residual.float()
    return out.to(x.dtype)
