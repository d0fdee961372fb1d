"""The three implementations of the fused GEMM + collective interface (see overlap/kernels/__init__.py).

    NcclImpl     torch.distributed collectives (NCCL on GPU, gloo on CPU) after/before a plain matmul
    SymmMemImpl  torch's symm_mem ops: fused_all_gather_matmul, fused_matmul_reduce_scatter,
                 one_shot_all_reduce / two_shot_all_reduce_ on a symmetric buffer the GEMM writes into
    TritonImpl   this package: fused GEMV + all-reduce kernel (decode), one-shot pull kernels (small M),
                 copy-engine pipelines with signal-pad flags (large M)

Every method is a collective: all ranks call it with the same shapes in the same order. With one rank
(ctx.world_size == 1) every method is the plain local computation.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from overlap.kernels import all_gather_matmul as agm
from overlap.kernels import gemv_all_reduce as gar
from overlap.kernels import matmul_reduce_scatter as mrs
from overlap.kernels.checks import (KernelArgError, KernelUnavailableError, check_addend, check_matmul,
                                    check_rows_divisible)
from overlap.kernels.one_shot import one_shot_gather, one_shot_reduce
from overlap.kernels.schedule import ONE_SHOT_MAX_BYTES, PIPELINE_MIN_ROWS, choose_path
from overlap.kernels.symm import (DEFAULT_MAX_SPIN, WorkspacePool, enable_for_group, group_name, require_cuda_group,
                                  symm_mem_module)

Prologue = Callable[[torch.Tensor], torch.Tensor] | None
OP_AR = "matmul_all_reduce"


def _mm(x, w, add=None, out=None):
    """x @ w.T (+ add), optionally into out (a symmetric buffer)."""
    if add is None:
        return torch.mm(x, w.t(), out=out)
    return torch.addmm(add, x, w.t(), out=out)


def _flat_addend(t, lead: tuple, n: int, like: torch.Tensor, name: str):
    """t (*lead, n) as a contiguous (M, n) tensor; None passes through."""
    if t is None:
        return None
    if tuple(t.shape) != (*lead, n):
        raise KernelArgError(f"{OP_AR}: {name} must have shape {(*lead, n)} like the output, got {tuple(t.shape)}")
    return check_addend(t.reshape(-1, n), (like.shape[0], n), like, OP_AR, name)


class NcclImpl:
    """GEMM, then a torch.distributed collective on ctx.group (the unfused baseline; also the CPU path)."""

    name = "nccl"

    def __init__(self, ctx):
        self.ctx, self.world, self.rank, self.group = ctx, ctx.world_size, ctx.rank, ctx.group
        self.last_path = "nccl"

    def _distributed(self) -> bool:
        return self.world > 1 and self.group is not None

    def all_reduce(self, y: torch.Tensor) -> torch.Tensor:
        if self._distributed():
            dist.all_reduce(y, group=self.group)
        return y

    def all_gather(self, x_shard: torch.Tensor) -> torch.Tensor:
        if not self._distributed():
            return x_shard
        out = x_shard.new_empty((self.world * x_shard.shape[0], *x_shard.shape[1:]))
        dist.all_gather_into_tensor(out, x_shard.contiguous(), group=self.group)
        return out

    def reduce_scatter(self, y: torch.Tensor) -> torch.Tensor:
        if not self._distributed():
            return y
        m = check_rows_divisible(y.shape[0], self.world, "reduce_scatter")
        out = y.new_empty((m, *y.shape[1:]))
        dist.reduce_scatter_tensor(out, y.contiguous(), group=self.group)
        return out

    def matmul_all_reduce(self, x, w, *, add=None, residual=None):
        """residual + all_reduce(x @ w.T + add): x (..., K), w (N, K), add and residual (..., N) -> (..., N)."""
        lead, N = tuple(x.shape[:-1]), w.shape[0]
        x2 = x.reshape(-1, x.shape[-1])
        check_matmul(x2, w, OP_AR)
        add2, res2 = (_flat_addend(t, lead, N, x2, name) for t, name in ((add, "add"), (residual, "residual")))
        return self._matmul_all_reduce(x2, w, add2, res2).view(*lead, N)

    def _matmul_all_reduce(self, x, w, add, residual):  # 2-D: x (M, K), add/residual (M, N) or None
        y = self.all_reduce(_mm(x, w, add))
        return y if residual is None else y + residual

    def all_gather_matmul(self, x_shard, w, *, prologue: Prologue = None, return_gathered: bool = False):
        check_matmul(x_shard, w, "all_gather_matmul", "x_shard")
        full = self.all_gather(x_shard)
        out = torch.mm(prologue(full) if prologue is not None else full, w.t())
        return (out, full) if return_gathered else out

    def matmul_reduce_scatter(self, x, w, *, add=None, residual=None):
        M, N, _ = check_matmul(x, w, "matmul_reduce_scatter")
        m = check_rows_divisible(M, self.world, "matmul_reduce_scatter")
        add = check_addend(add, (M, N), x, "matmul_reduce_scatter", "add")
        residual = check_addend(residual, (m, N), x, "matmul_reduce_scatter", "residual")
        out = self.reduce_scatter(_mm(x, w, add))
        return out if residual is None else out + residual

    def reserve(self, **_) -> None:
        """Preallocate workspaces (nothing to do for NCCL)."""

    def close(self) -> None:
        """Release workspaces (nothing to do for NCCL)."""


class SymmMemImpl(NcclImpl):
    """torch's own symmetric-memory ops; NCCL where torch has no symm_mem op (plain all-gather/RS, add)."""

    name = "symm_mem"

    def __init__(self, ctx, one_shot_max_bytes: int = ONE_SHOT_MAX_BYTES):
        super().__init__(ctx)
        require_cuda_group(ctx, self.name)
        sm = symm_mem_module()  # importing it defines the fused ops (torch.ops.symm_mem.fused_*)
        self.group_name = group_name(ctx)
        self.ops = torch.ops.symm_mem
        for op in ("fused_all_gather_matmul", "fused_matmul_reduce_scatter", "one_shot_all_reduce"):
            if not hasattr(self.ops, op):
                raise KernelUnavailableError(f"torch {torch.__version__} has no torch.ops.symm_mem.{op}")
        self.has_two_shot = hasattr(self.ops, "two_shot_all_reduce_")
        schema = str(self.ops.fused_all_gather_matmul.default._schema)
        self.ag_kwargs = {"return_A": True} if "return_A" in schema else {}  # older torch always returns A
        enable_for_group(sm, self.group_name)  # required before torch 2.8, a no-op after
        self.one_shot_max_bytes = one_shot_max_bytes
        self.pool = WorkspacePool(ctx)

    def _symm(self, shape, dtype) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        return self.pool.get("ar", n * dtype.itemsize).local(dtype, n).view(*shape)

    def all_reduce(self, y: torch.Tensor) -> torch.Tensor:
        buf = self._symm(y.shape, y.dtype)
        buf.copy_(y)
        return self._reduce_symm(buf)

    def _reduce_symm(self, buf: torch.Tensor) -> torch.Tensor:
        if buf.numel() * buf.element_size() <= self.one_shot_max_bytes or not self.has_two_shot:
            self.last_path = "one_shot_all_reduce"
            return self.ops.one_shot_all_reduce(buf, "sum", self.group_name)
        self.last_path = "two_shot_all_reduce_"
        return self.ops.two_shot_all_reduce_(buf, "sum", self.group_name).clone()

    def _matmul_all_reduce(self, x, w, add, residual):
        y = self._reduce_symm(_mm(x, w, add, out=self._symm((x.shape[0], w.shape[0]), x.dtype)))
        return y if residual is None else y + residual

    def all_gather_matmul(self, x_shard, w, *, prologue: Prologue = None, return_gathered: bool = False):
        check_matmul(x_shard, w, "all_gather_matmul", "x_shard")
        a = x_shard if prologue is None else prologue(x_shard)  # token-wise: commutes with the gather
        # return_A=True keeps torch off its multimem (NVLink multicast) path whatever the environment says.
        _, outs = self.ops.fused_all_gather_matmul(a.contiguous(), [w.t()], 0, self.group_name, **self.ag_kwargs)
        self.last_path = "fused_all_gather_matmul"
        return (outs[0], self.all_gather(x_shard)) if return_gathered else outs[0]

    def matmul_reduce_scatter(self, x, w, *, add=None, residual=None):
        M, N, _ = check_matmul(x, w, "matmul_reduce_scatter")
        m = check_rows_divisible(M, self.world, "matmul_reduce_scatter")
        add = check_addend(add, (M, N), x, "matmul_reduce_scatter", "add")
        residual = check_addend(residual, (m, N), x, "matmul_reduce_scatter", "residual")
        out = self.ops.fused_matmul_reduce_scatter(x, w.t(), "sum", 0, self.group_name)
        self.last_path = "fused_matmul_reduce_scatter"
        if add is not None:  # torch's op has no addend: reduce-scatter it separately (sum is linear)
            out = out + self.reduce_scatter(add)
        return out if residual is None else out + residual

    def reserve(self, *, max_tokens: int, n: int, k: int = 0, dtype=torch.bfloat16) -> None:
        self.pool.get("ar", max_tokens * n * dtype.itemsize)


