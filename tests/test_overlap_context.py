"""overlap.context: the frozen TPContext, init_tp from torchrun's environment, and process-group timeouts."""

import dataclasses
import time

import pytest
import torch
import torch.distributed as dist

from overlap.context import TPContext, init_tp, single
from overlap.launch import spawn_ranks
from spd.errors import ParallelConfigError

HANG_TIMEOUT_S = 6.0  # process-group timeout in the hang test; the sleeping rank stays away far longer


def test_single_process_context_without_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_tp("gloo")
    assert (ctx.rank, ctx.world_size, ctx.group, ctx.backend) == (0, 1, None, "none")
    assert ctx.is_main and not ctx.distributed
    ctx.barrier()  # a no-op for one process
    assert not dist.is_initialized()


def test_world_size_one_from_torchrun_needs_no_group(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert init_tp("gloo").group is None


def test_context_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        single().rank = 1


def test_bad_backend_and_missing_rank_are_explained(monkeypatch):
    with pytest.raises(ParallelConfigError, match="valid: auto, nccl, gloo"):
        init_tp("mpi")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ParallelConfigError, match="torchrun"):
        init_tp("gloo", world_size=2)
    if not torch.cuda.is_available():
        with pytest.raises(ParallelConfigError, match="backend=gloo"):
            init_tp("nccl", world_size=2, rank=0)


def _all_reduce_rank(ctx: TPContext):
    x = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(x, group=ctx.group)
    return ctx.rank, ctx.world_size, ctx.backend, x.item()


def test_two_gloo_ranks_all_reduce(tmp_path):
    results = spawn_ranks(_all_reduce_rank, 2, tmp_path, timeout_s=90)
    assert results == [(0, 2, "gloo", 3.0), (1, 2, "gloo", 3.0)]


def _one_rank_goes_missing(ctx: TPContext):
    x = torch.ones(1)
    dist.all_reduce(x, group=ctx.group)  # both ranks are up
    if ctx.rank == 1:
        time.sleep(10 * HANG_TIMEOUT_S)  # never joins the second collective in time
    dist.all_reduce(x, group=ctx.group)


def test_a_missing_rank_fails_instead_of_hanging(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(Exception, match="(?i)timed? ?out"):
        spawn_ranks(_one_rank_goes_missing, 2, tmp_path, timeout_s=60, pg_timeout_s=HANG_TIMEOUT_S)
    assert time.monotonic() - t0 < 5 * HANG_TIMEOUT_S


def test_comm_group_is_the_context_group_off_nccl():
    from overlap.context import comm_group, single

    ctx = single()
    assert comm_group(ctx, max_ctas=4) is None  # one process: nothing to all-reduce
    fake = TPContext(rank=0, world_size=2, device=torch.device("cpu"), group=object(), backend="gloo")
    assert comm_group(fake, max_ctas=4) is fake.group  # gloo has no thread blocks to cap


def _rank_1_never_returns(ctx: TPContext):
    if ctx.rank == 1:
        time.sleep(600)
    return ctx.rank


def test_a_hung_rank_prints_its_stack_before_it_is_killed(tmp_path, capfd):
    with pytest.raises(TimeoutError, match="did not finish within 20 s"):
        spawn_ranks(_rank_1_never_returns, 2, tmp_path, timeout_s=20)
    err = capfd.readouterr().err
    assert "_rank_1_never_returns" in err and "Timeout" in err  # faulthandler's "Timeout (0:00:..)!" dump
