"""The tensor-parallel context: rank, world size, device and process group, built once, passed explicitly.

This is the only module that reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK). Library code
takes a TPContext and never calls dist.get_rank(). Backend "auto" is nccl on CUDA and gloo on CPU; R = 1
without a launcher needs no process group at all (group None, backend "none"). Every process group gets
a timeout, so a rank that never arrives at a collective fails the job instead of hanging it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from spd.errors import ParallelConfigError

# NVLink multicast stays off on the shared GPU hosts (it can take their GPUs out of service): every NCCL
# group this project creates is made with these set, whatever the caller's environment says.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DEFAULT_TIMEOUT_S = 300.0  # long enough for a 70B random init and CUDA-graph capture, short enough to notice a hang
BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class TPContext:
    """Who this process is in the tensor-parallel group. group is None for a single process."""

    rank: int
    world_size: int
    device: torch.device
    group: Any = None  # torch.distributed.ProcessGroup, or None when world_size == 1 without init
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def barrier(self) -> None:
        """Wait for every rank (no-op for a single process); used outside timed regions only."""
        if self.group is not None:
            if self.backend == "nccl":
                dist.barrier(group=self.group, device_ids=[self.device.index])
            else:
                dist.barrier(group=self.group)


def single(device: str | torch.device = "cpu") -> TPContext:
    """A one-rank context with no process group (R = 1, nothing to all-reduce)."""
    return TPContext(rank=0, world_size=1, device=torch.device(device), group=None, backend="none")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value in (None, "") else int(value)


def _pick_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ParallelConfigError(f"unknown distributed backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ParallelConfigError("backend=nccl needs CUDA GPUs, and none is visible; use backend=gloo on CPU")
    return backend


def init_tp(
    backend: str = "auto",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    local_rank: int | None = None,
    init_method: str | None = None,
) -> TPContext:
    """The TPContext of this process, initialising torch.distributed once.

    Under torchrun, rank/world size/local rank come from the environment (init_method env://). Tests that
    spawn ranks themselves pass rank, world_size and an init_method (for example file://<tmp>/store).
    Without a launcher and without arguments this is a single-process context (no process group).
    """
    rank = _env_int("RANK") if rank is None else rank
    world_size = _env_int("WORLD_SIZE") if world_size is None else world_size
    local_rank = _env_int("LOCAL_RANK") if local_rank is None else local_rank
    if world_size is None or (world_size == 1 and init_method is None and not dist.is_initialized()):
        backend = _pick_backend(backend)
        return single("cuda:0" if backend == "nccl" else "cpu")
    if rank is None:
        raise ParallelConfigError(f"world_size={world_size} but no rank: launch with torchrun or pass rank=")
    local_rank = rank if local_rank is None else local_rank
    backend = _pick_backend(backend)
    if backend == "nccl":
        os.environ.update(NO_MULTICAST)
        if local_rank >= torch.cuda.device_count():
            raise ParallelConfigError(f"local rank {local_rank} needs GPU {local_rank}, but only "
                                      f"{torch.cuda.device_count()} are visible; use --nproc-per-node <= that")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=init_method or "env://",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            # Eager NCCL communicator creation: CUDA-graph capture must not be the first collective.
            device_id=device if backend == "nccl" else None,
        )
    return TPContext(rank=rank, world_size=world_size, device=device, group=dist.group.WORLD, backend=backend)


_COMM_GROUPS: dict[tuple, Any] = {}


def comm_group(ctx: TPContext, max_ctas: int | None = None, high_priority: bool = True):
    """A second process group over the context's ranks for overlapped collectives (ISO), made once per setting.

    NCCL only (elsewhere: the context's own group). max_ctas caps the thread blocks (one per channel) an
    all-reduce of this group occupies: overlapped with a GEMM, every SM NCCL holds is one the GEMM waits
    for, and a collective hidden under compute needs little bandwidth. high_priority puts the group's
    NCCL stream at high priority, so its kernels start as soon as an SM frees. Collective: every rank calls
    it with the same arguments in the same order (the first call per setting creates the communicator).
    """
    if ctx.group is None or ctx.backend != "nccl" or (max_ctas is None and not high_priority):
        return ctx.group
    if max_ctas is not None and max_ctas < 1:
        raise ParallelConfigError(f"max_ctas must be >= 1 (thread blocks of an NCCL collective), got {max_ctas}")
    key = (id(ctx.group), max_ctas, high_priority)
    if key not in _COMM_GROUPS:
        opts = dist.ProcessGroupNCCL.Options(is_high_priority_stream=high_priority)
        if max_ctas is not None:
            opts.config.min_ctas = 1
            opts.config.max_ctas = max_ctas
        _COMM_GROUPS[key] = dist.new_group(list(range(ctx.world_size)), backend="nccl", pg_options=opts,
                                           device_id=ctx.device)
    return _COMM_GROUPS[key]


def shutdown(ctx: TPContext) -> None:
    """Destroy the process group (if any) so the process exits cleanly."""
    if ctx.group is not None and dist.is_initialized():
        _COMM_GROUPS.clear()
        dist.destroy_process_group()
