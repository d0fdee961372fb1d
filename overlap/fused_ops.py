"""The Ops of overlap.ops, torch.compile'd, and on CUDA the Triton decode attention (overlap.decode_attention)."""

from __future__ import annotations

import torch

from overlap.decode_attention import decode_attention_rope
from overlap.ops import Ops, add_rms_norm, decode_attention, rms_norm, rope_, swiglu

_FUSED: list[Ops] = []


def fused_ops() -> Ops:
    """EAGER_OPS, each torch.compile'd once (lazily; shared by every model): one generated kernel per step
    instead of 2-4 (roll/mul/addcmul; add, norm; silu, mul), so the same arithmetic with fewer launches and
    memory passes (inductor may keep an intermediate in fp32 instead of rounding it to bf16); its RMSNorm
    spreads a decode row over more threads than ATen's one-block-a-row kernel (10 us for 1 x 8192). On CUDA a
    decode step's RoPE, cache write and attention run as one Triton pass (overlap.decode_attention)."""
    if not _FUSED:
        import torch._dynamo.config as dynamo_config

        # One specialisation per (shape, dtype): prefill lengths, ISO pieces, decode batches of one job.
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)

        fns = (rope_, add_rms_norm, swiglu, rms_norm, decode_attention)
        _FUSED.append(Ops(*(torch.compile(f, fullgraph=True, dynamic=False) for f in fns),
                          decode_heads=decode_attention_rope))
    return _FUSED[0]
