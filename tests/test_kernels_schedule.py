"""overlap.kernels.schedule: chunk orders, row ownership, launch grids, path choice, and a discrete
simulation of the reduce-scatter and all-gather pipelines (every rank's stream program, with the
cross-rank flags) proving they finish for every group size: no rank waits for a flag that is only
sent after that wait."""

import pytest

from overlap.kernels import schedule as S


@pytest.mark.parametrize("world", range(1, 9))
def test_all_gather_consumes_own_chunk_first_then_each_peer_once(world):
    for rank in range(world):
        order = S.ag_chunk_order(rank, world)
        assert order[0] == rank and sorted(order) == list(range(world))
        assert order[1:] == [(rank + i) % world for i in range(1, world)]
    # at every step the ranks pull from pairwise different peers: no link carries two pulls at once
    for step in range(1, world):
        sources = [S.ag_chunk_order(r, world)[step] for r in range(world)]
        assert sorted(sources) == list(range(world))


@pytest.mark.parametrize("world", range(1, 9))
def test_reduce_scatter_computes_own_chunk_last_and_pulls_in_production_order(world):
    for rank in range(world):
        order = S.rs_compute_order(rank, world)
        assert order[-1] == rank and sorted(order) == list(range(world))
        for step, dst in enumerate(order):
            assert S.rs_step(rank, dst, world) == step
        pulls = S.rs_pull_order(rank, world)
        assert sorted(pulls + [rank]) == list(range(world))
        # the j-th pull is from the peer that produces this rank's chunk at step j
        assert [S.rs_step(src, rank, world) for src in pulls] == list(range(world - 1))


def test_row_spans_tile_the_token_dimension_and_owner_inverts_them():
    m_total, world = 96, 4
    spans = [S.row_span(r, m_total, world) for r in range(world)]
    assert spans == [(0, 24), (24, 48), (48, 72), (72, 96)]
    for r, (lo, hi) in enumerate(spans):
        assert all(S.row_owner(row, m_total, world) == r for row in range(lo, hi))
    with pytest.raises(IndexError):
        S.row_owner(96, m_total, world)


def test_flag_slots_are_distinct_per_channel_and_source():
    world = 4
    slots = {S.flag_slot(c, s, world) for c in range(8) for s in range(world)}
    assert slots == set(range(32))
    assert S.flag_slot(S.DONE, 3, world) == world + 3


def test_grid_is_capped_by_signal_pad_and_sm_count():
    assert S.max_programs(2048, 4, 132) == 128  # 512 words / 4 ranks
    assert S.max_programs(9216, 4, 132) == 132  # SM-bound
    assert S.max_programs(2048, 8, 132) == 64
    with pytest.raises(ValueError, match="no room"):
        S.max_programs(8, 4, 132)


@pytest.mark.parametrize("n,programs,expect", [(8192, 128, (64, 128)), (8192, 132, (64, 128)),
                                               (8192, 64, (128, 64)), (1024, 128, (32, 32)),
                                               (200, 4, (64, 4)), (100000, 64, (256, 64))])
def test_decode_config_covers_every_column(n, programs, expect):
    block_n, grid = S.decode_config(n, programs)
    assert (block_n, grid) == expect
    assert grid <= programs and block_n & (block_n - 1) == 0
    tiles = S.cdiv(n, block_n)
    covered = sorted(t for p in range(grid) for t in range(p, tiles, grid))  # the kernel's tile loop
    assert covered == list(range(tiles))


def test_one_shot_config():
    assert S.one_shot_config(8192, 128) == (2048, 4)
    assert S.one_shot_config(64 * 2048 * 8, 128) == (2048, 128)
    assert S.one_shot_config(1, 128) == (2048, 1)


