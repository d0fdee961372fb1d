"""overlap.model + overlap.runtime at R = 1 against transformers' LlamaForCausalLM (the slow reference)."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from overlap.context import single
from overlap.model import ModelArgs, Transformer, rope_inv_freq
from overlap.runtime import Runtime
from overlap.tp import layout_of, set_plan_, shard_
from spd.errors import ModelLoadError, ParallelConfigError, PlanError
from spd.plan import SPDPlan

HF_FP32_ATOL = 1e-5  # fp32, same ops; only the fused qkv / gate-up GEMMs and the GQA row folding reorder sums


def tiny_hf(heads=8, kv=4, layers=3, hidden=64, ffn=172, vocab=512, seed=0, **extra) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=256, **extra)
    return LlamaForCausalLM(cfg).eval()


def tokens(b=2, s=24, vocab=512, seed=1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def runtime_of(hf, max_batch=2, max_seq=64) -> Runtime:
    ctx = single()
    return Runtime(shard_(Transformer.from_hf(hf), ctx), ctx, max_batch, max_seq)


CONFIGS = {
    "gqa": dict(heads=8, kv=4),
    "mha": dict(heads=8, kv=8),
    "mqa_tied": dict(heads=4, kv=1, tie_word_embeddings=True),
    "llama3_rope": dict(heads=8, kv=2, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),  # head_dim 8: wavelengths 6, 63, 628, 6283 hit all three branches
}


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_prefill_logits_equal_hf(name):
    hf, ids = tiny_hf(**CONFIGS[name]), tokens()
    ref = hf(ids).logits  # (B, S, V)
    out = runtime_of(hf).prefill(ids)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= HF_FP32_ATOL


def test_rope_inv_freq_equals_hf():
    hf = tiny_hf(**CONFIGS["llama3_rope"])
    args = ModelArgs.from_hf_config(hf.config)
    assert args.rope_scaling["rope_type"] == "llama3"
    assert torch.equal(rope_inv_freq(args), hf.model.rotary_emb.inv_freq)


def test_unsupported_rope_is_refused():
    args = ModelArgs(vocab_size=8, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=8,
                     rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ModelLoadError, match="supported: default, linear, llama3"):
        rope_inv_freq(args)


@pytest.mark.parametrize("split", [1, 9, 23])
def test_two_chunk_prefill_equals_one(split):
    hf, ids = tiny_hf(), tokens()
    rt = runtime_of(hf)
    whole = rt.prefill(ids)
    rt.reset()
    first = rt.prefill(ids[:, :split])
    second = rt.prefill(ids[:, split:], start=split)  # bottom-right aligned mask against chunk 1's cache
    assert rt.pos == ids.shape[1]
    assert (torch.cat([first, second], dim=1) - whole).abs().max() <= HF_FP32_ATOL


@torch.no_grad()
def test_decode_after_prefill_equals_full_forward():
    hf, ids = tiny_hf(), tokens(s=20)
    ref = hf(ids).logits
    rt = runtime_of(hf)
    rt.prefill(ids[:, :12])
    steps = [rt.decode_one(ids[:, i : i + 1]).clone() for i in range(12, 20)]  # (B, 1, V) each
    assert (torch.cat(steps, dim=1) - ref[:, 12:]).abs().max() <= HF_FP32_ATOL


@torch.no_grad()
def test_greedy_generation_equals_hf():
    hf, prompt = tiny_hf(heads=8, kv=2), tokens(s=6)
    hf.generation_config.eos_token_id = None  # random weights: never stop early
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                      pad_token_id=0)
    out = runtime_of(hf).generate(prompt, max_new_tokens=16)
    assert torch.equal(out, ref)


def test_sync_count_and_spd_at_r1_is_the_original():
    """At R = 1 an SPD block is the original block; a forward runs 2L - #SPD sync points."""
    hf, ids = tiny_hf(layers=4), tokens()
    rt = runtime_of(hf)
    base = rt.prefill(ids)
    assert rt.model.sync_calls == 2 * 4
    set_plan_(rt.model, SPDPlan.zero_shot(1, 4, [0, 3]))
    before = rt.model.sync_calls
    spd = rt.prefill(ids)
    assert rt.model.sync_calls - before == 2 * 4 - 2
    assert (spd - base).abs().max() <= HF_FP32_ATOL
    before = rt.model.sync_calls
    rt.decode_one(ids[:, :1])
    assert rt.model.sync_calls - before == 2 * 4 - 2
    blocks = rt.model.layers
    assert [b.block_sync.calls > 0 for b in blocks] == [True, False, False, True]
    assert blocks[1].attn_sync.calls == 3 and blocks[0].attn_sync.calls == 1  # before the plan only


def test_from_args_is_seeded_and_runs():
    args = ModelArgs(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=50, tie_embeddings=True)
    a, b = Transformer.from_args(args, seed=3), Transformer.from_args(args, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.output.weight is a.tok_embeddings.weight
    rt = Runtime(a, single(), 1, 16)
    out = rt.generate(torch.zeros(1, 3, dtype=torch.long), 5)
    assert out.shape == (1, 8)


def test_from_hf_copies_an_spd_emulated_model():
    """SPD emulation keeps parameter names, so from_hf reads an emulated (or exported) model unchanged."""
    from spd.surgery import apply_plan_

    hf = tiny_hf()
    plain = Transformer.from_hf(hf)
    emulated = Transformer.from_hf(apply_plan_(copy.deepcopy(hf), SPDPlan.zero_shot(2, 3, [1])))
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), emulated.parameters()))


