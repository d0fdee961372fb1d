"""SPD block emulation against the original model and a naive per-rank reference."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from spd.block import SPDDecoderLayer, decoder_layers
from spd.errors import ParallelConfigError, PlanError
from spd.plan import SPDPlan
from spd.surgery import apply_plan_, remove_spd_, spd_blocks

EXACT_FP32 = 1e-5  # reassociating sums of O(1) fp32 values; the bound for R = 1
NAIVE_FP32 = 1e-4  # a different summation order over R ranks and a manual softmax


def tiny(heads=8, kv=4, layers=3, hidden=64, ffn=172, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=97, max_position_embeddings=128, attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():  # larger weights than the default init, so that SPD's change shows
        p.data.normal_(0, 0.2)
    return model


def tokens(b=2, s=11, v=97, seed=1):
    return torch.randint(0, v, (b, s), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_tp1_equals_original():
    model, ids = tiny(), tokens()
    ref = model(ids).logits
    apply_plan_(model, SPDPlan.zero_shot(1, 3, [0, 1, 2]))
    assert (model(ids).logits - ref).abs().max() <= EXACT_FP32


@torch.no_grad()
def test_empty_plan_equals_original_and_remove_restores():
    model, ids = tiny(), tokens()
    ref = model(ids).logits
    keys = list(model.state_dict())
    apply_plan_(model, SPDPlan(tp=2, num_layers=3))
    assert torch.equal(model(ids).logits, ref)
    apply_plan_(model, SPDPlan.zero_shot(2, 3, [1, 2]))
    assert spd_blocks(model) == [1, 2]
    assert list(model.state_dict()) == keys  # same parameter names: export and load stay stock
    assert not torch.allclose(model(ids).logits, ref)
    remove_spd_(model)
    assert spd_blocks(model) == []
    assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("tp", [2, 4, 8])
@torch.no_grad()
def test_partials_sum_to_attention_output(tp):
    model, ids = tiny(), tokens()
    layer = decoder_layers(model)[0]
    x = model.model.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    kwargs = dict(position_embeddings=model.model.rotary_emb(x, pos), attention_mask=None)
    full, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)
    spd = SPDDecoderLayer(layer, tp)
    partials = spd.attention_partials(x, **kwargs)
    assert partials.shape == (tp, *full.shape)
    torch.testing.assert_close(partials.sum(0), full, atol=EXACT_FP32, rtol=0)


@torch.no_grad()
def test_spd_block_leaves_earlier_hidden_states_alone():
    model, ids = tiny(layers=4), tokens()
    ref = model(ids, output_hidden_states=True).hidden_states
    apply_plan_(model, SPDPlan.zero_shot(4, 4, [2]))
    got = model(ids, output_hidden_states=True).hidden_states
    for i in range(3):  # embeddings and the outputs of blocks 0 and 1
        assert torch.equal(got[i], ref[i])
    assert not torch.allclose(got[3], ref[3], atol=1e-3)


def naive_forward(model, ids, tp, spd):
    """Every rank computed separately with its own heads, KV heads and FFN rows; sums as all-reduces."""
    cfg = model.config
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    hd, group = D // H, H // KV
    F = cfg.intermediate_size
    rows = torch.arange(F).tensor_split(tp)
    x = model.model.embed_tokens(ids)
    B, S, _ = x.shape
    cos, sin = model.model.rotary_emb(x, torch.arange(S)[None])
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    for i, layer in enumerate(model.model.layers):
        at, mlp = layer.self_attn, layer.mlp
        hn = layer.input_layernorm(x)
        partials = []
        for r in range(tp):
            heads = range(r * H // tp, (r + 1) * H // tp)
            out = []
            for h in heads:
                kvh = h // group  # the KV head this query head reads (replicated when tp > KV)
                q = hn @ at.q_proj.weight[h * hd:(h + 1) * hd].T
                k = hn @ at.k_proj.weight[kvh * hd:(kvh + 1) * hd].T
                v = hn @ at.v_proj.weight[kvh * hd:(kvh + 1) * hd].T
                q, k = apply_rotary_pos_emb(q[:, None], k[:, None], cos, sin)
                scores = (q[:, 0] @ k[:, 0].transpose(-1, -2)) / hd**0.5
                out.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v)
            cols = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])
            partials.append(torch.cat(out, -1) @ at.o_proj.weight[:, cols].T)

        def shard(z, r):
            g = z @ mlp.gate_proj.weight[rows[r]].T
            u = z @ mlp.up_proj.weight[rows[r]].T
            return (torch.nn.functional.silu(g) * u) @ mlp.down_proj.weight[:, rows[r]].T

        if i in spd:
            x = x + sum(a + shard(layer.post_attention_layernorm(x + a), r) for r, a in enumerate(partials))
        else:
            h = x + sum(partials)
            z = layer.post_attention_layernorm(h)
            x = h + sum(shard(z, r) for r in range(tp))
    return model.lm_head(model.model.norm(x))


@pytest.mark.parametrize("tp,heads,kv,blocks", [(2, 8, 4, [1, 2]), (4, 8, 2, [0, 2]), (8, 8, 4, [0, 1, 2]),
                                                 (3, 9, 3, [2]), (9, 9, 3, [0, 1, 2])])
@torch.no_grad()
def test_emulation_equals_naive_per_rank_loop(tp, heads, kv, blocks):
    model, ids = tiny(heads=heads, kv=kv, hidden=heads * 8), tokens()
    ref = naive_forward(model, ids, tp, set(blocks))
    apply_plan_(model, SPDPlan.zero_shot(tp, 3, blocks))
    torch.testing.assert_close(model(ids).logits, ref, atol=NAIVE_FP32, rtol=0)


@torch.no_grad()
def test_generate_works_on_spd_model():
    model = tiny()
    apply_plan_(model, SPDPlan.zero_shot(2, 3, [0, 1, 2]))
    ids = tokens(b=1, s=4)
    model.generation_config.eos_token_id = None  # no early stop: compare all six steps
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    for _ in range(6):  # the KV-cached generate equals greedy decoding by full recomputation
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ids)


def test_bad_plans_fail_clearly():
    model = tiny(heads=9, kv=3, hidden=72)
    with pytest.raises(ParallelConfigError, match="valid degrees: 1, 3, 9"):
        apply_plan_(model, SPDPlan.zero_shot(4, 3, [0]))
    with pytest.raises(PlanError, match="has 3"):
        apply_plan_(model, SPDPlan.zero_shot(3, 4, [0]))
    with pytest.raises(PlanError, match="blocks 0..2"):
        SPDPlan.zero_shot(3, 3, [3])
    assert spd_blocks(model) == []