@pytest.mark.parametrize("op,m,n,expect", [
    ("all_reduce", 1, 8192, "fused_gemv"), ("all_reduce", 16, 8192, "fused_gemv"),
    ("all_reduce", 128, 8192, "one_shot"), ("all_reduce", 4096, 8192, "pipeline"),
    ("all_reduce", 4099, 8192, "one_shot"),  # rows not divisible by R: no reduce-scatter split
    ("reduce_scatter", 128, 8192, "one_shot"), ("reduce_scatter", 1024, 8192, "pipeline"),
    ("all_gather", 128, 8192, "one_shot"), ("all_gather", 8192, 8192, "pipeline"),
    ("all_gather", 400, 2 ** 20, "one_shot"),  # big but only 100 rows per chunk
])
def test_choose_path(op, m, n, expect):
    assert S.choose_path(op, m, n, 4, 2) == expect
    assert S.choose_path(op, m, n, 1, 2) == "local"


def test_choose_path_rejects_unknown_op():
    with pytest.raises(ValueError, match="valid: all_reduce"):
        S.choose_path("broadcast", 4096, 8192, 4, 2)


def _simulate(programs: dict, max_rounds: int = 10_000) -> bool:
    """Run per-(rank, stream) instruction lists to completion: ("put", dst, ch), ("wait", src, ch),
    ("rec", name), ("waitev", name), ("op",). Flags follow the pad protocol (a put blocks while the
    receiver's word is still 1). Returns True when every stream finishes."""
    pads, events = {}, set()
    pc = {key: 0 for key in programs}
    for _ in range(max_rounds):
        progressed = False
        for (rank, stream), prog in programs.items():
            while pc[(rank, stream)] < len(prog):
                ins = prog[pc[(rank, stream)]]
                if ins[0] == "put":
                    word = (ins[1], ins[2], rank)
                    if pads.get(word):
                        break
                    pads[word] = 1
                elif ins[0] == "wait":
                    word = (rank, ins[2], ins[1])
                    if not pads.get(word):
                        break
                    pads[word] = 0
                elif ins[0] == "rec":
                    events.add((rank, ins[1]))
                elif ins[0] == "waitev" and (rank, ins[1]) not in events:
                    break
                pc[(rank, stream)] += 1
                progressed = True
        if all(pc[k] == len(p) for k, p in programs.items()):
            return not any(pads.values())  # every signal consumed: the pads are clean for the next call
        if not progressed:
            return False
    return False


def _rs_programs(world: int, calls: int) -> dict:
    progs = {}
    for r in range(world):
        order, pulls = S.rs_compute_order(r, world), S.rs_pull_order(r, world)
        cur, side = [], []
        for c in range(calls):
            cur += [("waitev", f"done{c - 1}")] if c else []
            for j, d in enumerate(order[:-1]):
                cur += [("op",), ("rec", f"gemm{c}.{j}")]
            for j, (d, s) in enumerate(zip(order[:-1], pulls)):
                side += [("waitev", f"gemm{c}.{j}"), ("put", d, S.READY), ("wait", s, S.READY), ("op",)]
            side += [("put", p, S.DONE) for p in range(world) if p != r]
            side += [("wait", p, S.DONE) for p in range(world) if p != r] + [("rec", f"done{c}")]
        progs[(r, "cur")], progs[(r, "side")] = cur, side
    return progs


def _ag_programs(world: int, calls: int) -> dict:
    progs = {}
    for r in range(world):
        side = []
        for c in range(calls):
            side += [("op",)] + [("put", p, S.READY) for p in range(world) if p != r]
            for s in S.ag_chunk_order(r, world)[1:]:
                side += [("wait", s, S.READY), ("op",)]
            side += [("put", p, S.DONE) for p in range(world) if p != r]
            side += [("wait", p, S.DONE) for p in range(world) if p != r]
        progs[(r, "side")] = side
    return progs


@pytest.mark.parametrize("world", range(1, 9))
def test_pipelines_never_deadlock_and_leave_clean_pads(world):
    assert _simulate(_rs_programs(world, calls=3))
    assert _simulate(_ag_programs(world, calls=3))


def test_simulation_detects_a_deadlock():
    # both ranks wait before they signal: the simulator must report it
    progs = {(0, "s"): [("wait", 1, 0), ("put", 1, 0)], (1, "s"): [("wait", 0, 0), ("put", 0, 0)]}
    assert not _simulate(progs)