class TritonImpl(NcclImpl):
    """This package's kernels over symmetric memory; see docs/kernels.md for the paths and protocols."""

    name = "triton"

    def __init__(self, ctx, one_shot_max_bytes: int = ONE_SHOT_MAX_BYTES, pipeline_min_rows: int = PIPELINE_MIN_ROWS,
                 max_spin: int = DEFAULT_MAX_SPIN):
        super().__init__(ctx)
        require_cuda_group(ctx, self.name)
        self.one_shot_max_bytes, self.pipeline_min_rows = one_shot_max_bytes, pipeline_min_rows
        self.pool = WorkspacePool(ctx, max_spin=max_spin)
        self.side = torch.cuda.Stream(ctx.device, priority=-1)  # pulls and flags: high priority beside GEMMs
        self.second = torch.cuda.Stream(ctx.device)  # all-gather + GEMM: chunk GEMMs alternate with this one
        self.ag_events = [torch.cuda.Event() for _ in range(self.world)]
        self.rs_events = [torch.cuda.Event() for _ in range(self.world)]
        self.pulled = torch.cuda.Event()

    def _path(self, op, m, n, dtype) -> str:
        self.last_path = choose_path(op, m, n, self.world, dtype.itemsize, self.one_shot_max_bytes,
                                     self.pipeline_min_rows)
        return self.last_path

    def workspaces(self):
        return self.pool.all()

    # plain collectives -------------------------------------------------------------------------------
    def all_reduce(self, y: torch.Tensor) -> torch.Tensor:
        small = y.numel() * y.element_size() <= self.one_shot_max_bytes
        if small or y.dim() < 2 or y.shape[0] % self.world:
            self.last_path = "one_shot"
            flat = y.contiguous().view(1, -1)
            return self._one_shot_ar(lambda buf: buf.copy_(flat), flat.shape, y.dtype).view_as(y)
        self.last_path = "pipeline"
        return self.all_gather(self.reduce_scatter(y))  # two-shot: reduce-scatter, then all-gather

    def all_gather(self, x_shard: torch.Tensor) -> torch.Tensor:
        x = x_shard.contiguous()
        out = x.new_empty((self.world * x.shape[0], *x.shape[1:]))
        ws = self.pool.get("ag", x.numel() * x.element_size())
        self.side.wait_stream(torch.cuda.current_stream())
        agm.pipelined_all_gather(x, ws, self.side, self.ag_events, out, copy_own=True)
        torch.cuda.current_stream().wait_stream(self.side)
        return out

    def reduce_scatter(self, y: torch.Tensor) -> torch.Tensor:
        m = check_rows_divisible(y.shape[0], self.world, "reduce_scatter")
        y2 = y.contiguous().view(y.shape[0], -1)
        n = y2.shape[1]
        ws = self.pool.get("rs", y2.numel() * y2.element_size())
        out = mrs.pipelined_reduce_scatter(lambda d, dst: dst.copy_(y2[d * m:(d + 1) * m]), m, n, y.dtype, ws,
                                           self.side, self.rs_events, self.pulled)
        return out.view(m, *y.shape[1:])

    # fused ops ---------------------------------------------------------------------------------------
    def _one_shot_ar(self, write, shape, dtype) -> torch.Tensor:
        numel = shape[0] * shape[1]
        ws = self.pool.get("one_shot", numel * dtype.itemsize)
        write(ws.local(dtype, numel).view(*shape))
        out = torch.empty(shape, dtype=dtype, device=self.ctx.device)
        return one_shot_reduce(ws.tables, out)

    def _matmul_all_reduce(self, x, w, add, residual):
        M, N = x.shape[0], w.shape[0]
        path = self._path("all_reduce", M, N, x.dtype)
        if path == "fused_gemv":
            ws = self.pool.get("decode", gar.workspace_bytes(N, self.world))
            return gar.gemv_all_reduce(x.contiguous(), w, ws.tables, add=add, residual=residual)
        if path == "one_shot":
            y = self._one_shot_ar(lambda buf: _mm(x, w, add, out=buf), (M, N), x.dtype)
        else:  # two-shot: the reduce-scatter pipeline, then copy-engine all-gather pulls
            y = self.all_gather(self.matmul_reduce_scatter(x, w, add=add))
            self.last_path = "pipeline"
        return y if residual is None else y + residual

    def all_gather_matmul(self, x_shard, w, *, prologue: Prologue = None, return_gathered: bool = False):
        m, n, k = check_matmul(x_shard, w, "all_gather_matmul", "x_shard")
        if self._path("all_gather", self.world * m, k, x_shard.dtype) == "pipeline":
            ws = self.pool.get("ag", m * k * x_shard.element_size())
            return agm.all_gather_matmul_pipelined(x_shard, w, ws, self.side, self.ag_events, self.second,
                                                   prologue=prologue, return_gathered=return_gathered)
        ws = self.pool.get("one_shot", m * k * x_shard.element_size())
        ws.local(x_shard.dtype, m * k).view(m, k).copy_(x_shard)
        full = one_shot_gather(ws.tables, x_shard.new_empty((self.world * m, k)), m * k)
        out = torch.mm(prologue(full) if prologue is not None else full, w.t())
        return (out, full) if return_gathered else out

    def matmul_reduce_scatter(self, x, w, *, add=None, residual=None):
        M, N, _ = check_matmul(x, w, "matmul_reduce_scatter")
        m = check_rows_divisible(M, self.world, "matmul_reduce_scatter")
        if self._path("reduce_scatter", M, N, x.dtype) == "pipeline":
            ws = self.pool.get("rs", M * N * x.element_size())
            return mrs.matmul_reduce_scatter_pipelined(x, w, ws, self.side, self.rs_events, self.pulled, add=add,
                                                       residual=residual)
        add = check_addend(add, (M, N), x, "matmul_reduce_scatter", "add")
        residual = check_addend(residual, (m, N), x, "matmul_reduce_scatter", "residual")
        ws = self.pool.get("one_shot", M * N * x.element_size())
        _mm(x, w, add, out=ws.local(x.dtype, M * N).view(M, N))
        out = one_shot_reduce(ws.tables, x.new_empty((m, N)), offset=self.rank * m * N)
        return out if residual is None else out + residual

    def reserve(self, *, max_tokens: int, n: int, k: int = 0, dtype=torch.bfloat16) -> None:
        """Allocate every workspace for up to max_tokens rows of width n (and AG width k) before capture."""
        isz = dtype.itemsize
        self.pool.get("decode", gar.workspace_bytes(n, self.world))
        self.pool.get("one_shot", self.one_shot_max_bytes)
        self.pool.get("rs", max_tokens * n * isz)
        self.pool.get("ag", max_tokens * max(n, k) * isz // self.world)

    def check_status(self) -> None:
        """Raise if any wait of any workspace gave up (host sync)."""
        for ws in self.pool.all():
            ws.tables.check_status()
