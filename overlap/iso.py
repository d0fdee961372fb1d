"""ISO: sequence-level compute/communication overlap in prefill (Xiao and Su, arXiv 2409.11155).

A prefill chunk at positions [p, q) is cut into k pieces c_1..c_k (cost-balanced, below). Every layer
runs each of its stages for c_1, ..., c_k in turn; a piece's all-reduce is issued asynchronously
(Sync.start, from one communication stream) and waited for only when that piece's next stage needs it,
so it is in flight while the other k-1 pieces compute. For k = 2 and baseline blocks:

    compute:  attn(c1) | attn(c2)    | mlp(c1)     | mlp(c2)    | attn(c1), layer l+1 | ...
    comm:              | AR(c1 attn) | AR(c2 attn) | AR(c1 mlp) | AR(c2 mlp)          | ...

mlp(c1) waits for AR(c1 attn) and the next layer's attn(c1) for AR(c1 mlp): a software pipeline
across layers. An SPD block has one stage per piece, attention and MLP together, whose one all-reduce
(of a_r + mlp_r(norm(x + a_r))) overlaps the other pieces' blocks. Each piece's arithmetic is exactly
Block.forward's (h = x + AR(a); out = h + AR(m), or out = x + AR(a + m)), so ISO changes no number
against a prefill in the same pieces, and a prefill of k pieces runs k (2L - #SPD) all-reduces.
c_j's attention reads the K/V of c_1..c_j from the cache: written by earlier stages on the same
(compute) stream, so already there; its mask is bottom-right aligned (Transformer.chunk_inputs).

Split rule. Per layer and rank, a piece [a, b) costs linear-layer work proportional to its tokens and
attention work proportional to its (query, key) pairs, sum over i in [a, b) of i keys ~ (b^2 - a^2)/2:

    cost(a, b) = (b - a) + w (b^2 - a^2) / 2,      w = rho * 4 H Dh / (2 (D (H + 2 KV) Dh + H Dh D + 3 D F))

w is attention FLOPs per pair (QK^T and PV: 4 H Dh) over linear FLOPs per token (wqkv, wo, w13, w2),
both divided by R, so R cancels; rho is the GEMM/attention throughput ratio (ATTN_SLOWDOWN: 1 = FLOPs
alone). The boundaries s_j solve C(s_j) = j C(q) / k for C(x) = cost(p, x), in closed form. LLaMA-2-70B:
w = 1.91e-5; at S = 8192, k = 2 the split lands at 4245 (rho = 2: 4372), not 4096: the later piece,
whose queries see more keys, gets fewer of them. Boundaries snap to multiples of `align` (GEMM and
flash-attention row tiles) when every piece keeps at least `align` tokens.

Streams. On CUDA all ISO collectives are issued from one dedicated stream (Runtime.comm_stream), each
after the compute stream's work so far (the partial is complete); NCCL runs them in issue order on its
own stream, identically on every rank; Pending.wait() makes the compute stream (never the host) wait.
With a fused impl (symm_mem, triton) each stage's row-parallel GEMM moves onto that stream with its
all-reduce (Sync.start_matmul): the one-stream rule of symmetric-memory collectives holds within an ISO
prefill, and the compute stream waits for all of them before it returns.
On CPU (gloo) the same code runs: gloo sums on its own thread while the main thread computes.
"""

from __future__ import annotations

import math

import torch

from overlap.model import ModelArgs, Transformer
from overlap.sync import Pending

ATTN_SLOWDOWN = 1.0  # rho: GEMM FLOP/s over attention FLOP/s; 1 = balance FLOPs (measured values move the split right)


def attention_weight(args: ModelArgs, slowdown: float = ATTN_SLOWDOWN) -> float:
    """w: the cost of one (query, key) pair of attention in units of one token's linear layers."""
    D, H, KV, Dh, F = args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.ffn_dim
    linear = 2 * (D * (H + 2 * KV) * Dh + H * Dh * D + 3 * D * F)  # FLOPs a token, one layer
    return slowdown * 4 * H * Dh / linear


def chunk_cost(a: int, b: int, w: float) -> float:
    """cost(a, b) = (b - a) + w (b^2 - a^2) / 2 for the queries at positions [a, b)."""
    return (b - a) + w * (b * b - a * a) / 2


def _inverse_cost(start: int, target: float, w: float) -> float:
    """x with chunk_cost(start, x, w) == target: the root of w x^2/2 + x - c, written stably for w -> 0."""
    c = start + w * start * start / 2 + target
    return 2 * c / (1 + math.sqrt(1 + 2 * w * c))


def split_bounds(start: int, stop: int, k: int, w: float, align: int = 1) -> list[int]:
    """[start, s_1, ..., s_{k-1}, stop]: k pieces of (about) equal chunk_cost, each non-empty.

    k is capped at stop - start (one token a piece at least). With align > 1 and at least align tokens
    a piece, every inner boundary is start plus a multiple of align (the nearest to the balanced point).
    """
    n = stop - start
    if k < 1 or n < 1:
        raise ValueError(f"ISO needs k >= 1 pieces of a non-empty chunk; got k={k} for positions [{start}, {stop})")
    k = min(k, n)
    snap = align if align > 1 and n >= k * align else 1
    total = chunk_cost(start, stop, w)
    bounds = [start]
    for j in range(1, k):
        x = _inverse_cost(start, j * total / k, w)
        s = start + snap * round((x - start) / snap)
        bounds.append(min(max(s, bounds[-1] + snap), stop - (k - j) * snap))  # non-empty, room for the rest
    return bounds + [stop]


