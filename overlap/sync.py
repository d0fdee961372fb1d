"""Sync points: each all-reduce of the runtime is a named module, called on one visible line of a block.

Sync.forward is the blocking all-reduce, Sync.start the asynchronous one (ISO), Sync.matmul / start_matmul the
same sync point fused with the row-parallel GEMM before it (overlap.kernels). `calls` counts them, so a test
can check 2L - (SPD blocks) all-reduces per forward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class Sync(nn.Module):
    """One sync point: the all-reduce (sum) of a rank's partial over the context's group, in place.

    `calls` counts how often this sync point ran (eager; not while torch.compile traces). Unbound
    (ctx None, R = 1) it is the identity. nocomm skips the collective: wrong numbers, but the latency
    lower bound that any communication overlap could reach.
    """

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.ctx = None  # overlap.context.TPContext, bound by overlap.tp.shard_
        self.nocomm = False
        self.calls = 0
        self.impl = None  # an overlap.kernels impl (set_impl_): the block then calls matmul() instead

    def matmul(self, x: torch.Tensor, w: torch.Tensor, *, add=None, residual=None) -> torch.Tensor:
        """This sync point fused with the row-parallel GEMM before it: residual + sum_r (x_r @ w_r.T + add_r).

        Through self.impl.matmul_all_reduce (overlap.kernels); counted like forward(). Unbound or nocomm:
        the local computation, no collective.
        """
        if not torch.compiler.is_compiling():
            self.calls += 1
        if self.ctx is None or self.ctx.group is None or self.nocomm:
            y = F.linear(x, w) if add is None else add + F.linear(x, w)
            return y if residual is None else residual + y
        return self.impl.matmul_all_reduce(x, w, add=add, residual=residual)  # (..., N) summed over ranks

    @property
    def sums(self) -> bool:
        """Whether this sync point sums across ranks (bound to a group, not nocomm); else it is the identity."""
        return not (self.ctx is None or self.ctx.group is None or self.nocomm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self.calls += 1
        if self.ctx is None or self.ctx.group is None or self.nocomm:
            return x
        if torch.compiler.is_compiling():  # traceable form; the graph keeps it a single all-reduce
            from torch.distributed import _functional_collectives as funcol

            return funcol.all_reduce(x, "sum", self.ctx.group)
        dist.all_reduce(x, group=self.ctx.group)  # (B, S, D) summed over ranks
        return x

    def start(self, x: torch.Tensor, stream=None, group=None) -> "Pending":
        """The same sync point, asynchronous (eager only; leave x alone until Pending.wait()).

        With a CUDA stream the collective is issued from it after all the compute stream has queued (x
        included), and wait() makes the compute stream, not the host, wait; on gloo wait() blocks the host.
        group: another process group over the same ranks (default: the context's).
        """
        self.calls += 1
        if self.ctx is None or self.ctx.group is None or self.nocomm:
            return Pending(x)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(x.device))  # x is complete before NCCL reads it
        with torch.cuda.stream(stream):  # stream None: a no-op
            work = dist.all_reduce(x, group=group or self.ctx.group, async_op=True)
            return Pending(x, work)  # (B, S, D) in flight

    def start_matmul(self, x: torch.Tensor, w: torch.Tensor, *, add=None, stream=None) -> "Pending":
        """Sync.matmul (impl != nccl: the fused GEMM + all-reduce), asynchronous: sum_r (x_r @ w_r.T + add_r).

        With a CUDA stream the fused op runs on it after all the compute stream has queued, the inputs are
        kept alive for it (record_stream) and wait() makes the compute stream wait for its event; every
        fused collective of an ISO prefill is issued from that one stream, in the same order on every rank
        (the symmetric-memory rule), and the compute stream waits for all of them before plain calls resume.
        Without a stream (CPU) it runs at once.
        """
        if stream is None:
            return Pending(self.matmul(x, w, add=add))
        compute = torch.cuda.current_stream(x.device)
        stream.wait_stream(compute)  # x (and add) complete before the fused op reads them
        with torch.cuda.stream(stream):
            y = self.matmul(x, w, add=add)  # (..., N), allocated on the comm stream
            done = torch.cuda.Event()
            done.record(stream)
        for t in (x, add):
            if t is not None:
                t.record_stream(stream)  # freed on the compute stream only after the comm stream used it
        return Pending(y, _EventWork(done, y))

    def extra_repr(self) -> str:
        return f"{self.name}, calls={self.calls}, nocomm={self.nocomm}"


class _EventWork:
    """The wait() of a fused op on another CUDA stream: the current stream waits for its event."""

    def __init__(self, event, out: torch.Tensor):
        self.event, self.out = event, out

    def wait(self) -> None:
        current = torch.cuda.current_stream(self.out.device)
        current.wait_event(self.event)
        self.out.record_stream(current)  # made on the comm stream, read on this one


class Pending:
    """An all-reduce in flight (Sync.start); wait() -> the summed tensor, ordered before later compute."""

    def __init__(self, x: torch.Tensor, work=None):
        self.x, self.work = x, work

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()  # NCCL: the current stream waits for the sum; gloo: the host waits
            self.work = None
        return self.x
