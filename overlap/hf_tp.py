"""transformers' own tensor parallelism: the external baseline of spd-bench (variant hf_tp, GPUs only).

The same shape as a LlamaForCausalLM with random weights, sharded by transformers' "auto" TP plan
(DTensor; column-parallel q/k/v and gate/up, row-parallel o and down, so also 2 all-reduces a block),
run eagerly as transformers runs it (DynamicCache, no CUDA graphs), on the same prefill lengths and
decode batches as our runtime. Random weights: from_pretrained with no checkpoint and an empty
state_dict, so every weight is a missing key that transformers initialises on each rank's shard (the
full model is never materialised). The API moved between releases: transformers >= 5.17 takes
distributed_config=DistributedConfig(tp_size, tp_plan), older ones tp_plan="auto"; both are tried.
"""

from __future__ import annotations

import torch

from overlap.context import TPContext
from overlap.model import ModelArgs
from spd.load import torch_dtype

EAGER = dict(variant="hf_tp", spd_blocks=0, cuda_graphs=False, compile=False)  # as transformers runs it


def llama_config(args: ModelArgs):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=args.dim, intermediate_size=args.ffn_dim, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, vocab_size=args.vocab_size,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, max_position_embeddings=32768,
        tie_word_embeddings=args.tie_embeddings,
    )


def load_hf_tp(args: ModelArgs, ctx: TPContext, dtype: torch.dtype):
    """A random-weight LlamaForCausalLM sharded over ctx's ranks by transformers (eval mode)."""
    from transformers import LlamaForCausalLM

    config = llama_config(args)
    attempts = []
    try:
        from transformers import DistributedConfig

        attempts.append(dict(distributed_config=DistributedConfig(tp_size=ctx.world_size, tp_plan="auto")))
    except (ImportError, TypeError):
        pass
    attempts.append(dict(tp_plan="auto"))
    errors = []
    for kw in attempts:
        try:
            model = LlamaForCausalLM.from_pretrained(None, config=config, state_dict={}, dtype=dtype, **kw)
            return model.eval()
        except (TypeError, ValueError, RuntimeError) as e:  # the other API generation
            errors.append(f"{list(kw)}: {type(e).__name__}: {e}")
    raise RuntimeError("transformers' tensor parallelism could not build the model; tried " + " | ".join(errors))


@torch.no_grad()
def run_hf_tp(job: dict, ctx: TPContext, record, measure) -> None:
    """Time transformers' TP on the job's prefill lengths and decode batches; record as variant hf_tp."""

    b = job["bench"]
    args = ModelArgs.from_model_config(job["model"])
    try:
        model = load_hf_tp(args, ctx, torch_dtype(job["model"].get("dtype", "bfloat16")))
    except RuntimeError as e:
        if ctx.is_main:
            print(f"[spd-bench] hf_tp skipped: {e}", flush=True)
        return
    gen = torch.Generator().manual_seed(int(job["model"].get("seed", 0)))
    if "prefill" in b["phases"]:
        for S in b["tokens"]:
            ids = torch.randint(0, args.vocab_size, (1, S), generator=gen).to(ctx.device)  # (1, S)
            times = measure(lambda: model(ids, use_cache=False, logits_to_keep=1), ctx, b["warmup"], b["iters"])
            record(times, phase="prefill", tokens=S, batch=1, context=0, **EAGER)
    if "decode" in b["phases"]:
        context = int(b["context"])
        for B in b["batches"]:
            ids = torch.randint(0, args.vocab_size, (B, context), generator=gen).to(ctx.device)  # (B, context)
            cache = model(ids, use_cache=True, logits_to_keep=1).past_key_values
            tok = ids[:, -1:]  # (B, 1)
            # Each step appends to the DynamicCache: positions context .. context + warmup + iters.
            times = measure(lambda: model(tok, past_key_values=cache, use_cache=True, logits_to_keep=1),
                            ctx, b["warmup"], b["iters"])
            record(times, phase="decode", tokens=1, batch=B, context=context, **EAGER)
            del cache
    del model
    torch.cuda.empty_cache()
