"""Decode attention in one pass over the static KV cache (flash-decoding), RoPE and the cache write fused.

One new token per sequence at position p (the same for the whole batch), KV head j of this rank with
its G = H/KV query heads (rows g of q are heads j*G + g, as overlap.ops.decode_attention folds them):

    q_g  = rope(q_g, p),  k_p = rope(k_raw, p),  v_p = v_raw          (rotate halves, as transformers)
    K[p] = k_p,  V[p] = v_p                                           (the static cache, in place)
    o_g  = softmax(q_g K[0..p]^T / sqrt(Dh)) V[0..p]

Kernel 1 cuts the cache positions [0, Lmax) into NSPLIT chunks; program (b*KV + j, s) computes chunk s's
normalised partial o_s and its log-sum-exp l_s for the G heads of KV head j (positions after p masked,
chunks after p run no tile). The program whose chunk holds p writes K[p], V[p] and takes them from registers,
so no program reads a row another is writing. Kernel 2 merges the chunks:

    o = sum_s e^(l_s - m) o_s / sum_s e^(l_s - m),   m = max_s l_s

p is read from a device tensor, so one CUDA graph serves every step. Two launches replace the eager
path's RoPE, two cache writes, two batched GEMMs, the softmax and a copy (overlap.model's decode step).

The reference is decode_reference: rope_, the cache write and decode_attention in plain torch, what the
eager runtime runs. Supported: head_dim a power of two >= 16 (tl.dot's smallest tile); supports()
says so, and the model falls back to the reference elsewhere (stories260K's head_dim is 8).
"""

from __future__ import annotations

import math
import os

import torch

from overlap.kernels.compile_options import FP_FUSION

BLOCK_N = 64  # cache positions per inner tile
SMALL_BLOCK_N = 32  # the tile when whole BLOCK_N tiles would leave SMs idle (few sequences and KV heads: batch 1
# at LLaMA-2-70B's TP-4 shard runs 66 programs of 64 rows or 132 of 32; 32 rows made that step 0.08 ms faster
# and batch 16's 0.3 ms slower on one H200: docs/benchmarks/pdl.md, "The attention's tile by batch")
NUM_WARPS = 4  # of the split kernel (Triton's default; swept by scripts/decode_microbench.py --only attention)
TMA_SPLIT = False  # the split step through overlap.decode_attention_tma (K/V tiles by TMA) where it runs
MAXNREG = None  # registers a thread the split kernel may use (None: the compiler's choice; swept the same way)
PROGRAMS_PER_SM = 2  # chunks are sized so that B * KV * NSPLIT is about this many programs per SM (measured
# best of 0.25..4 on one H200 at LLaMA-2-70B's TP-4 shape, batch 16; batch 1 is capped by whole tiles:
# docs/benchmarks/spd_bench.md, "One rank alone on one H200"). Merging in the last chunk program instead of a second launch was
# measured too: 2.6x slower at batch 1 (one program reads every chunk's partial serially).


def supports(qkv: torch.Tensor, head_dim: int) -> bool:
    """Whether the Triton path runs here: a CUDA tensor (or Triton's CPU interpreter) and a usable head_dim."""
    on_device = qkv.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return on_device and head_dim >= 16 and head_dim & (head_dim - 1) == 0 and not torch.compiler.is_compiling()


