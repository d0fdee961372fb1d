"""Real tensor parallelism (gloo ranks on CPU) against the single-device SPD emulation (spd.surgery.apply_plan_).

Cases: R=2 with 8 heads / 4 KV heads; R=3 with 9 heads / 3 KV heads (one KV head per rank, uneven FFN
slices 58/57/57); R=4 with 8 heads / 2 KV heads (each KV head replicated on two ranks). Plans: baseline,
some SPD blocks, every block SPD (the last one included). Each case spawns its ranks once; the tests
read what they returned. transformers is imported lazily: spawned ranks import this module, and
they need only torch and overlap/ (the parent hands them the unsharded model).
"""

import copy
import dataclasses

import pytest
import torch

from overlap.launch import spawn_ranks
from overlap.model import ModelArgs, Transformer
from overlap.ops import norm_linear, swiglu
from overlap.runtime import Runtime
from overlap.tp import build_sharded, layout_of, set_plan_, shard_
from spd.plan import SPDPlan
from spd.surgery import apply_plan_

TP_FP32_ATOL = 1e-4  # fp32; gloo sums the R partials in another order than the emulation's stack().sum(0)
RANKS_TIMEOUT_S = 150  # whole group, spawn and imports included (R processes share 2 CPU cores in CI)
WEIGHT_STD = 0.2  # larger than LLaMA's init so that dropping a sync visibly changes the logits
LAYERS, SPLIT, PROMPT, NEW_TOKENS = 3, 7, 6, 8

CASES = {
    "r2_gqa": dict(tp=2, heads=8, kv=4, hidden=64, ffn=172),
    "r3_kv1": dict(tp=3, heads=9, kv=3, hidden=72, ffn=172),
    "r4_kv_replicated": dict(tp=4, heads=8, kv=2, hidden=64, ffn=172),
}
PLANS = {"base": [], "spd_some": [1], "spd_all": list(range(LAYERS))}


def make_hf(heads, kv, hidden, ffn, seed=0, vocab=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=LAYERS, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, WEIGHT_STD)
    return model


@torch.no_grad()
def greedy_reference(model, prompt, n) -> torch.Tensor:
    """Greedy decoding by a full forward over the whole sequence at every step (slow, obviously right)."""
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    return seq


def rank_worker(ctx, full: Transformer, ids: torch.Tensor):
    model = shard_(full, ctx)
    rt = Runtime(model, ctx, max_batch=ids.shape[0], max_seq=32)
    out = {"rank": ctx.rank, "shapes": {n: tuple(p.shape) for n, p in model.layers[0].named_parameters()}}
    for name, blocks in PLANS.items():
        set_plan_(model, SPDPlan.zero_shot(ctx.world_size, LAYERS, blocks))
        rt.invalidate()
        c0 = model.sync_calls
        full = rt.prefill(ids)  # (B, S, V)
        c1 = model.sync_calls
        rt.reset()
        chunks = torch.cat([rt.prefill(ids[:, :SPLIT]), rt.prefill(ids[:, SPLIT:], start=SPLIT)], dim=1)
        rt.reset()
        rt.prefill(ids[:, :SPLIT])
        c2 = model.sync_calls
        decode = torch.cat([rt.decode_one(ids[:, i : i + 1]).clone() for i in range(SPLIT, ids.shape[1])], dim=1)
        c3 = model.sync_calls
        gen = rt.generate(ids[:, :PROMPT], NEW_TOKENS)
        out[name] = dict(full=full, chunks=chunks, decode=decode, gen=gen, prefill_syncs=c1 - c0,
                         decode_syncs=(c3 - c2) / (ids.shape[1] - SPLIT))
    # decode again with each norm fused into the GEMV after it (Ops.norm_linear), then with wqkv's and w13's
    # GEMVs through Ops.gemv, w13 + SwiGLU through Ops.swiglu_gemv, wo's and w2's through Ops.gemv_down: their
    # plain-torch forms here (the Triton kernel's parity is
    # tests/test_kernels_norm_gemv.py), the same sharded arithmetic
    base_ops = model.layers[0].ops
    swiglu_linear = lambda x, w: swiglu(torch.nn.functional.linear(x, w), w.shape[0] // 2)  # noqa: E731

    def linear_residual(x, w, residual=None):  # Ops.gemv_down: an addend (SPD's rank-local a) after the GEMV
        y = torch.nn.functional.linear(x, w)
        return y if residual is None else y + residual

    for use, fn in (("norm_linear", norm_linear), ("gemv", torch.nn.functional.linear),
                    ("swiglu_gemv", swiglu_linear), ("gemv_down", linear_residual)):
        calls = []

        def counted(*a, fn=fn, calls=calls, **kw):
            calls.append(kw.get("residual") is not None)
            return fn(*a, **kw)

        ops = dataclasses.replace(base_ops, **{use: counted})
        for m in model.modules():
            if hasattr(m, "ops"):
                m.ops = ops
        for name, blocks in PLANS.items():
            set_plan_(model, SPDPlan.zero_shot(ctx.world_size, LAYERS, blocks))
            rt.invalidate()
            rt.reset()
            rt.prefill(ids[:, :SPLIT])  # 14 rows: through it too
            out[name][f"decode_{use}"] = torch.cat(
                [rt.decode_one(ids[:, i : i + 1]).clone() for i in range(SPLIT, ids.shape[1])], dim=1)
        out[f"{use}_calls"], out[f"{use}_addends"] = len(calls), sum(calls)
    random = build_sharded(model.args, ctx, dtype=torch.float32)
    out["random_shapes"] = {n: tuple(p.shape) for n, p in random.layers[0].named_parameters()}
    return out


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    spec = dict(CASES[request.param])
    tp = spec.pop("tp")
    hf = make_hf(**spec)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))  # batch 2: not only row 0
    results = spawn_ranks(rank_worker, tp, tmp_path_factory.mktemp(request.param),
                          args=(Transformer.from_hf(hf), ids), timeout_s=RANKS_TIMEOUT_S)
    refs = {}
    with torch.no_grad():
        for name, blocks in PLANS.items():
            emu = apply_plan_(copy.deepcopy(hf), SPDPlan.zero_shot(tp, LAYERS, blocks))
            refs[name] = dict(logits=emu(ids).logits, gen=greedy_reference(emu, ids[:, :PROMPT], NEW_TOKENS))
    return dict(tp=tp, hf=hf, ids=ids, results=results, refs=refs)


