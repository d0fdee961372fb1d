"""Head grouping: permutations keep the model, the partition search is optimal, GQA groups stay whole."""

import itertools
import math

import numpy as np
import pytest
import torch

from spd.activations import capture_hidden_states
from spd.block import decoder_layers
from spd.heads import (_partitions, assign_groups, diversity, exact_partition, group_heads, group_heads_, head_outputs,
                       local_search_partition, num_partitions, partition, permute_heads_)
from spd.plan import SPDPlan
from spd.surgery import apply_plan_
from test_block import EXACT_FP32, tiny, tokens


def gqa_perm(heads, kv, seed):
    """A random permutation that keeps each query head with its KV head (KV groups and heads inside)."""
    g, rng = heads // kv, np.random.default_rng(seed)
    return [int(u * g + h) for u in rng.permutation(kv) for h in rng.permutation(g)]


@pytest.mark.parametrize("heads,kv", [(8, 4), (8, 2), (9, 3)])
@torch.no_grad()
def test_head_permutation_keeps_logits(heads, kv):
    model, ids = tiny(heads=heads, kv=kv, hidden=heads * 8), tokens()
    ref = model(ids).logits
    for i, layer in enumerate(decoder_layers(model)):
        permute_heads_(layer, gqa_perm(heads, kv, i))
    assert (model(ids).logits - ref).abs().max() <= EXACT_FP32  # non-SPD model: any R
    apply_plan_(model, SPDPlan.zero_shot(1, 3, [0, 1, 2]))
    assert (model(ids).logits - ref).abs().max() <= EXACT_FP32  # SPD at R = 1 is the original block


def test_permutation_splitting_a_kv_group_is_refused():
    layer = decoder_layers(tiny(heads=8, kv=4))[0]
    with pytest.raises(ValueError, match="KV head"):
        permute_heads_(layer, [0, 2, 1, 3, 4, 5, 6, 7])


@torch.no_grad()
def test_head_outputs_are_the_attention():
    model, ids = tiny(), tokens()
    layer, x = decoder_layers(model)[0], model.model.embed_tokens(ids)
    pe = model.model.rotary_emb(x, torch.arange(ids.shape[1])[None])
    probs, partials = head_outputs(layer, x, pe)
    L = ids.shape[1]
    causal = torch.zeros(L, L).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))[None, None]
    full, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=pe, attention_mask=causal)
    torch.testing.assert_close(partials.sum(0), full, atol=EXACT_FP32, rtol=0)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]))
    assert probs.triu(1).abs().max() == 0  # causal