def decode_reference(qkv, cos, sin_signed, pos, k_cache, v_cache, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """Plain torch: qkv (B, 1, (H + 2 KV) Dh), cos / sin_signed (1, 1, Dh), pos (1,) long, caches
    (B, KV, Lmax, Dh) written at pos -> (B, 1, H Dh), attending to positions <= pos."""
    from overlap.ops import decode_attention, decode_mask, rope_

    B = qkv.shape[0]
    Dh = k_cache.shape[-1]
    H, KV = n_heads, n_kv_heads
    qk = rope_(qkv[..., : (H + KV) * Dh].view(B, 1, H + KV, Dh), cos, sin_signed)  # (B, 1, H + KV, Dh)
    q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # (B, H, 1, Dh), (B, KV, 1, Dh)
    v = qkv[..., (H + KV) * Dh :].view(B, 1, KV, Dh).transpose(1, 2)  # (B, KV, 1, Dh)
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    mask = decode_mask(pos, k_cache.shape[2], qkv.dtype)  # (1, Lmax)
    return decode_attention(q, k_cache, v_cache, mask).transpose(1, 2).reshape(B, 1, H * Dh)


def num_splits(batch_kv: int, max_seq: int, sm_count: int) -> tuple[int, int, int]:
    """(NSPLIT, SPLIT, BLOCK): chunks of SPLIT positions (a multiple of the tile, BLOCK rows) filling about
    PROGRAMS_PER_SM programs per SM over batch_kv = B * KV (sequence, KV head) pairs. The tile is BLOCK_N, or
    SMALL_BLOCK_N where chunks of one BLOCK_N tile each would still be fewer programs than SMs."""
    block = BLOCK_N
    if batch_kv * -(-max_seq // block) < sm_count:
        block = min(block, SMALL_BLOCK_N)
    tiles = -(-max_seq // block)
    want = max(1, min(tiles, math.ceil(PROGRAMS_PER_SM * sm_count / batch_kv)))
    split = -(-tiles // want) * block
    return -(-max_seq // split), split, block


_KERNELS: list = []


def _kernels():
    """The two Triton kernels, defined on first use (importing triton is deferred: CPU runs without it)."""
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    global _kv_tile  # module globals, where the kernels' JIT looks names up

    @triton.jit
    def _kv_tile(kc_ptr, vc_ptr, cache, n0, end, pos, stride_cl, offs_d, BLOCK: tl.constexpr):
        """The K and V cache rows n0 .. n0 + BLOCK (BLOCK, DH) below end, row pos (this step's) as zeros."""
        offs_n = n0 + tl.arange(0, BLOCK)
        ok = ((offs_n < end) & (offs_n != pos))[:, None]
        rows = cache + offs_n[:, None] * stride_cl + offs_d[None, :]
        return tl.load(kc_ptr + rows, mask=ok, other=0.0), tl.load(vc_ptr + rows, mask=ok, other=0.0)

    @triton.jit
    def split_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, o_ptr, lse_ptr,
                     stride_qkv, stride_cb, stride_ch, stride_cl, scale,
                     KV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, DH: tl.constexpr,
                     SPLIT: tl.constexpr, NSPLIT: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
                     GDC: tl.constexpr = False):
        bh = tl.program_id(0)  # b * KV + j
        s = tl.program_id(1)
        b, j = bh // KV, bh % KV
        pos = tl.load(pos_ptr)  # written before the step's first kernel: no wait needed for it
        start = s * SPLIT
        end = tl.minimum(start + SPLIT, pos + 1)  # <= start for a chunk after p: no tile, l_s = -inf
        offs_d = tl.arange(0, DH)
        cache = b * stride_cb + j * stride_ch
        # The chunk's first K/V tile (earlier steps' rows; row p is this step's, taken from registers below)
        # is loaded before the wait on the previous kernel: with PDL it streams while that kernel finishes.
        # Each loop step then loads the next tile (software pipelining by one tile).
        k_nxt, v_nxt = _kv_tile(kc_ptr, vc_ptr, cache, start, end, pos, stride_cl, offs_d, BLOCK)
        if GDC:  # launched with PDL: qkv is the previous kernel's output
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        offs_g = tl.arange(0, G_PAD)
        rot_d = (offs_d + DH // 2) % DH  # roll by Dh/2: rotate_half up to sin's sign
        g_ok = offs_g < G
        out_row = (bh * NSPLIT + s) * G_PAD + offs_g  # rows of the (B KV, NSPLIT, G_PAD) partials
        dtype = kc_ptr.dtype.element_ty
        cos = tl.load(cos_ptr + offs_d).to(tl.float32)
        sin = tl.load(sin_ptr + offs_d).to(tl.float32)
        q_rows = qkv_ptr + b * stride_qkv + (j * G + offs_g[:, None]) * DH
        q = tl.load(q_rows + offs_d[None, :], mask=g_ok[:, None], other=0.0).to(dtype).to(tl.float32)
        q_rot = tl.load(q_rows + rot_d[None, :], mask=g_ok[:, None], other=0.0).to(dtype).to(tl.float32)
        q = (q * cos[None, :] + q_rot * sin[None, :]).to(dtype)  # (G_PAD, DH), rounded as eager rounds it
        # The new token's k and v: rotated, rounded to the cache's dtype, written by this chunk's owner.
        k_raw = qkv_ptr + b * stride_qkv + (KV * G + j) * DH
        k_new = (tl.load(k_raw + offs_d).to(dtype).to(tl.float32) * cos
                 + tl.load(k_raw + rot_d).to(dtype).to(tl.float32) * sin).to(dtype)
        v_new = tl.load(qkv_ptr + b * stride_qkv + (KV * G + KV + j) * DH + offs_d).to(dtype)
        p_vec = offs_d * 0 + pos  # (DH,): p as a vector, so the store mask has the store's shape
        owner = (p_vec >= start) & (p_vec < start + SPLIT)  # this chunk holds p
        tl.store(kc_ptr + cache + pos * stride_cl + offs_d, k_new, mask=owner)
        tl.store(vc_ptr + cache + pos * stride_cl + offs_d, v_new, mask=owner)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, DH], tl.float32)
        for n0 in range(start, end, BLOCK):
            offs_n = n0 + tl.arange(0, BLOCK)
            valid = offs_n < end
            at_pos = (offs_n == pos)[:, None]
            k = tl.where(at_pos, k_new[None, :], k_nxt)  # (BLOCK, DH)
            v = tl.where(at_pos, v_new[None, :], v_nxt)
            k_nxt, v_nxt = _kv_tile(kc_ptr, vc_ptr, cache, n0 + BLOCK, end, pos, stride_cl, offs_d, BLOCK)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            scores = tl.where(valid[None, :], scores * scale, float("-inf"))  # (G_PAD, BLOCK)
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        tl.store(o_ptr + out_row[:, None] * DH + offs_d[None, :], acc / l_i[:, None])  # NaN for a skipped chunk
        tl.store(lse_ptr + out_row, m_i + tl.log(l_i))  # -inf for a skipped chunk: merge ignores it

    @triton.jit
    def merge_kernel(o_ptr, lse_ptr, out_ptr, stride_out,
                     KV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, DH: tl.constexpr,
                     NSPLIT: tl.constexpr, S_PAD: tl.constexpr, GDC: tl.constexpr = False):
        if GDC:  # the next kernel (wo's GEMV) may launch at once, while the split kernel runs: its prologue (its
            # first weight tiles) overlaps the attention; its own wait covers this kernel's end, so the wait here
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        bh = tl.program_id(0)
        g = tl.program_id(1)
        b, j = bh // KV, bh % KV
        offs_s = tl.arange(0, S_PAD)
        offs_d = tl.arange(0, DH)
        rows = (bh * NSPLIT + offs_s) * G_PAD + g
        lse = tl.load(lse_ptr + rows, mask=offs_s < NSPLIT, other=float("-inf"))  # (S_PAD,)
        w = tl.exp(lse - tl.max(lse, axis=0))  # chunk 0 always holds position 0: max is finite
        o = tl.load(o_ptr + rows[:, None] * DH + offs_d[None, :], mask=(w > 0)[:, None], other=0.0)  # skip NaNs
        out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
        tl.store(out_ptr + b * stride_out + (j * G + g) * DH + offs_d, out.to(out_ptr.dtype.element_ty))

    _KERNELS.extend([split_kernel, merge_kernel])
    return _KERNELS


def _tma():
    from overlap import decode_attention_tma  # Gluon: imported where it may run

    return decode_attention_tma


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton's interpreter: a few programs keep the CPU test short
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def decode_attention_rope(qkv, cos, sin_signed, pos, k_cache, v_cache, n_heads: int, n_kv_heads: int,
                          pdl: bool = False) -> torch.Tensor:
    """decode_reference in two Triton launches: qkv (B, 1, (H + 2 KV) Dh), cos / sin_signed (1, 1, Dh) (or
    (Dh,)), pos (1,) long on the device, caches (B, KV, Lmax, Dh) with unit stride in Dh -> (B, 1, H Dh).
    pdl (CUDA): both launch with programmatic dependent launch, each waiting for the previous kernel first."""
    split_kernel, merge_kernel = _kernels()
    B, S, width = qkv.shape
    _, KV, L, Dh = k_cache.shape
    H = n_heads
    if S != 1 or width != (H + 2 * KV) * Dh or KV != n_kv_heads or H % KV:
        raise ValueError(f"decode_attention_rope: qkv {tuple(qkv.shape)} does not fit {H} query heads, "
                         f"{n_kv_heads} KV heads of dim {Dh} (cache {tuple(k_cache.shape)})")
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride() or qkv.stride(-1) != 1:
        raise ValueError("decode_attention_rope needs caches of one layout with unit stride in head_dim")
    G = H // KV
    g_pad = max(16, 1 << (G - 1).bit_length())  # tl.dot's smallest M
    nsplit, split, block = num_splits(B * KV, L, _sm_count(qkv.device))
    o = torch.empty(B * KV * nsplit * g_pad, Dh, dtype=torch.float32, device=qkv.device)  # partials
    lse = torch.empty(B * KV * nsplit * g_pad, dtype=torch.float32, device=qkv.device)
    out = torch.empty(B, 1, H * Dh, dtype=k_cache.dtype, device=qkv.device)
    gdc = pdl and qkv.is_cuda
    launch = {"launch_pdl": True} if gdc else {}
    if TMA_SPLIT and qkv.is_cuda and _tma().supported(k_cache):
        _tma().launch_split(qkv, cos, sin_signed, pos, k_cache, v_cache, o, lse, G, g_pad, nsplit, split, block, gdc)
    else:
        split_kernel[(B * KV, nsplit)](
            qkv, cos.reshape(-1), sin_signed.reshape(-1), pos, k_cache, v_cache, o, lse,
            qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), Dh**-0.5,
            KV=KV, G=G, G_PAD=g_pad, DH=Dh, SPLIT=split, NSPLIT=nsplit, BLOCK=block,
            PRECISION="ieee" if k_cache.dtype == torch.float32 else None, GDC=gdc, num_warps=NUM_WARPS,
            **launch, **FP_FUSION, **({"maxnreg": MAXNREG} if MAXNREG else {}))  # fp32: exact dots, not TF32
    merge_kernel[(B * KV, G)](o, lse, out, out.stride(0), KV=KV, G=G, G_PAD=g_pad, DH=Dh, NSPLIT=nsplit,
                              S_PAD=max(2, 1 << (nsplit - 1).bit_length()), GDC=gdc, **launch,
                              **FP_FUSION)
    return out
