"""Host-side scheduling math of the fused GEMM + collective ops: chunk orders, row ownership, grids, slots.

Pure integer functions, no torch or Triton, so the CPU tests can check them exhaustively. With R ranks
and a token dimension of M rows split evenly, rank r owns rows [r M/R, (r+1) M/R) (the sequence-parallel
shard); "chunk s" is the M/R rows owned by rank s.

All-gather + GEMM (Flux): rank r multiplies its own chunk first (it is already local), then pulls the
peers' chunks in the order r+1, r+2, ... (mod R), so at every step each rank reads from a different
peer and no link carries two pulls at once.

GEMM + reduce-scatter: rank r computes the partial of the chunk destined to r+1 first, then r+2, ...,
and its own chunk last, so the own GEMM hides the last transfer. Rank s therefore produces rank d's
chunk at step (d - s - 1) mod R, and d pulls its chunks in the order they are produced: from r-1,
r-2, ..., r+1.

Signal pads (one per symmetric allocation, zeroed at allocation) hold 32-bit flags. The slot of a
(channel, source) pair in the receiver's pad is channel * R + source; the kernels that synchronise per
program use the program id as the channel. A flag goes 0 -> 1 (the sender, which first waits for 0)
and 1 -> 0 (the receiver, which waits for 1), so the pad is all zeros again after every exchange and
no epoch has to be carried between calls or CUDA-graph replays.
"""

from __future__ import annotations

DECODE_MAX_M = 16  # rows the fused decode kernel handles: one tl.dot tile of 16 rows (M = 1..16 decode tokens)
ONE_SHOT_MAX_BYTES = 4 << 20  # partial (M, N) size up to which one-shot pulls beat pipelined copies (latency-bound)
PIPELINE_MIN_ROWS = 128  # per-chunk rows below which chunked cuBLAS GEMMs lose more than overlap gains
DEFAULT_PAD_BYTES = 2048  # signal pad size of torch releases without get_signal_pad_size() (2.5 .. 2.10)
READY, DONE = 0, 1  # flag channels of the pipelined ops: "my chunk is ready for you", "I have read yours"
PATHS = ("local", "fused_gemv", "one_shot", "pipeline")


def ag_chunk_order(rank: int, world: int) -> list[int]:
    """Chunks in the order rank consumes them in all-gather + GEMM: its own first, then r+1, r+2, ..."""
    return [(rank + i) % world for i in range(world)]


def rs_compute_order(rank: int, world: int) -> list[int]:
    """Destination ranks in the order rank computes their partial chunks: r+1, r+2, ..., own last."""
    return [(rank + i) % world for i in range(1, world + 1)]


def rs_step(src: int, dst: int, world: int) -> int:
    """The 0-based step at which rank src computes the chunk destined to rank dst."""
    return (dst - src - 1) % world


def rs_pull_order(rank: int, world: int) -> list[int]:
    """Source ranks in the order rank pulls their partial of its chunk (the order they produce it)."""
    return [(rank - i) % world for i in range(1, world)]


def row_span(rank: int, m_total: int, world: int) -> tuple[int, int]:
    """[start, stop) of the rows owned by rank when m_total rows split evenly over world ranks."""
    m = m_total // world
    return rank * m, (rank + 1) * m


def row_owner(row: int, m_total: int, world: int) -> int:
    """The rank that owns (receives the reduced value of) a row in reduce-scatter."""
    if not 0 <= row < m_total:
        raise IndexError(f"row {row} outside [0, {m_total})")
    return row // (m_total // world)


def flag_slot(channel: int, src: int, world: int) -> int:
    """Index (in 32-bit words) of source src's flag on a channel, inside the receiver's signal pad."""
    return channel * world + src


def pad_channels(pad_bytes: int, world: int) -> int:
    """How many channels of world flags fit in a signal pad of pad_bytes bytes."""
    return (pad_bytes // 4) // world


def max_programs(pad_bytes: int, world: int, sm_count: int) -> int:
    """Most programs a kernel that synchronises per program may launch.

    Each program uses its own pad channel, and every program must be resident at once (a program that
    spins waiting for a peer's program of the same id must not keep that peer's program from being
    scheduled), so the grid is capped by the pad and by the multiprocessor count.
    """
    n = min(pad_channels(pad_bytes, world), sm_count)
    if n < 1:
        raise ValueError(f"a {pad_bytes}-byte signal pad has no room for {world} ranks' flags")
    return n


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def decode_config(n: int, programs: int, min_block_n: int = 32, max_block_n: int = 256) -> tuple[int, int]:
    """(BLOCK_N, grid) of the fused decode kernel: the smallest power-of-two column tile whose tile
    count fits in `programs` (one tile per program when possible, more work per program only when
    the pad or the SM count forces it)."""
    block_n = max(min_block_n, min(max_block_n, next_pow2(cdiv(n, programs))))
    return block_n, min(cdiv(n, block_n), programs)


def one_shot_config(numel: int, programs: int, block: int = 2048) -> tuple[int, int]:
    """(BLOCK, grid) of the one-shot pull kernel: element blocks spread over at most `programs`."""
    return block, max(1, min(cdiv(numel, block), programs))


def choose_path(op: str, m: int, n: int, world: int, itemsize: int,
                one_shot_max_bytes: int = ONE_SHOT_MAX_BYTES,
                pipeline_min_rows: int = PIPELINE_MIN_ROWS) -> str:
    """Which implementation the "triton" impl uses for an op on an (m, n) result.

    op is "all_reduce" (matmul_all_reduce), "reduce_scatter" or "all_gather" (their matmul forms);
    m is the row count of the full (unsharded) result. Returns one of PATHS.
    """
    if world == 1:
        return "local"
    if op == "all_reduce" and m <= DECODE_MAX_M:
        return "fused_gemv"
    small = m * n * itemsize <= one_shot_max_bytes
    if op == "all_reduce":
        return "one_shot" if small or m % world else "pipeline"
    if op not in ("reduce_scatter", "all_gather"):
        raise ValueError(f"unknown op {op!r}; valid: all_reduce, reduce_scatter, all_gather")
    return "one_shot" if small or m // world < pipeline_min_rows else "pipeline"
