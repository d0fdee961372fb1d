"""Head grouping (HG) for extremely sensitive SPD blocks: which query heads share a rank, and which rank.

1. Maps. For each query head h, M_h = mean over calibration windows n of P_{n,h}[rows, :], where
   P_{n,h} = softmax(q_h k_h^T * scale + causal) is the (L, L) attention probability map and `rows` is an
   evenly spaced grid of at most max_rows query positions (all key positions kept: the mass on early
   "sink" tokens matters). Distance d(h, h') = ||M_h - M_h'||_F.
2. Partition. Split the heads into R groups of H/R maximising within-group diversity
   sum_g sum_{h < h' in g} d(h, h'). GQA: query heads never leave their KV head. When R <= KV the unit is
   a KV group (its H/KV query heads move together; unit distance = sum of its heads' cross distances);
   when R > KV each KV head is replicated on R/KV ranks, so each KV group is split on its own into R/KV
   groups of H/R heads. Exact enumeration when there are at most max_exact partitions, else greedy
   construction + best-improvement pairwise swaps from 64 seeded random orders (on 880 random cases with
   n <= 12 it matched the exact optimum in all; 16 restarts missed one by 0.5%; n = 32 takes 0.15 s).
3. Ranks. Group g on rank r costs C[g, r] = mean over tokens of ||mlp_r(norm2(x + a_g))||_2 (rank r's MLP
   shard output before the residual add, a_g = sum of g's heads' attention partials); maximise
   sum_g C[g, rank(g)] by linear assignment. With R > KV a whole KV group picks a block of R/KV ranks
   (outer assignment) and its groups pick ranks inside the block (inner assignments): exact for the pair.
4. Permute W_q, W_k, W_v rows and W_o columns in place (KV heads move with their groups): the full
   block's output is unchanged, only which rank holds which head changes. perm[j] = old head at new j.

Steps 1-3 are the paper's rule. An SPD block's behaviour depends only on which heads each rank holds (the
order inside a rank does not matter), so the distinct GQA-valid choices are the orderings: R <= KV, the KV
groups dealt to ranks, num_partitions(KV, R) x R! of them; R > KV, KV! x (num_partitions(H/KV, R/KV) x
(R/KV)!)^KV. `orderings` enumerates them (SmolLM2-135M at R = 3: 3! = 6), `random_ordering` draws one;
spd.distill scores candidates by the block's error after B2B (the paper's rule and the identity among them).
"""

from __future__ import annotations

import math
from itertools import combinations, permutations, product

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from spd.block import ffn_sizes, mlp_partials

MAX_EXACT = 100_000  # partitions enumerated exactly; above this the local search runs


def attn_shape(attn: nn.Module) -> tuple[int, int, int]:
    """(query heads H, KV heads, head dim) of a LlamaAttention."""
    hd = attn.head_dim
    return attn.q_proj.out_features // hd, attn.k_proj.out_features // hd, hd


