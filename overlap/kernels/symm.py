"""Symmetric workspaces: one torch symmetric-memory allocation per op, its peers' pointers and signal pads.

    ws = SymmWorkspace(ctx, nbytes)       # collective: every rank of ctx.group, same nbytes, same order
    ws.local(dtype, numel, offset)        # this rank's bytes, as a tensor view
    ws.peer(r, dtype, numel, offset)      # rank r's bytes mapped into this process (for copy_ pulls)
    ws.tables                             # PeerTables: device pointer tables the Triton kernels take

Only peer-to-peer mappings and signal pads are used, never NVLink multicast (torch's multicast paths
stay off through TORCH_SYMM_MEM_DISABLE_MULTICAST=1 on the GPU machines, and nothing here asks for a
multicast pointer). The APIs used exist from torch 2.6 on: symm_mem.empty, symm_mem.rendezvous,
handle.buffer_ptrs, handle.signal_pad_ptrs, handle.get_buffer(rank, sizes, dtype, storage_offset).

Newer torch may place several tensors in one allocation and report buffer_ptrs of the allocation, not
of the tensor; the offset of this tensor inside it is measured once (data_ptr minus buffer_ptrs[rank])
and applied to every peer's pointer, which is correct in both layouts because allocations are
symmetric. get_buffer views are calibrated the same way.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from overlap.kernels.checks import KernelArgError, KernelUnavailableError
from overlap.kernels.schedule import DEFAULT_PAD_BYTES

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: no inline PTX (fences)
DEFAULT_MAX_SPIN = 1 << 30  # spin iterations before a wait gives up (minutes on a GPU: a hang guard, not a timeout)
ALIGN = 256  # bytes; every workspace size and sub-buffer offset is a multiple (16-byte vector access)


@dataclass
class PeerTables:
    """What a Triton kernel needs to reach its peers: pointer tables on the kernel's device.

    buf_table (R,) int64: address of every rank's workspace bytes, as mapped in this process;
    pad_table (R,) int64: address of every rank's signal pad; state (4,) int32 on the device:
    [0] sticky error flag (a wait gave up), [1] epoch of the decode kernel's double buffer,
    [2] programs of the current decode call that finished, [3] unused.
    """

    buf_table: torch.Tensor
    pad_table: torch.Tensor
    state: torch.Tensor
    rank: int
    world: int
    nbytes: int
    pad_bytes: int
    sm_count: int
    max_spin: int = DEFAULT_MAX_SPIN

    @property
    def sys_fence(self) -> bool:
        return not INTERPRET and self.buf_table.device.type == "cuda"

    def check_status(self) -> None:
        """Raise if any wait of this workspace gave up (host sync: for tests and --check, not hot paths)."""
        if int(self.state[0].item()):
            raise RuntimeError(f"rank {self.rank}: a symmetric-memory wait spun {self.max_spin} times without "
                               f"its peer's signal; the ranks did not make the same calls in the same order, "
                               f"or a rank died. The workspace's flags are now inconsistent: rebuild it")


def symm_mem_module():
    """torch.distributed._symmetric_memory, or KernelUnavailableError naming what is missing."""
    try:
        import torch.distributed._symmetric_memory as sm
    except ImportError as e:  # pragma: no cover - every supported torch has it
        raise KernelUnavailableError(f"torch {torch.__version__} has no symmetric memory ({e})") from e
    missing = [name for name in ("empty", "rendezvous") if not hasattr(sm, name)]
    if missing:
        raise KernelUnavailableError(f"torch {torch.__version__}'s symmetric memory lacks {', '.join(missing)}; "
                                     f"the symm_mem and triton impls need torch >= 2.6")
    return sm


def require_cuda_group(ctx, impl: str) -> None:
    """Symmetric memory needs a CUDA device and a process group of at least two ranks."""
    if ctx.world_size < 2 or ctx.group is None:
        raise KernelUnavailableError(f"impl {impl!r} needs a process group of >= 2 ranks (got world size "
                                     f"{ctx.world_size}); a single rank needs no collective")
    if ctx.device.type != "cuda":
        raise KernelUnavailableError(f"impl {impl!r} needs CUDA devices (symmetric memory); this context is on "
                                     f"{ctx.device}. On CPU use impl='nccl', which runs over gloo")


def group_name(ctx) -> str:
    return ctx.group.group_name


def signal_pad_bytes(sm) -> int:
    getter = getattr(sm, "get_signal_pad_size", None)
    return int(getter()) if getter is not None else DEFAULT_PAD_BYTES


def enable_for_group(sm, name: str) -> None:
    """Older torch (< 2.8) needs enable_symm_mem_for_group before rendezvous; newer ones deprecate it."""
    enable = getattr(sm, "enable_symm_mem_for_group", None)
    if enable is None or getattr(enable, "__deprecated__", None):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            enable(name)
        except RuntimeError as e:  # group info registered already (by torch itself): nothing to do
            if "already" not in str(e):
                raise


def round_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


class SymmWorkspace:
    """nbytes of symmetric memory on every rank of ctx.group (collective to create)."""

    def __init__(self, ctx, nbytes: int, max_spin: int = DEFAULT_MAX_SPIN):
        require_cuda_group(ctx, "symmetric workspace")
        if torch.cuda.is_current_stream_capturing():
            raise KernelArgError("a symmetric workspace cannot be allocated during CUDA-graph capture; run the op "
                                 "once eagerly (warm-up) or call impl.reserve(...) before capturing")
        sm = symm_mem_module()
        name = group_name(ctx)
        enable_for_group(sm, name)
        self.nbytes = round_up(nbytes)
        self.tensor = sm.empty(self.nbytes, dtype=torch.uint8, device=ctx.device)
        self.handle = sm.rendezvous(self.tensor, name)
        self.rank, self.world = int(self.handle.rank), int(self.handle.world_size)
        if (self.rank, self.world) != (ctx.rank, ctx.world_size):
            raise KernelUnavailableError(f"symmetric memory reports rank {self.rank} of {self.world} but the "
                                         f"context is rank {ctx.rank} of {ctx.world_size}; use the group's ranks")
        bases = [int(p) for p in self.handle.buffer_ptrs]
        delta = self.tensor.data_ptr() - bases[self.rank]
        if delta < 0 or delta % 16:
            raise KernelUnavailableError(f"unexpected symmetric-memory layout: tensor at {delta:+d} bytes from "
                                         f"buffer_ptrs[{self.rank}]")
        probe = self.handle.get_buffer(self.rank, (1,), torch.uint8, 0)
        self._gb_delta = self.tensor.data_ptr() - probe.data_ptr()  # 0 where get_buffer applies the offset itself
        dev = ctx.device
        # Kernels that meet per program need the same grid on every rank: size it from the smallest GPU.
        sm_count = torch.tensor([torch.cuda.get_device_properties(dev).multi_processor_count], device=dev)
        dist.all_reduce(sm_count, op=dist.ReduceOp.MIN, group=ctx.group)
        sm_count = int(sm_count.item())
        self.tables = PeerTables(
            buf_table=torch.tensor([b + delta for b in bases], dtype=torch.int64, device=dev),
            pad_table=torch.tensor([int(p) for p in self.handle.signal_pad_ptrs], dtype=torch.int64, device=dev),
            state=torch.zeros(4, dtype=torch.int32, device=dev),
            rank=self.rank, world=self.world, nbytes=self.nbytes, pad_bytes=signal_pad_bytes(sm),
            sm_count=sm_count, max_spin=max_spin)
        self._flat: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def _flat_view(self, rank: int, dtype: torch.dtype) -> torch.Tensor:
        key = (rank, dtype)
        if key not in self._flat:
            size = dtype.itemsize
            if rank == self.rank:
                self._flat[key] = self.tensor.view(dtype)
            else:
                self._flat[key] = self.handle.get_buffer(rank, (self.nbytes // size,), dtype, self._gb_delta // size)
        return self._flat[key]

    def local(self, dtype: torch.dtype, numel: int, offset: int = 0) -> torch.Tensor:
        """(numel,) view of this rank's workspace, starting `offset` elements of dtype in."""
        return self.peer(self.rank, dtype, numel, offset)

    def peer(self, rank: int, dtype: torch.dtype, numel: int, offset: int = 0) -> torch.Tensor:
        """(numel,) view of rank's workspace as mapped here (a copy_ from it is a peer-to-peer pull)."""
        flat = self._flat_view(rank, dtype)
        if offset + numel > flat.numel():
            raise KernelArgError(f"workspace of {self.nbytes} bytes is too small for {numel} {dtype} at {offset}")
        return flat.narrow(0, offset, numel)


