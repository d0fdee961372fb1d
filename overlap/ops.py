"""The steps between a block's weight GEMMs, in plain torch: RoPE, residual add + RMSNorm, SwiGLU, RMSNorm, decode
attention, and a norm with the GEMV after it; bundled as Ops so a model can swap in fused versions (overlap.fused_ops) with the same arithmetic.
These are the references every fused kernel is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def rope_(qk: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate halves of q and k at once: qk (B, S, H+KV, Dh), cos/sin_signed (S, 1, Dh) -> same shape.

    transformers computes x*cos + rotate_half(x)*sin with rotate_half(x) = [-x2, x1]. Since sin's two
    halves are equal, rotate_half(x)*sin == roll(x, Dh/2) * [-sin1, sin2] exactly, so three kernels do
    it (roll, mul, addcmul) instead of five per tensor.
    """
    return torch.addcmul(qk * cos, qk.roll(qk.shape[-1] // 2, dims=-1), sin_signed)


def add_rms_norm(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float):
    """(h, rms_norm(h)) for h = x + a: a residual add and the norm after it (B, S, D) each."""
    h = x + a
    return h, F.rms_norm(h, weight.shape, weight, eps)


def add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y: a residual add on its own (compiled with the fused ops, so that PDL takes it in)."""
    return x + y


def swiglu(gate_up: torch.Tensor, ffn_dim: int) -> torch.Tensor:
    """silu(gate) * up of the fused [gate; up] projection (..., 2 F/R) -> (..., F/R)."""
    gate, up = gate_up.split(ffn_dim, dim=-1)
    return F.silu(gate) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32 statistics (one kernel; ATen's takes one thread block a row)."""
    return F.rms_norm(x, weight.shape, weight, eps)


def norm_linear(x: torch.Tensor, w: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                gated: bool = False) -> torch.Tensor:
    """act(rms_norm(x) @ w.T) for x (M, K), w (N, K): a block's norm (none when norm_weight is None) and the
    GEMV after it, then SwiGLU of w's [gate; up] rows when gated ((M, N/2)); the steps Ops.norm_linear fuses
    (overlap.kernels.norm_gemv)."""
    y = F.linear(x if norm_weight is None else rms_norm(x, norm_weight, eps), w)
    return swiglu(y, w.shape[0] // 2) if gated else y


def decode_mask(input_pos: torch.Tensor, kv_len: int, dtype) -> torch.Tensor:
    """Additive (S, kv_len) mask: 0 where cache position j <= input_pos[i], -inf after it."""
    allowed = torch.arange(kv_len, device=input_pos.device)[None, :] <= input_pos[:, None]  # (S, L)
    return torch.zeros(allowed.shape, dtype=dtype, device=input_pos.device).masked_fill_(~allowed, float("-inf"))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query a sequence: q (B, Hq, 1, Dh), k/v (B, Hkv, L, Dh), additive mask (1, L) -> (B, Hq, 1, Dh).

    The query heads of a KV head are folded into rows, so K/V are never repeated: two batched GEMMs and a
    softmax (fp32 accumulation inside, like transformers' eager path). Fused (Ops.decode_attention), the
    mask add and the softmax become one kernel between the two GEMMs.
    """
    B, Hq, _, Dh = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    qg = q.reshape(B * Hkv, Hq // Hkv, Dh)  # (B*KV, G, Dh): row g is query head kv*G + g
    scores = torch.baddbmm(mask, qg, k.reshape(B * Hkv, L, Dh).transpose(1, 2), alpha=Dh**-0.5)  # (B*KV, G, L)
    probs = torch.softmax(scores, dim=-1)
    return torch.bmm(probs, v.reshape(B * Hkv, L, Dh)).view(B, Hq, 1, Dh)


@dataclass(frozen=True)
class Ops:
    """The steps between a block's weight GEMMs: RoPE, residual add + RMSNorm, SwiGLU, RMSNorm, decode attention;
    and optionally each decode GEMV through a Triton kernel."""

    rope: object
    add_norm: object
    swiglu: object
    norm: object
    decode_attention: object
    decode_heads: object = None  # RoPE + cache write + decode attention in one pass (where supports() holds)
    # norm_linear(x (M, K), w, norm_weight, eps, gated) for rows M <= 16 (the function above): a block's norm +
    # wqkv and norm + w13 + SwiGLU as one kernel each (overlap.kernels.norm_gemv); None: the separate steps
    norm_linear: object = None
    norm_linear_rows: int = 16  # the most decode rows a block runs through norm_linear (stream_gemv's: 1)
    # gemv(x (M, K), w) for rows M <= 16: wqkv's and w13's decode GEMVs (overlap.kernels.norm_gemv without a norm,
    # faster than cuBLAS at those skinny shapes); None: nn.Linear (cuBLAS)
    gemv: object = None
    # swiglu_gemv(x (M, K), w13) for rows M <= 16: w13's GEMV with SwiGLU in its epilogue, (M, F) (overlap.kernels.
    # norm_gemv with swiglu); None: the GEMV, then swiglu
    swiglu_gemv: object = None
    # gemv_down(x (M, K), w, residual=None) for rows M <= 16: wo's and w2's decode GEMVs through the same kernel
    # (with PDL: every GEMV of the step takes part in programmatic dependent launch, which cuBLAS does not), the
    # residual (M, N) added in its epilogue; None: nn.Linear (cuBLAS's addmm with a residual)
    gemv_down: object = None
    add: object = add  # the residual adds outside add_norm (compiled with the fused ops: PDL takes them in)
    # at 2 to 16 decode rows where a block's first sync does not sum: wo's gemv_down also returns mlp_norm's input
    # times its weight and statistics (out_norm), which w13's swiglu_gemv scales by (row_ss): no norm kernel
    mlp_norm_in_wo: bool = False


EAGER_OPS = Ops(rope_, add_rms_norm, swiglu, rms_norm, decode_attention)  # plain torch: the reference, CPU's
