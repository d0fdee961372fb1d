"""The Ops of overlap.ops, torch.compile'd, and on CUDA the Triton decode attention (overlap.decode_attention)."""

from __future__ import annotations

import functools

import torch

from overlap.decode_attention import decode_attention_rope
from overlap.ops import Ops, add, add_rms_norm, decode_attention, rms_norm, rope_, swiglu

_FUSED: dict[bool, Ops] = {}


def fused_ops(pdl: bool = False) -> Ops:
    """EAGER_OPS, each torch.compile'd once (lazily; shared by every model): one generated kernel per step
    instead of 2-4 (roll/mul/addcmul; add, norm; silu, mul), so the same arithmetic with fewer launches and
    memory passes (inductor may keep an intermediate in fp32 instead of rounding it to bf16); its RMSNorm
    spreads a decode row over more threads than ATen's one-block-a-row kernel (10 us for 1 x 8192). On CUDA a
    decode step's RoPE, cache write and attention run as one Triton pass (overlap.decode_attention).
    pdl: inductor's kernels and the decode attention launch with programmatic dependent launch (each waits
    for the previous kernel inside, after its launch; inductor's triton.enable_pdl)."""
    if pdl not in _FUSED:
        import torch._dynamo.config as dynamo_config

        # One specialisation per (shape, dtype): prefill lengths, ISO pieces, decode batches of one job.
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)

        fns = (rope_, add_rms_norm, swiglu, rms_norm, decode_attention, add)
        options = {"triton.enable_pdl": True} if pdl else None
        *steps, compiled_add = (torch.compile(f, fullgraph=True, dynamic=False, options=options) for f in fns)
        heads = functools.partial(decode_attention_rope, pdl=True) if pdl else decode_attention_rope
        _FUSED[pdl] = Ops(*steps, decode_heads=heads, add=compiled_add)
    return _FUSED[pdl]
