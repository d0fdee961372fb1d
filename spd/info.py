"""Human-readable summaries of a model: architecture, tensor-parallel degrees, a greedy continuation."""

from __future__ import annotations

import torch

from spd.layout import layout_for, valid_tp_degrees


def param_count(config) -> int:
    """Parameters of a LLaMA with this config (no model needed)."""
    d, f, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    attn = d * hd * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    block = attn + 3 * d * f + 2 * d
    head = 0 if config.tie_word_embeddings else v * d
    return v * d + n * block + d + head


def tp_degrees_text(config) -> str:
    h, kv, f = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    lines = []
    for r in valid_tp_degrees(h, kv):
        notes = [f"{h // r} heads/rank"]
        notes.append(f"KV heads replicated {r // kv}x" if r > kv else f"{kv // r} KV heads/rank")
        if f % r:
            notes.append(f"FFN split unevenly ({f // r}..{f // r + 1} rows/rank)")
        lines.append(f"  R = {r}: " + ", ".join(notes))
    return "\n".join(lines)


def describe(config, model: torch.nn.Module | None = None) -> str:
    count = sum(p.numel() for p in model.parameters()) if model is not None else param_count(config)
    return "\n".join([
        f"architecture: {type(model).__name__ if model is not None else 'LlamaForCausalLM'}",
        f"  layers {config.num_hidden_layers}, heads {config.num_attention_heads}, "
        f"KV heads {config.num_key_value_heads}, hidden {config.hidden_size}, FFN {config.intermediate_size}, "
        f"vocab {config.vocab_size}, tied embeddings {bool(config.tie_word_embeddings)}",
        f"  parameters {count:,} ({count / 1e6:.1f} M)",
        "tensor-parallel degrees:",
        tp_degrees_text(config),
    ])


def check_tp(config, tp: int) -> None:
    layout_for(config, tp)  # raises ParallelConfigError listing the valid degrees


@torch.no_grad()
def greedy_text(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)