def head_outputs(layer: nn.Module, x: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention per head: x (B, L, D) -> probabilities (B, H, L, L), partials a_h (H, B, L, D).

    sum_h a_h (+ o_proj bias) is the block's attention output; windows are unpadded, so the mask is causal.
    """
    attn = layer.self_attn
    H, KV, hd = attn_shape(attn)
    B, L, _ = x.shape
    hn = layer.input_layernorm(x)
    q = attn.q_proj(hn).view(B, L, H, hd).transpose(1, 2)  # (B, H, L, hd)
    k = attn.k_proj(hn).view(B, L, KV, hd).transpose(1, 2)  # (B, KV, L, hd)
    v = attn.v_proj(hn).view(B, L, KV, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
    k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)  # (B, H, L, hd)
    scores = (q @ k.transpose(-1, -2)).float() * attn.scaling  # (B, H, L, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    o = probs.to(v.dtype) @ v  # (B, H, L, hd)
    w = attn.o_proj.weight.unflatten(1, (H, hd))  # (D, H, hd)
    partials = torch.einsum("bhld,ehd->hble", o, w)  # (H, B, L, D)
    return probs, partials


@torch.no_grad()
def mean_attention_maps(layer: nn.Module, inputs: torch.Tensor, position_embeddings, batch_size: int = 4,
                        max_rows: int = 256) -> torch.Tensor:
    """(H, rows, L) mean attention map per head over windows inputs (N, L, D), rows subsampled evenly."""
    L = inputs.shape[1]
    rows = torch.linspace(0, L - 1, min(max_rows, L)).round().long().unique()
    total = None
    dev = next(layer.parameters()).device
    for s in range(0, len(inputs), batch_size):
        probs, _ = head_outputs(layer, inputs[s:s + batch_size].to(dev), position_embeddings)
        part = probs[:, :, rows.to(dev)].sum(0)  # (H, rows, L)
        total = part if total is None else total + part
    return total / len(inputs)


def num_partitions(n: int, k: int) -> int:
    """Unordered partitions of n items into k groups of n/k: n! / ((n/k)!^k k!)."""
    s = n // k
    return math.factorial(n) // (math.factorial(s) ** k * math.factorial(k))


def diversity(dist: np.ndarray, groups) -> float:
    """sum over groups of the pairwise distances inside each group."""
    return float(sum(dist[np.ix_(g, g)].sum() / 2 for g in groups))


def _partitions(items: tuple, size: int):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for mates in combinations(rest, size - 1):
        left = tuple(i for i in rest if i not in mates)
        for tail in _partitions(left, size):
            yield [(first, *mates)] + tail


def exact_partition(dist: np.ndarray, k: int) -> list[list[int]]:
    """The optimum partition of range(n) into k equal groups, by enumerating all of them."""
    n = len(dist)
    score: dict[tuple, float] = {}
    best, best_val = None, -math.inf
    for p in _partitions(tuple(range(n)), n // k):
        val = 0.0
        for g in p:
            if g not in score:
                score[g] = dist[np.ix_(g, g)].sum() / 2
            val += score[g]
        if val > best_val + 1e-12:
            best, best_val = p, val
    return [list(g) for g in best]


def local_search_partition(dist: np.ndarray, k: int, restarts: int = 64, seed: int = 0) -> list[list[int]]:
    """Greedy + pairwise-swap local search for the max-diversity equal partition (best of restarts)."""
    n, size = len(dist), len(dist) // k
    rng = np.random.default_rng(seed)
    best, best_val = None, -math.inf
    for _ in range(restarts):
        label = np.full(n, -1)
        for i in rng.permutation(n):  # greedy: join the open group it adds most distance to
            gains = [dist[i, label == g].sum() if (label == g).sum() < size else -math.inf for g in range(k)]
            label[i] = int(np.argmax(gains))
        while True:  # best-improvement swaps of two items in different groups
            S = dist @ np.eye(k)[label]  # (n, k): summed distance of item i to group g
            own = S[np.arange(n), label]
            delta = S[:, label] - own[:, None] + S[:, label].T - own[None, :] - 2 * dist  # (n, n)
            delta[label[:, None] == label[None, :]] = -math.inf
            i, j = np.unravel_index(np.argmax(delta), delta.shape)
            if delta[i, j] <= 1e-9 * max(1.0, abs(dist).max()):
                break
            label[i], label[j] = label[j], label[i]
        groups = [list(np.flatnonzero(label == g)) for g in range(k)]
        val = diversity(dist, groups)
        if val > best_val + 1e-12:
            best, best_val = groups, val
    return [[int(i) for i in g] for g in best]


def partition(dist: np.ndarray, k: int, max_exact: int = MAX_EXACT, seed: int = 0) -> tuple[list[list[int]], str]:
    """(groups, method): exact when at most max_exact partitions exist, else the local search."""
    n = len(dist)
    if n % k:
        raise ValueError(f"cannot split {n} items into {k} equal groups")
    if k == 1 or n == k:
        return ([list(range(n))] if k == 1 else [[i] for i in range(n)]), "trivial"
    if num_partitions(n, k) <= max_exact:
        return exact_partition(dist, k), "exact"
    return local_search_partition(dist, k, seed=seed), "local_search"


def group_heads(dist: np.ndarray, tp: int, num_kv: int, max_exact: int = MAX_EXACT, seed: int = 0):
    """GQA-aware query-head groups: (groups of heads (R lists of H/R), KV bucket of each group, method)."""
    H = len(dist)
    gq = H // num_kv
    kv_heads = [list(range(u * gq, (u + 1) * gq)) for u in range(num_kv)]
    if tp <= num_kv:  # KV groups move whole; unit distance = all cross distances of their heads
        unit = np.array([[dist[np.ix_(a, b)].sum() for b in kv_heads] for a in kv_heads])
        np.fill_diagonal(unit, 0.0)
        units, method = partition(unit, tp, max_exact, seed)
        groups = [[h for u in sorted(g) for h in kv_heads[u]] for g in units]
        return groups, [0] * tp, method
    groups, buckets, methods = [], [], set()
    for u, heads in enumerate(kv_heads):  # replicated KV heads: split each KV group on its own
        sub, method = partition(dist[np.ix_(heads, heads)], tp // num_kv, max_exact, seed)
        groups += [[heads[i] for i in sorted(g)] for g in sub]
        buckets += [u] * len(sub)
        methods.add(method)
    return groups, buckets, "+".join(sorted(methods))


def assign_groups(cost: np.ndarray, group_bucket, rank_bucket) -> list[int]:
    """rank of each group maximising sum cost[g, rank(g)], a bucket's groups filling one bucket of ranks."""
    group_bucket, rank_bucket = np.asarray(group_bucket), np.asarray(rank_bucket)
    bg, br = sorted(set(group_bucket.tolist())), sorted(set(rank_bucket.tolist()))
    outer = np.zeros((len(bg), len(br)))
    inner = {}
    for a, ga in enumerate(bg):
        gs = np.flatnonzero(group_bucket == ga)
        for b, rb in enumerate(br):
            rs = np.flatnonzero(rank_bucket == rb)
            ri, ci = linear_sum_assignment(cost[np.ix_(gs, rs)], maximize=True)
            outer[a, b] = cost[gs[ri], rs[ci]].sum()
            inner[a, b] = dict(zip(gs[ri].tolist(), rs[ci].tolist()))
    rank = [-1] * len(cost)
    for a, b in zip(*linear_sum_assignment(outer, maximize=True)):
        for g, r in inner[a, b].items():
            rank[g] = r
    return rank


@torch.no_grad()
def mlp_norm_costs(layer: nn.Module, inputs: torch.Tensor, position_embeddings, groups, tp: int,
                   batch_size: int = 4) -> np.ndarray:
    """(G, R): mean over tokens of ||mlp_r(norm2(x + a_g))||_2, rank r's MLP shard output for group g."""
    sizes = ffn_sizes(layer.mlp.gate_proj.out_features, tp)
    cost = torch.zeros(len(groups), tp, dtype=torch.float64)
    dev = next(layer.parameters()).device
    for s in range(0, len(inputs), batch_size):
        x = inputs[s:s + batch_size].to(dev)  # (B, L, D)
        _, partials = head_outputs(layer, x, position_embeddings)  # (H, B, L, D)
        for g, heads in enumerate(groups):
            z = layer.post_attention_layernorm(x + partials[heads].sum(0))  # (B, L, D)
            out = mlp_partials(layer.mlp, z.expand(tp, *z.shape), sizes)  # (R, B, L, D)
            cost[g] += out.float().norm(dim=-1).sum((1, 2)).double().cpu()
    return (cost / (inputs.shape[0] * inputs.shape[1])).numpy()


@torch.no_grad()
def permute_heads_(layer: nn.Module, perm) -> list[int]:
    """Reorder query heads in place (new head j = old head perm[j]); KV heads follow. Returns the KV order."""
    attn = layer.self_attn
    H, KV, hd = attn_shape(attn)
    gq = H // KV
    perm = [int(h) for h in perm]
    kv_perm = [perm[j * gq] // gq for j in range(KV)]
    if sorted(perm) != list(range(H)) or any(perm[j] // gq != kv_perm[j // gq] for j in range(H)):
        raise ValueError(f"{perm} is not a head permutation that keeps query heads with their KV head "
                         f"({H} heads, {KV} KV heads: each aligned run of {gq} must be one KV group)")
    q_idx = (torch.tensor(perm)[:, None] * hd + torch.arange(hd)).flatten()
    kv_idx = (torch.tensor(kv_perm)[:, None] * hd + torch.arange(hd)).flatten()
    for lin, idx in ((attn.q_proj, q_idx), (attn.k_proj, kv_idx), (attn.v_proj, kv_idx)):
        lin.weight.copy_(lin.weight[idx.to(lin.weight.device)])  # indexing copies first: safe in place
        if lin.bias is not None:
            lin.bias.copy_(lin.bias[idx.to(lin.bias.device)])
    attn.o_proj.weight.copy_(attn.o_proj.weight[:, q_idx.to(attn.o_proj.weight.device)])
    return kv_perm


@torch.no_grad()
def group_heads_(layer: nn.Module, inputs: torch.Tensor, position_embeddings, tp: int, batch_size: int = 4,
                 max_rows: int = 256, max_exact: int = MAX_EXACT, seed: int = 0) -> tuple[list[int], dict]:
    """Head grouping of one block, in place: (perm, report) for block input windows inputs (N, L, D)."""
    H, KV, _ = attn_shape(layer.self_attn)
    if tp == 1:
        return list(range(H)), {"method": "trivial", "note": "R = 1: one group"}
    maps = mean_attention_maps(layer, inputs, position_embeddings, batch_size, max_rows)  # (H, rows, L)
    dist = torch.cdist(maps.flatten(1)[None].double(), maps.flatten(1)[None].double())[0].cpu().numpy()
    groups, buckets, method = group_heads(dist, tp, KV, max_exact, seed)
    cost = mlp_norm_costs(layer, inputs, position_embeddings, groups, tp, batch_size)  # (R, R)
    rank_block = [r // max(tp // KV, 1) for r in range(tp)] if tp > KV else [0] * tp
    rank = assign_groups(cost, buckets, rank_block)
    at_rank = {r: g for g, r in enumerate(rank)}
    perm = [h for r in range(tp) for h in groups[at_rank[r]]]
    permute_heads_(layer, perm)
    contiguous = [list(range(r * H // tp, (r + 1) * H // tp)) for r in range(tp)]
    return perm, {
        "method": method,
        "partitions": num_partitions(KV, tp) if tp <= KV else num_partitions(H // KV, tp // KV) ** KV,
        "groups": groups,
        "diversity": diversity(dist, groups),
        "diversity_contiguous": diversity(dist, contiguous),  # the original layout, for comparison
        "mlp_norm": float(sum(cost[g, r] for g, r in enumerate(rank))),
        "mlp_norm_cost": cost.tolist(),
        "map_rows": min(max_rows, inputs.shape[1]),
    }


def num_orderings(heads: int, kv: int, tp: int) -> int:
    """How many distinct GQA-valid head-to-rank orderings there are (module docstring)."""
    if tp <= kv:
        return num_partitions(kv, tp) * math.factorial(tp)
    per = tp // kv
    return math.factorial(kv) * (num_partitions(heads // kv, per) * math.factorial(per)) ** kv


def _ordered_partitions(items: tuple, size: int):
    for p in _partitions(items, size):
        yield from permutations(p)


def orderings(heads: int, kv: int, tp: int):
    """Every distinct GQA-valid ordering as a permutation (heads of rank r at [r H/R, (r+1) H/R), sorted)."""
    gq = heads // kv
    units = [tuple(range(u * gq, (u + 1) * gq)) for u in range(kv)]
    if tp <= kv:
        for p in _ordered_partitions(tuple(range(kv)), kv // tp):
            yield [h for group in p for u in sorted(group) for h in units[u]]
        return
    inner = [list(_ordered_partitions(units[u], heads // tp)) for u in range(kv)]
    for order in permutations(range(kv)):
        for splits in product(*(inner[u] for u in order)):
            yield [h for split in splits for group in split for h in sorted(group)]


def random_ordering(heads: int, kv: int, tp: int, rng: np.random.Generator) -> list[int]:
    """A GQA-valid ordering drawn at random (KV groups shuffled, and query heads inside them when R > KV)."""
    gq, size = heads // kv, heads // tp
    perm = [int(u * gq + h) for u in rng.permutation(kv) for h in (rng.permutation(gq) if tp > kv else range(gq))]
    return [h for r in range(tp) for h in sorted(perm[r * size:(r + 1) * size])]


def canonical(perm, tp: int) -> tuple:
    """The heads each rank holds (order inside a rank dropped): equal for orderings an SPD block cannot tell apart."""
    size = len(perm) // tp
    return tuple(tuple(sorted(perm[r * size:(r + 1) * size])) for r in range(tp))