class WorkspacePool:
    """Grow-only symmetric workspaces keyed by purpose; old ones are kept alive (peers may still map them)."""

    def __init__(self, ctx, min_bytes: int = 1 << 20, max_spin: int = DEFAULT_MAX_SPIN):
        self.ctx, self.min_bytes, self.max_spin = ctx, min_bytes, max_spin
        self._ws: dict[str, SymmWorkspace] = {}
        self._retired: list[SymmWorkspace] = []

    def get(self, key: str, nbytes: int) -> SymmWorkspace:
        """The workspace `key` with at least nbytes (collective when it has to grow: same calls on every rank)."""
        ws = self._ws.get(key)
        if ws is None or ws.nbytes < nbytes:
            if torch.cuda.is_current_stream_capturing():
                raise KernelArgError(f"workspace {key!r} must grow to {nbytes} bytes during CUDA-graph capture; "
                                     f"run the op once eagerly with the largest shape before capturing")
            if ws is not None:
                torch.cuda.synchronize(self.ctx.device)
                self._retired.append(ws)
            size = max(self.min_bytes, 1 << (max(nbytes, 1) - 1).bit_length())  # powers of two: rare regrowth
            ws = self._ws[key] = SymmWorkspace(self.ctx, size, self.max_spin)
        return ws

    def all(self) -> list[SymmWorkspace]:
        return list(self._ws.values())
