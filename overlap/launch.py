"""Spawn R local ranks of a function (tests, notebooks); torchrun launches real jobs (spd-bench).

Each rank r runs fn(ctx, *args) with ctx = init_tp(rank=r, world_size=R) over a file:// store in
workdir (no ports, so parallel test runs cannot collide). What fn returns is saved per rank and handed
back as a list. The whole group must finish within timeout_s: otherwise every rank is killed and
TimeoutError raised, and the process group's own timeout makes a stuck collective fail sooner. Shortly
before that kill (10% of timeout_s, at most 10 s) every rank still running prints its Python stacks
(faulthandler) to stderr.
"""

from __future__ import annotations

import faulthandler
import time
import uuid
from pathlib import Path

import torch
import torch.multiprocessing as mp

from overlap.context import init_tp, shutdown

DEFAULT_TIMEOUT_S = 120.0


def _entry(rank, fn, world_size, workdir, store, backend, pg_timeout_s, threads, args, dump_at):
    torch.set_num_threads(threads)  # R ranks share the machine's cores
    faulthandler.dump_traceback_later(max(0.5, dump_at - time.time()), exit=False)  # a hung rank says where it is
    ctx = init_tp(backend, pg_timeout_s, rank=rank, world_size=world_size, local_rank=rank,
                  init_method=f"file://{store}")
    try:
        result = fn(ctx, *args)
        torch.save(result, Path(workdir) / f"result-{rank}.pt")
        ctx.barrier()  # tear down together: no rank destroys the group while a peer still uses it
    finally:
        shutdown(ctx)


def spawn_ranks(fn, world_size: int, workdir: str | Path, args: tuple = (), backend: str = "gloo",
                timeout_s: float = DEFAULT_TIMEOUT_S, threads: int = 1, pg_timeout_s: float | None = None) -> list:
    """Run fn(ctx, *args) on world_size spawned ranks; returns [rank 0's result, rank 1's, ...].

    timeout_s bounds the whole group's wall time; pg_timeout_s (default timeout_s) is the process
    group's timeout, after which a collective that some rank never joins raises.

    fn must be importable by name (a module-level function). A rank that raises fails the call
    (torch.multiprocessing re-raises its traceback).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.glob("result-*.pt"):
        old.unlink()
    store = workdir / f"store-{uuid.uuid4().hex}"
    dump_at = time.time() + timeout_s - min(10.0, 0.1 * timeout_s)  # wall clock, before the kill at timeout_s
    entry_args = (fn, world_size, str(workdir), str(store), backend, pg_timeout_s or timeout_s, threads, args,
                  dump_at)
    pc = mp.start_processes(_entry, args=entry_args, nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not pc.join(timeout=max(0.1, min(5.0, deadline - time.monotonic())), grace_period=1):
        if time.monotonic() > deadline:
            for p in pc.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
            raise TimeoutError(f"{world_size} ranks of {fn.__name__} did not finish within {timeout_s:.0f} s")
    return [torch.load(workdir / f"result-{r}.pt", weights_only=False) for r in range(world_size)]