def test_user_errors_say_what_is_right():
    hf = tiny_hf()
    rt = runtime_of(hf, max_batch=2, max_seq=16)
    with pytest.raises(ValueError, match="max_seq >= 20"):
        rt.prefill(tokens(s=20))
    with pytest.raises(ValueError, match="max_batch 2"):
        rt.prefill(tokens(b=3, s=4))
    with pytest.raises(PlanError, match="the plan is for 5 blocks but the model has 3"):
        set_plan_(rt.model, SPDPlan(tp=1, num_layers=5))
    with pytest.raises(PlanError, match="tp=2"):
        set_plan_(rt.model, SPDPlan(tp=2, num_layers=3))
    with pytest.raises(ParallelConfigError, match="valid degrees: 1, 2, 4, 8"):
        layout_of(ModelArgs.from_hf_config(hf.config), 3)
    with pytest.raises(RuntimeError, match="setup_caches"):
        Transformer.from_hf(hf)(tokens(), torch.arange(24), kv_len=24, chunk_start=0)
    with pytest.raises(ValueError, match="pdl=True needs the fused kernels with triton_gemv=True"):
        rt.model.set_fused_(on=True, triton_gemv=False, pdl=True)  # cuBLAS GEMVs would break the chain


FUSED_FP32_ATOL = 1e-5  # fp32; inductor's kernels may keep x + a unrounded before the norm and reorder the norm's sum


@torch.no_grad()
def test_fused_elementwise_ops_equal_eager_in_prefill_decode_and_iso():
    """Runtime(fuse=True): RoPE, add + RMSNorm and SwiGLU as torch.compile'd kernels (inductor's CPU code here;
    the GPU test in test_overlap_gpu.py runs its Triton code), SPD and baseline blocks, ISO pieces."""
    from overlap.fused_ops import fused_ops
    from overlap.ops import EAGER_OPS

    hf, ids = tiny_hf(heads=8, kv=2, layers=3), tokens(2, 20)
    ctx = single()
    model = shard_(Transformer.from_hf(hf), ctx, SPDPlan.zero_shot(1, 3, [1]))
    outs = {}
    for fuse in (False, True):
        rt = Runtime(model, ctx, 2, 64, fuse=fuse)
        assert model.fused is fuse and model.layers[0].attn.ops is (fused_ops() if fuse else EAGER_OPS)
        full = rt.prefill(ids)
        rt.reset()
        iso = rt.prefill(ids[:, :16], iso=2)
        dec = torch.cat([rt.decode_one(ids[:, i : i + 1]) for i in range(16, 20)], dim=1)
        outs[fuse] = (full, iso, dec)
    for a, b in zip(outs[False], outs[True]):
        assert (a - b).abs().max() <= FUSED_FP32_ATOL
    assert (outs[True][0] - hf(ids).logits).abs().max() <= 10 * FUSED_FP32_ATOL  # and against transformers
    model.set_fused_(False)
    assert not model.fused


@pytest.mark.parametrize("prefix,S", [(5, 7), (16, 3), (1, 1)])
@torch.no_grad()
def test_attention_after_a_prefix_merges_two_dense_parts(prefix, S):
    """attend_after_prefix (the CUDA path of a later prefill chunk) equals SDPA's bottom-right causal mask."""
    from torch.nn.attention.bias import causal_lower_right

    from overlap.attention import attend_after_prefix, attention_lse

    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 8, S, 16, generator=g)
    k, v = torch.randn(2, 2, prefix + S, 16, generator=g), torch.randn(2, 2, prefix + S, 16, generator=g)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(S, prefix + S),
                                                           enable_gqa=True)
    assert (attend_after_prefix(q, k, v) - ref).abs().max() <= 1e-5
    out, lse = attention_lse(q, k[:, :1].expand(2, 8, -1, -1)[:, :, :S], v[:, :1].expand(2, 8, -1, -1)[:, :, :S], True)
    assert lse.shape == (2, 8, S, 1) and torch.isfinite(lse).all()


@torch.no_grad()
def test_compiled_decode_compiles_one_graph_per_block_kind():
    """Runtime(compile=True): decode through overlap.model.compiled_block (inductor's CPU code here) equals eager,
    and 6 blocks of two kinds (baseline, SPD) cost two graphs, not a trace of the whole step."""
    from torch._dynamo.utils import counters

    hf, ids = tiny_hf(heads=8, kv=2, layers=6), tokens(1, 12)
    ctx = single()
    outs = []
    for compile in (False, True):
        model = shard_(Transformer.from_hf(hf), ctx, SPDPlan.zero_shot(1, 6, [4, 5]))
        rt = Runtime(model, ctx, 1, 32, compile=compile)
        rt.prefill(ids[:, :8])
        before = counters["stats"]["unique_graphs"]
        outs.append(torch.cat([rt.decode_one(ids[:, i : i + 1]) for i in range(8, 12)], dim=1))
        graphs = counters["stats"]["unique_graphs"] - before
    assert (outs[0] - outs[1]).abs().max() <= FUSED_FP32_ATOL
    assert 1 <= graphs <= 2, graphs
