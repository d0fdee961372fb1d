"""Attention paths of the runtime: plain causal prefill, a later prefill chunk after a cached prefix (two dense
calls merged by log-sum-exp), and decode (overlap.ops.decode_attention); each with its reference on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias

from overlap.ops import decode_attention

SPLIT_PREFIX_ON_CUDA = True  # later bf16/fp16 prefill chunks on CUDA: attend_after_prefix, not the masked kernel
HALF = (torch.bfloat16, torch.float16)  # cuDNN attention's dtypes


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool):
    """Attention with its log-sum-exp: q (B, H, S, Dh), k/v (B, H, L, Dh) -> out (B, H, S, Dh), lse (B, H, S, 1).

    causal is top-left aligned (query i sees keys j <= i; S == L here). CUDA bf16/fp16: cuDNN's fused kernel
    (the one SDPA picks for plain causal prefill); otherwise the math, in fp32 (the reference).
    """
    if q.is_cuda and q.dtype in HALF:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal)[:2]
        return out, lse.view(*q.shape[:3], 1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, S, L)
    if causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    lse = scores.logsumexp(-1, keepdim=True)  # (B, H, S, 1)
    return ((scores - lse).exp() @ v.float()).to(q.dtype), lse


def attend_after_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A later prefill chunk: q (B, Hq, S, Dh) at positions [P, P+S), k/v (B, Hkv, P+S, Dh) -> (B, Hq, S, Dh).

    Split at the chunk's start: the prefix keys [0, P) unmasked and the chunk's own keys causally, each a
    dense fused-attention call, merged by their log-sum-exps (softmax over the union of both key sets):
        out = (o1 e^(l1 - m) + o2 e^(l2 - m)) / (e^(l1 - m) + e^(l2 - m)),  m = max(l1, l2).
    The bottom-right-masked kernel SDPA otherwise runs here (FA2) is 2.4x slower per pair than cuDNN's on
    H200 (ISO's later piece, docs/benchmarks/iso.md). K/V heads are repeated for the query heads (GQA).
    """
    S, P = q.shape[2], k.shape[2] - q.shape[2]
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))  # (B, Hq, P+S, Dh)
    o1, l1 = attention_lse(q, k[:, :, :P], v[:, :, :P], causal=False)
    o2, l2 = attention_lse(q, k[:, :, P:], v[:, :, P:], causal=True)
    m = torch.maximum(l1, l2)  # (B, Hq, S, 1) float32
    w1, w2 = (l1 - m).exp(), (l2 - m).exp()
    return ((o1.float() * w1 + o2.float() * w2) / (w1 + w2)).to(q.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Grouped-query attention: q (B, Hq, S, Dh), k/v (B, Hkv, L, Dh) -> (B, Hq, S, Dh).

    mask None: plain causal over a chunk at position 0 (L == S): SDPA's flash kernel, GQA native.
    mask causal_lower_right(S, L): a later prefill chunk at [L-S, L), token i seeing j <= L-S+i; on CUDA
    attend_after_prefix (two dense cuDNN calls merged by log-sum-exp), elsewhere SDPA's bottom-right aligned
    causal path (no (S, L) mask; a dense one repeated per grouped head is 0.5 GB a layer for 8192 LLaMA-2-70B
    tokens at TP 4). A tensor mask (S, L) is
    additive (decode), with the query heads of a KV head folded into rows, so K/V are never repeated.
    Decode (S == 1) uses two batched GEMMs and a softmax: SDPA's masked kernels walk the whole cache
    with one thread block per (batch, head), idling most of the GPU at batch 1.
    """
    if (isinstance(mask, CausalBias) and q.is_cuda and q.dtype in HALF and SPLIT_PREFIX_ON_CUDA
            and k.shape[2] > q.shape[2]):
        return attend_after_prefix(q, k, v)
    if mask is None or isinstance(mask, CausalBias):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=q.shape[1] != k.shape[1])
    B, Hq, S, Dh = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    if S == 1:
        return decode_attention(q, k, v, mask)
    qg = q.reshape(B, Hkv, G * S, Dh)  # (B, Hkv, G*S, Dh): row g*S + i is head kv*G + g, token i
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask.repeat(G, 1)).view(B, Hq, S, Dh)