def _maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("plan", PLANS)
def test_prefill_logits_equal_emulation_on_every_rank(case, plan):
    ref = case["refs"][plan]["logits"]
    for res in case["results"]:
        assert _maxdiff(res[plan]["full"], ref) <= TP_FP32_ATOL, f"rank {res['rank']}"


def test_spd_changes_the_logits(case):
    """Guards the parity tests against vacuity: SPD's approximation is visible at these weights."""
    refs = case["refs"]
    assert _maxdiff(refs["spd_all"]["logits"], refs["base"]["logits"]) > 100 * TP_FP32_ATOL
    assert _maxdiff(refs["base"]["logits"], case["hf"](case["ids"]).logits) <= TP_FP32_ATOL


@pytest.mark.parametrize("plan", PLANS)
def test_all_reduces_per_forward_are_2L_minus_spd_blocks(case, plan):
    expected = 2 * LAYERS - len(PLANS[plan])
    for res in case["results"]:
        assert res[plan]["prefill_syncs"] == expected
        assert res[plan]["decode_syncs"] == expected


@pytest.mark.parametrize("plan", PLANS)
def test_two_chunk_prefill_and_decode_equal_full_forward(case, plan):
    ref = case["refs"][plan]["logits"]
    res = case["results"][0][plan]
    assert _maxdiff(res["chunks"], ref) <= TP_FP32_ATOL
    assert _maxdiff(res["decode"], ref[:, SPLIT:]) <= TP_FP32_ATOL


@pytest.mark.parametrize("plan", PLANS)
def test_decode_with_norm_fused_into_the_gemv_equals_emulation(case, plan):
    ref = case["refs"][plan]["logits"]
    for res in case["results"]:
        assert _maxdiff(res[plan]["decode_norm_linear"], ref[:, SPLIT:]) <= TP_FP32_ATOL, f"rank {res['rank']}"
        assert _maxdiff(res[plan]["decode_gemv"], ref[:, SPLIT:]) <= TP_FP32_ATOL, f"rank {res['rank']}"
        assert _maxdiff(res[plan]["decode_swiglu_gemv"], ref[:, SPLIT:]) <= TP_FP32_ATOL, f"rank {res['rank']}"
        assert _maxdiff(res[plan]["decode_gemv_down"], ref[:, SPLIT:]) <= TP_FP32_ATOL, f"rank {res['rank']}"
        # not vacuous: every forward (the 14-row prefill and each decode step) ran it twice a block
        assert res["norm_linear_calls"] == len(PLANS) * (1 + case["ids"].shape[1] - SPLIT) * 2 * LAYERS
        assert res["gemv_calls"] == res["norm_linear_calls"]  # the same two GEMVs a block and step
        assert 2 * res["swiglu_gemv_calls"] == res["norm_linear_calls"]  # w13 alone
        assert res["gemv_down_calls"] == res["norm_linear_calls"]  # wo and w2
        # the syncs sum across ranks, so the residual is added after them, never in a GEMV's epilogue (where the
        # all-reduce's bf16 hops would round it): only SPD blocks' w2 takes an addend, their rank-local a
        spd_forwards = sum(len(blocks) for blocks in PLANS.values()) * (1 + case["ids"].shape[1] - SPLIT)
        assert res["gemv_down_addends"] == spd_forwards, f"rank {res['rank']}"


@pytest.mark.parametrize("plan", PLANS)
def test_greedy_generation_equals_emulation(case, plan):
    for res in case["results"]:
        assert torch.equal(res[plan]["gen"], case["refs"][plan]["gen"]), f"rank {res['rank']}"


def test_each_rank_holds_its_layout_slice(case):
    tp, cfg = case["tp"], case["hf"].config
    layout = layout_of(ModelArgs.from_hf_config(cfg), tp)
    Dh, D = layout.head_dim, cfg.hidden_size
    for res in case["results"]:
        r, shapes = res["rank"], res["shapes"]
        ffn = layout.ffn_sizes()[r]
        qkv_rows = (len(layout.q_heads(r)) + 2 * len(layout.kv_heads(r))) * Dh
        assert shapes["attn.wqkv.weight"] == (qkv_rows, D)
        assert shapes["attn.wo.weight"] == (D, len(layout.q_heads(r)) * Dh)
        assert shapes["mlp.w13.weight"] == (2 * ffn, D)
        assert shapes["mlp.w2.weight"] == (D, ffn)
        assert res["random_shapes"] == shapes  # built sharded on meta: the same local shapes
