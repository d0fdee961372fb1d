"""Forward work of a LLaMA by arithmetic from its shape, and the throughput a stage achieved.

Per token at sequence length S: a block costs 2 x its weights (q, k, v, o, gate, up, down) plus causal
attention, about 2 x S x (query heads x head dim) averaged over positions; the LM head 2 x hidden x vocab.
Training a block (distillation) costs about 3 x its forward (forward + backward). Stages record seconds,
tokens per second and TFLOP/s from these counts, so a run says how close it came to the hardware.
"""

from __future__ import annotations


def _heads(config) -> tuple[int, int, int]:
    H = config.num_attention_heads
    return H, getattr(config, "num_key_value_heads", None) or H, getattr(config, "head_dim", None) or config.hidden_size // H


def block_weights(config) -> int:
    """Weights of one decoder block's matrices: q and o (D x H hd), k and v (D x KV hd), gate, up, down (D x F)."""
    D, F = config.hidden_size, config.intermediate_size
    H, kv, hd = _heads(config)
    return D * (H * hd) * 2 + D * (kv * hd) * 2 + 3 * D * F


def block_flops_per_token(config, seq_len: int) -> float:
    """Forward FLOPs of one decoder block per token (see the module docstring)."""
    H, _, hd = _heads(config)
    return 2.0 * block_weights(config) + 2.0 * seq_len * H * hd


def model_flops_per_token(config, seq_len: int) -> float:
    """Forward FLOPs of the whole model (every block and the LM head) per token."""
    return config.num_hidden_layers * block_flops_per_token(config, seq_len) + 2.0 * config.hidden_size * config.vocab_size


def throughput(tokens: float, flops: float, seconds: float) -> dict:
    """{"seconds", "tokens_per_s", "tflop_per_s"} of a stage that processed `tokens` doing `flops` of work."""
    return {"seconds": seconds, "tokens_per_s": tokens / seconds if seconds else None,
            "tflop_per_s": flops / seconds / 1e12 if seconds else None}