class _Piece:
    """One piece's hidden state, resid + the all-reduce in flight (None once waited), and its attention inputs."""

    def __init__(self, x: torch.Tensor, attn_args: tuple):
        self.resid, self.pending, self.attn_args = x, None, attn_args

    def value(self) -> torch.Tensor:
        """The piece's current hidden state (B, n, D); waits for its own all-reduce only."""
        if self.pending is not None:
            self.resid = self.resid + self.pending.wait()  # the same add as Block.forward's x + sync(a)
            self.pending = None
        return self.resid

    def value_normed(self, block) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, mlp_norm(h)) after the attention all-reduce: Block.add_norm, as Block.forward does it."""
        s, self.pending = self.pending.wait(), None
        self.resid, n = block.add_norm(self.resid, s)
        return self.resid, n

    def defer(self, resid: torch.Tensor, pending: Pending) -> None:
        self.resid, self.pending = resid, pending


@torch.no_grad()
def iso_forward(model: Transformer, tokens: torch.Tensor, bounds: list[int], stream=None,
                last_only: bool = False, group=None) -> torch.Tensor:
    """tokens (B, S) at positions [bounds[0], bounds[-1]) in pieces [bounds[j], bounds[j+1]) -> logits.

    Returns (B, S, V), or (B, 1, V) for the last token if last_only. Writes every piece's K/V into the
    cache like Transformer.forward. stream: the CUDA stream to issue all-reduces from (None on CPU);
    group: the process group of ISO's all-reduces (None: the model's; overlap.context.comm_group gives
    one whose NCCL kernels take at most a few SMs from the compute they overlap).
    """
    if model.max_seq == 0:
        raise RuntimeError("no KV cache: call setup_caches(max_batch, max_seq) (or use overlap.runtime.Runtime)")
    if len(bounds) < 2 or any(b <= a for a, b in zip(bounds, bounds[1:])) or bounds[-1] - bounds[0] != tokens.shape[1]:
        raise ValueError(f"bounds {bounds} must increase strictly from the chunk's start and span its "
                         f"{tokens.shape[1]} tokens")
    p0, device = bounds[0], tokens.device
    pieces = []
    for a, b in zip(bounds, bounds[1:]):
        x = model.tok_embeddings(tokens[:, a - p0 : b - p0])  # (B, n, D)
        pos = torch.arange(a, b, device=device)  # (n,)
        cos, sin, mask = model.chunk_inputs(pos, b, a, x.dtype)
        pieces.append(_Piece(x, (cos, sin, pos, mask, b)))
    for block in model.layers:
        if block.attn_sync.impl is not None:  # impl != nccl: the fused GEMM + all-reduce per piece and stage
            _fused_layer(block, pieces, stream)
            continue
        if block.spd:
            for c in pieces:
                x = c.value()
                a = block.attn(block.attn_norm(x), *c.attn_args)  # (B, n, D) partial
                m = block.mlp(block.add_norm(x, a)[1])  # (B, n, D) partial
                c.defer(x, block.block_sync.start(a + m, stream, group))  # the only sync
            continue
        for c in pieces:
            x = c.value()
            c.defer(x, block.attn_sync.start(block.attn(block.attn_norm(x), *c.attn_args), stream, group))  # sync 1
        for c in pieces:
            h, n = c.value_normed(block)  # h = x + sum_r a_r, n = mlp_norm(h)
            c.defer(h, block.mlp_sync.start(block.mlp(n), stream, group))  # sync 2
    outs = [c.value() for c in pieces]  # wait for every piece: no collective is left in flight
    x = outs[-1][:, -1:] if last_only else torch.cat(outs, dim=1)  # (B, 1, D) or (B, S, D)
    return model.output(model.norm(x))  # (B, S, V); replicated lm_head, so logits agree on all ranks


def _fused_layer(block, pieces: list[_Piece], stream) -> None:
    """One layer of ISO with a fused impl: Block.forward_fused's arithmetic, each wo / w2 GEMM with its
    all-reduce (Sync.start_matmul) on the comm stream while the other pieces compute."""
    if block.spd:
        for c in pieces:
            x = c.value()
            a = block.attn.wo(block.attn.heads(block.attn_norm(x), *c.attn_args))  # (B, n, D) rank-local partial
            g = block.mlp.act(block.add_norm(x, a)[1])  # (B, n, F/R)
            c.defer(x, block.block_sync.start_matmul(g, block.mlp.w2.weight, add=a, stream=stream))  # the only sync
        return
    for c in pieces:
        x = c.value()
        heads = block.attn.heads(block.attn_norm(x), *c.attn_args)  # (B, n, H/R Dh)
        c.defer(x, block.attn_sync.start_matmul(heads, block.attn.wo.weight, stream=stream))  # sync 1
    for c in pieces:
        h, n = c.value_normed(block)  # h = x + sum_r heads_r wo_r^T
        c.defer(h, block.mlp_sync.start_matmul(block.mlp.act(n), block.mlp.w2.weight, stream=stream))  # sync 2