def brute_force(dist, k):
    """max diversity over every labelling with equal group sizes."""
    n, best = len(dist), -math.inf
    for labels in itertools.product(range(k), repeat=n):
        if all(labels.count(g) == n // k for g in range(k)):
            groups = [[i for i in range(n) if labels[i] == g] for g in range(k)]
            best = max(best, diversity(dist, groups))
    return best


def random_dist(n, seed):
    pts = np.random.default_rng(seed).normal(size=(n, 3))
    return np.linalg.norm(pts[:, None] - pts[None], axis=-1)


def test_exact_partition_is_the_optimum():
    line = np.array([0.0, 1.0, 2.0, 10.0, 11.0, 12.0])  # hand-made: the far points must be split up
    dist = np.abs(line[:, None] - line[None])
    groups = exact_partition(dist, 2)
    assert diversity(dist, groups) == pytest.approx(brute_force(dist, 2))
    assert all(len({i < 3 for i in g}) == 2 for g in groups)  # each group mixes near and far points
    for n, k, seed in [(8, 2, 0), (9, 3, 1), (8, 4, 2)]:
        dist = random_dist(n, seed)
        assert diversity(dist, exact_partition(dist, k)) == pytest.approx(brute_force(dist, k))


@pytest.mark.parametrize("n,k", [(6, 2), (6, 3), (8, 2), (8, 4), (9, 3), (12, 3), (12, 4)])
def test_partition_counts_and_local_search(n, k):
    assert num_partitions(n, k) == sum(1 for _ in _partitions(tuple(range(n)), n // k))
    for seed in range(5):  # on these sizes the local search reaches the exact optimum
        dist = random_dist(n, 100 * n + 10 * k + seed)
        best = diversity(dist, exact_partition(dist, k))
        found = local_search_partition(dist, k, seed=seed)
        assert sorted(i for g in found for i in g) == list(range(n)) and all(len(g) == n // k for g in found)
        assert diversity(dist, found) == pytest.approx(best, rel=1e-9)


def test_partition_picks_the_local_search_only_when_large():
    assert partition(random_dist(12, 0), 4, max_exact=10**5)[1] == "exact"
    assert partition(random_dist(12, 0), 4, max_exact=100)[1] == "local_search"
    assert partition(random_dist(4, 0), 4)[1] == "trivial"


@pytest.mark.parametrize("heads,kv,tp", [(8, 4, 2), (8, 4, 4), (8, 2, 4), (8, 2, 8), (16, 8, 4)])
def test_groups_keep_kv_heads_and_form_a_valid_permutation(heads, kv, tp):
    dist = random_dist(heads, 3)
    groups, buckets, _ = group_heads(dist, tp, kv)
    g = heads // kv
    assert len(groups) == tp and all(len(x) == heads // tp for x in groups)
    for grp in groups:
        if tp <= kv:  # whole KV groups
            assert {h // g for h in grp} and all(h // g * g + j in grp for h in grp for j in range(g))
        else:  # inside one replicated KV head's ranks
            assert len({h // g for h in grp}) == 1
    rank_block = [r // (tp // kv) for r in range(tp)] if tp > kv else [0] * tp
    cost = np.random.default_rng(0).random((tp, tp))
    rank = assign_groups(cost, buckets, rank_block)
    at = {r: i for i, r in enumerate(rank)}
    perm = [h for r in range(tp) for h in groups[at[r]]]
    permute_heads_(decoder_layers(tiny(heads=heads, kv=kv, hidden=heads * 8, layers=1))[0], perm)  # no raise


def test_assignment_is_optimal_under_kv_buckets():
    rng = np.random.default_rng(1)
    for group_bucket, rank_bucket in [([0, 0, 0, 0], [0, 0, 0, 0]), ([0, 0, 1, 1], [0, 0, 1, 1]),
                                      ([1, 0, 1, 0, 2, 2], [0, 0, 1, 1, 2, 2])]:
        n = len(group_bucket)
        cost = rng.random((n, n))
        rank = assign_groups(cost, group_bucket, rank_bucket)
        best = max(sum(cost[g, p[g]] for g in range(n)) for p in itertools.permutations(range(n))
                   if len({(group_bucket[g], rank_bucket[p[g]]) for g in range(n)}) == len(set(group_bucket)))
        assert sorted(rank) == list(range(n))
        assert sum(cost[g, rank[g]] for g in range(n)) == pytest.approx(best)


@pytest.mark.parametrize("tp", [2, 8])
@torch.no_grad()
def test_group_heads_in_place_keeps_the_block(tp):
    model = tiny(heads=8, kv=4, layers=2)
    ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    store = capture_hidden_states(model, ids, [1], batch_size=2, progress=False)
    X, Y = store.get(1), store.get(2)
    layer = decoder_layers(model)[1]
    perm, report = group_heads_(layer, X, store.kwargs["position_embeddings"], tp, batch_size=2)
    assert sorted(perm) == list(range(8)) and report["method"] in ("exact", "trivial")
    assert report["diversity"] >= report["diversity_contiguous"] - 1e-9  # the contiguous layout is a candidate
    out = layer(X, **store.block_kwargs())
    assert (out - Y).abs().max() <= EXACT_FP32  # the full (non-SPD) block is unchanged by the permutation


@pytest.mark.parametrize("heads,kv,tp", [(9, 3, 3), (8, 4, 2), (8, 4, 4), (8, 2, 4), (9, 3, 9)])
def test_orderings_are_every_distinct_valid_head_to_rank_choice(heads, kv, tp):
    from spd.heads import canonical, num_orderings, orderings, random_ordering

    found = list(orderings(heads, kv, tp))
    assert len(found) == len({canonical(p, tp) for p in found}) == num_orderings(heads, kv, tp)
    assert list(range(heads)) in found  # the identity is one of them
    layer = decoder_layers(tiny(heads=heads, kv=kv, hidden=heads * 8, layers=1))[0]
    for p in found[:50]:
        permute_heads_(layer, p)  # each keeps query heads with their KV head (no raise)
    rng = np.random.default_rng(0)
    assert all(canonical(random_ordering(heads, kv, tp, rng), tp) in {canonical(p, tp) for p in found}
               for _ in range(20))
