"""The Triton kernels of overlap.kernels on CPU, through Triton's interpreter (TRITON_INTERPRET=1).

The interpreter must be switched on before triton is imported, so each case runs in a fresh
subprocess (this file, run as a script). Multi-rank cases spawn one process per rank; the ranks'
"symmetric memory" is shared CPU memory, mapped by every rank at its own addresses exactly as CUDA
peer mappings are, so the kernels' pointer tables, signal-pad flags (real C++ atomics across
processes) and the decode kernel's epoch double buffer all run as on the GPU. What the interpreter
cannot check: inline PTX fences (skipped here), GPU memory ordering, performance. Math runs in fp32.
"""

from __future__ import annotations

import json
import os
import queue as queue_mod
import sys
import time

import pytest

from interpreted import run_interpreted

FP32_TOL = 1e-4  # fp32 dot products of length <= 200 in a different summation order than torch's
CASE_TIMEOUT_S = 240


def run_case(case: str, world: int) -> dict:
    return run_interpreted(__file__, case, world, timeout=CASE_TIMEOUT_S)


def test_gemv_part_matches_matmul_single_rank():
    out = run_case("gemv", 1)
    assert out["max_err"] < FP32_TOL, out


@pytest.mark.parametrize("world", [2, 3])
def test_fused_gemv_all_reduce_repeated_calls(world):
    out = run_case("decode", world)
    assert out["max_err"] < FP32_TOL, out
    assert out["epochs"] == [3] * world and out["status"] == [0] * world and out["pads_clean"], out


@pytest.mark.parametrize("world", [2, 3])
def test_one_shot_reduce_and_gather(world):
    out = run_case("one_shot", world)
    assert out["max_err"] == 0.0, out  # sums of small integers and copies: exact
    assert out["status"] == [0] * world and out["pads_clean"], out


def test_stream_flags_order_a_peer_read():
    out = run_case("flags", 2)
    assert out["ok"] and out["pads_clean"], out


def test_a_missing_peer_sets_the_error_flag_instead_of_hanging():
    out = run_case("missing_peer", 2)
    assert out["status"] == 1, out


# ----------------------------------------------------------------------------------------------------
# Worker side (runs with TRITON_INTERPRET=1 in a subprocess).

PAD_WORDS = 512  # a 2048-byte signal pad, the smallest torch has used


def _tables(rank, bufs, pads, max_spin=1 << 18):
    import torch

    from overlap.kernels.symm import PeerTables

    return PeerTables(buf_table=torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64),
                      pad_table=torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64),
                      state=torch.zeros(4, dtype=torch.int32), rank=rank, world=len(bufs),
                      nbytes=bufs[0].numel(), pad_bytes=pads[0].numel() * 4, sm_count=4, max_spin=max_spin)


def _rank_main(rank, case, bufs, pads, queue):
    import torch

    from overlap.kernels.gemv_all_reduce import gemv_all_reduce
    from overlap.kernels.one_shot import one_shot_gather, one_shot_reduce
    from overlap.kernels.signal import barrier, put_flag, wait_for

    t = _tables(rank, bufs, pads, max_spin=2000 if case == "missing_peer" else 1 << 18)
    world = len(bufs)
    res = {"rank": rank}
    if case in ("gemv", "decode"):
        errs = []
        shapes = [(1, 200, 48), (3, 130, 40), (16, 64, 37)] if case == "gemv" else [(3, 200, 48)] * 3
        for it, (m, n, k) in enumerate(shapes):
            g = torch.Generator().manual_seed(1000 * it + rank)
            x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
            add, resid = torch.randn(m, n, generator=g), torch.randn(m, n, generator=g)
            out = gemv_all_reduce(x, w, t, add=add, residual=resid, block_k=32)
            mine = x @ w.T + add
            res.setdefault("partials", []).append(mine.tolist())
            res.setdefault("outs", []).append((out - resid).tolist())
            if world == 1:
                errs.append((out - (mine + resid)).abs().max().item())
        res["max_err"] = max(errs) if errs else None
    elif case == "one_shot":
        n = 3000
        local = torch.arange(n, dtype=torch.float32) * (rank + 1)
        t_buf = torch.frombuffer(bufs[rank].numpy(), dtype=torch.float32)
        t_buf[:n] = local
        ar = one_shot_reduce(t, torch.empty(n))
        rs = one_shot_reduce(t, torch.empty(n // world), offset=rank * (n // world))
        ga = one_shot_gather(t, torch.empty(world * 100), 100, offset=7)
        total = torch.arange(n, dtype=torch.float32) * sum(r + 1 for r in range(world))
        exp_ga = torch.cat([torch.arange(7, 107, dtype=torch.float32) * (r + 1) for r in range(world)])
        res["max_err"] = max((ar - total).abs().max().item(),
                             (rs - total[rank * (n // world):(rank + 1) * (n // world)]).abs().max().item(),
                             (ga - exp_ga).abs().max().item())
    elif case == "flags":
        data = torch.frombuffer(bufs[rank].numpy(), dtype=torch.float32)
        ok = True
        for it in range(3):
            if rank == 0:
                data[:4] = torch.tensor([it, it + 1, it + 2, it + 3], dtype=torch.float32)
                put_flag(t, 1, 0)
                barrier(t, 1)  # do not overwrite before rank 1 has read
            else:
                wait_for(t, 0, 0)
                peer = torch.frombuffer(bufs[0].numpy(), dtype=torch.float32)
                ok &= peer[:4].tolist() == [it, it + 1, it + 2, it + 3]
                barrier(t, 1)
        res["ok"] = ok
    elif case == "missing_peer":
        if rank == 0:
            wait_for(t, 1, 0)  # rank 1 never signals
    res["status"] = int(t.state[0])
    res["epoch"] = int(t.state[1])
    queue.put(json.dumps(res))


def _worker(case: str, world: int) -> dict:
    import torch
    import torch.multiprocessing as mp

    nbytes = 2 * max(world, 1) * 16 * 256 * 4
    bufs = [torch.zeros(nbytes, dtype=torch.uint8).share_memory_() for _ in range(world)]
    pads = [torch.zeros(PAD_WORDS, dtype=torch.int32).share_memory_() for _ in range(world)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, case, bufs, pads, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, deadline = [], time.monotonic() + CASE_TIMEOUT_S - 20
    while len(results) < world:  # fail fast when a rank dies instead of waiting for its peers' spin limit
        try:
            results.append(json.loads(queue.get(timeout=1)))
        except queue_mod.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"rank processes failed (exit codes {dead}) or timed out")
    results.sort(key=lambda r: r["rank"])
    for p in procs:
        p.join()
    out = {"status": [r["status"] for r in results], "epochs": [r["epoch"] for r in results],
           "pads_clean": all(int(p.abs().sum()) == 0 for p in pads)}
    if case == "decode":
        errs = []
        for it in range(len(results[0]["outs"])):
            ref = sum(torch.tensor(r["partials"][it]) for r in results)
            errs += [(torch.tensor(r["outs"][it]) - ref).abs().max().item() for r in results]
        out["max_err"] = max(errs)
    elif case in ("gemv", "one_shot"):
        out["max_err"] = max(r["max_err"] for r in results)
    elif case == "flags":
        out["ok"] = all(r.get("ok", True) for r in results)
    elif case == "missing_peer":
        out["status"] = results[0]["status"]
    return out


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the tests (they set TRITON_INTERPRET=1)"
    print(json.dumps(_worker(sys.argv[1], int(sys.argv[2]))))
