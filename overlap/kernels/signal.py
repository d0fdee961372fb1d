"""Signal-pad flags between ranks: the Triton device functions every fused kernel synchronises with,
and tiny one-program flag kernels that order stream work (copy-engine pulls) across ranks.

Protocol (the self-resetting flags of torch's CUDA symmetric-memory barrier): source s tells receiver d
"done" on a channel c by a compare-and-swap 0 -> 1 on word c * R + s of d's signal pad, retrying while
the word is still 1 (d has not consumed the previous signal yet); d consumes it by a compare-and-swap
1 -> 0 of the same word, retrying while it is 0. Every exchange leaves the pad all zeros, so nothing
has to be reset between calls and a CUDA graph can replay the same launches forever. At most one
signal per word is ever outstanding, so ranks that make the same calls in the same order always pair
a wait with the matching send.

Memory ordering (PTX memory model, system scope because the data and the flags cross GPUs):
  sender:   data stores (its own or a previous kernel's) -> fence.acq_rel.sys in every thread ->
            bar.sync -> atom.release.sys.cas by one thread (Triton lowers a scalar atomic to thread 0
            and broadcasts its result through shared memory)
  receiver: atom.acquire.sys.cas by one thread -> bar.sync -> fence.acq_rel.sys in every thread ->
            data loads (or, in a later kernel or copy on the same stream, copy-engine reads).
The fences are inline PTX, which Triton's CPU interpreter cannot run; there the flags still work
(the interpreter's atomics are real C++ atomics, also across processes on shared memory).

Waits spin at most max_spin times; a wait that gives up sets state[0] (PeerTables.check_status)
instead of hanging the GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

from overlap.kernels.compile_options import FP_FUSION
from overlap.kernels.schedule import pad_channels
from overlap.kernels.symm import PeerTables


@triton.jit
def sys_fence(ENABLED: tl.constexpr):
    """fence.acq_rel.sys in every thread (a no-op where ENABLED is False: the CPU interpreter)."""
    if ENABLED:
        tl.inline_asm_elementwise("fence.acq_rel.sys;\nmov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def send_flag(pad_ptrs, dst, slot, state_ptr, MAX_SPIN: tl.constexpr):
    """Set word `slot` of rank dst's pad from 0 to 1 (release, system scope), waiting while it is 1."""
    pad = tl.load(pad_ptrs + dst).to(tl.pointer_type(tl.int32))
    ok = (tl.atomic_cas(pad + slot, 0, 1, sem="release", scope="sys") == 0).to(tl.int32)
    spins = 0
    while (ok == 0) & (spins < MAX_SPIN):
        ok = (tl.atomic_cas(pad + slot, 0, 1, sem="release", scope="sys") == 0).to(tl.int32)
        spins += 1
    if ok == 0:
        tl.store(state_ptr, 1)


@triton.jit
def wait_flag(pad_ptrs, rank, slot, state_ptr, MAX_SPIN: tl.constexpr):
    """Consume word `slot` of this rank's pad: wait until it is 1, set it to 0 (acquire, system scope)."""
    pad = tl.load(pad_ptrs + rank).to(tl.pointer_type(tl.int32))
    ok = (tl.atomic_cas(pad + slot, 1, 0, sem="acquire", scope="sys") == 1).to(tl.int32)
    spins = 0
    while (ok == 0) & (spins < MAX_SPIN):
        ok = (tl.atomic_cas(pad + slot, 1, 0, sem="acquire", scope="sys") == 1).to(tl.int32)
        spins += 1
    if ok == 0:
        tl.store(state_ptr, 1)


@triton.jit
def block_barrier(pad_ptrs, channel, state_ptr, RANK: tl.constexpr, WORLD: tl.constexpr,
                  SYS_FENCE: tl.constexpr, MAX_SPIN: tl.constexpr):
    """Program `channel` of every rank meets here: what each wrote before is visible to all after."""
    sys_fence(SYS_FENCE)
    tl.debug_barrier()
    for p in tl.static_range(WORLD):
        if p != RANK:
            send_flag(pad_ptrs, p, channel * WORLD + RANK, state_ptr, MAX_SPIN)
    for s in tl.static_range(WORLD):
        if s != RANK:
            wait_flag(pad_ptrs, RANK, channel * WORLD + s, state_ptr, MAX_SPIN)
    tl.debug_barrier()
    sys_fence(SYS_FENCE)


@triton.jit
def flags_kernel(pad_ptrs, state_ptr, peer, channel, RANK: tl.constexpr, WORLD: tl.constexpr,
                 SEND: tl.constexpr, WAIT: tl.constexpr, ALL: tl.constexpr,
                 SYS_FENCE: tl.constexpr, MAX_SPIN: tl.constexpr):
    """One program: send to (SEND) and/or wait for (WAIT) `peer`, or every other rank (ALL), on a channel."""
    sys_fence(SYS_FENCE)
    if SEND:
        if ALL:
            for p in tl.static_range(WORLD):
                if p != RANK:
                    send_flag(pad_ptrs, p, channel * WORLD + RANK, state_ptr, MAX_SPIN)
        else:
            send_flag(pad_ptrs, peer, channel * WORLD + RANK, state_ptr, MAX_SPIN)
    if WAIT:
        if ALL:
            for s in tl.static_range(WORLD):
                if s != RANK:
                    wait_flag(pad_ptrs, RANK, channel * WORLD + s, state_ptr, MAX_SPIN)
        else:
            wait_flag(pad_ptrs, RANK, channel * WORLD + peer, state_ptr, MAX_SPIN)
    sys_fence(SYS_FENCE)


def _launch(t: PeerTables, peer: int, channel: int, send: bool, wait: bool, all_peers: bool) -> None:
    if not 0 <= channel < pad_channels(t.pad_bytes, t.world):
        raise ValueError(f"channel {channel} outside the {t.pad_bytes}-byte signal pad "
                         f"({pad_channels(t.pad_bytes, t.world)} channels of {t.world} ranks)")
    if not all_peers and not (0 <= peer < t.world and peer != t.rank):
        raise ValueError(f"peer {peer} must be another rank of 0..{t.world - 1} (this is rank {t.rank})")
    flags_kernel[(1,)](t.pad_table, t.state, peer, channel, RANK=t.rank, WORLD=t.world, SEND=send, WAIT=wait,
                       ALL=all_peers, SYS_FENCE=t.sys_fence, MAX_SPIN=t.max_spin, num_warps=1, **FP_FUSION)


def put_flag(t: PeerTables, peer: int, channel: int) -> None:
    """On the current stream, after the work queued before it: tell `peer` on `channel`."""
    _launch(t, peer, channel, send=True, wait=False, all_peers=False)


def put_flags(t: PeerTables, channel: int) -> None:
    """Tell every other rank on `channel`."""
    _launch(t, 0, channel, send=True, wait=False, all_peers=True)


def wait_for(t: PeerTables, src: int, channel: int) -> None:
    """Block the current stream until `src` told this rank on `channel`."""
    _launch(t, src, channel, send=False, wait=True, all_peers=False)


def barrier(t: PeerTables, channel: int) -> None:
    """Block the current stream until every rank reached this barrier on `channel` (send all, wait all)."""
    _launch(t, 0, channel, send=True, wait=True, all_peers=True)
