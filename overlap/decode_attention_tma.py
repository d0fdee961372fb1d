"""overlap.decode_attention's split kernel with its K/V tiles streamed by TMA into shared memory (Gluon, sm_90+).

The same work and outputs as decode_attention's split_kernel (RoPE, the cache write of row p, flash-decoding of
one chunk into a normalised partial and its log-sum-exp, merged by the same merge kernel), but each program's
K and V tiles are copied by TMA into a ring of STAGES shared-memory buffers, the first STAGES before the PDL
wait (earlier steps' rows do not depend on the previous kernel), so the tiles hold no registers while in flight
and more programs fit an SM. Row p is masked in the tiles (its cache row is stale until this step writes it)
and the chunk that holds it adds it from registers with one more online-softmax step.

GPU-only (Triton's CPU interpreter does not run Gluon): tests/test_decode_attention.py's GPU tests check it
against decode_reference where decode_attention.TMA_SPLIT routes to it.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from overlap.kernels.compile_options import FP_FUSION
from overlap.kernels.stream_gemv import _tma_load

STAGES = 2  # K/V tile pairs in flight a program (64-row bf16 tiles: 64 KB of shared memory, three programs an SM)
PRE_WAIT = True  # the first STAGES copies are issued before the PDL wait (else after it)


@gluon.jit
def _kv_copy(k_desc, v_desc, ring_k, ring_v, bars, slot, row, pred):
    """TMA copies of the K and V tiles at cache row `row` into the ring's stage `slot`; nothing when pred is false."""
    mbarrier.expect(bars.index(slot), 2 * k_desc.block_type.nbytes, pred=pred)
    _tma_load(k_desc, [row, 0], bars.index(slot), ring_k.index(slot), pred=pred)
    _tma_load(v_desc, [row, 0], bars.index(slot), ring_v.index(slot), pred=pred)


@gluon.jit
def split_kernel_tma(k_desc, v_desc, qkv_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, o_ptr, lse_ptr,
                     stride_qkv, stride_cb, stride_ch, stride_cl, L, scale,
                     KV: gl.constexpr, G: gl.constexpr, G_PAD: gl.constexpr, DH: gl.constexpr,
                     SPLIT: gl.constexpr, NSPLIT: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr,
                     GDC: gl.constexpr, PRE_WAIT: gl.constexpr = True):
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, gl.num_warps()],
                                                   instr_shape=[16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8)
    rows_l: gl.constexpr = gl.SliceLayout(1, mma)
    cols_l: gl.constexpr = gl.SliceLayout(0, mma)
    dt: gl.constexpr = k_desc.dtype
    bh = gl.program_id(0)  # b * KV + j
    s = gl.program_id(1)
    b = bh // KV
    j = bh % KV
    pos = gl.load(pos_ptr).to(gl.int32)  # written before the step's first kernel: no wait needed for it
    start = s * SPLIT
    end = gl.minimum(start + SPLIT, pos + 1)  # <= start for a chunk after p: no tile
    n_tiles = gl.maximum(end - start + BLOCK - 1, 0) // BLOCK
    row0 = bh * L + start  # the chunk's first row in the (B KV L, DH) view of the cache
    ring_k = gl.allocate_shared_memory(dt, [STAGES, BLOCK, DH], k_desc.layout)
    ring_v = gl.allocate_shared_memory(dt, [STAGES, BLOCK, DH], v_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for t in gl.static_range(STAGES):
        mbarrier.init(bars.index(t), count=1)
    fence_async_shared()
    if PRE_WAIT:
        for t in gl.static_range(STAGES):  # earlier steps' rows: copied before the wait on the previous kernel
            _kv_copy(k_desc, v_desc, ring_k, ring_v, bars, t, row0 + t * BLOCK, t < n_tiles)
    if GDC:  # launched with PDL: qkv is the previous kernel's output
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)
    if not PRE_WAIT:
        for t in gl.static_range(STAGES):
            _kv_copy(k_desc, v_desc, ring_k, ring_v, bars, t, row0 + t * BLOCK, t < n_tiles)
    offs_g = gl.arange(0, G_PAD, layout=rows_l)
    offs_d = gl.arange(0, DH, layout=cols_l)
    rot_d = (offs_d + DH // 2) % DH  # roll by Dh/2: rotate_half up to sin's sign
    g_ok = offs_g < G
    cos = gl.load(cos_ptr + offs_d).to(gl.float32)
    sin = gl.load(sin_ptr + offs_d).to(gl.float32)
    q_rows = qkv_ptr + b * stride_qkv + (j * G + offs_g[:, None]) * DH
    q = gl.load(q_rows + offs_d[None, :], mask=g_ok[:, None], other=0.0).to(dt).to(gl.float32)
    q_rot = gl.load(q_rows + rot_d[None, :], mask=g_ok[:, None], other=0.0).to(dt).to(gl.float32)
    q = (q * cos[None, :] + q_rot * sin[None, :]).to(dt)  # (G_PAD, DH), rounded as eager rounds it
    q_a = gl.convert_layout(q, a_layout)
    k_raw = qkv_ptr + b * stride_qkv + (KV * G + j) * DH
    k_new = (gl.load(k_raw + offs_d).to(dt).to(gl.float32) * cos
             + gl.load(k_raw + rot_d).to(dt).to(gl.float32) * sin).to(dt)
    v_new = gl.load(qkv_ptr + b * stride_qkv + (KV * G + KV + j) * DH + offs_d).to(dt)
    owner = (pos >= start) & (pos < start + SPLIT)  # this chunk holds p: it writes row p and adds it below
    cache = b * stride_cb + j * stride_ch + gl.load(pos_ptr) * stride_cl  # int64, as the Triton kernel's
    gl.store(kc_ptr + cache + offs_d, k_new, mask=(offs_d >= 0) & owner)
    gl.store(vc_ptr + cache + offs_d, v_new, mask=(offs_d >= 0) & owner)
    m_i = gl.full([G_PAD], float("-inf"), gl.float32, rows_l)
    l_i = gl.zeros([G_PAD], gl.float32, rows_l)
    acc = gl.zeros([G_PAD, DH], gl.float32, mma)
    offs_t = gl.arange(0, BLOCK, layout=cols_l)
    for i in range(n_tiles):
        slot = i % STAGES
        mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
        kt = ring_k.index(slot).permute((1, 0)).load(b_layout)  # (DH, BLOCK)
        vt = ring_v.index(slot).load(b_layout)  # (BLOCK, DH)
        gl.thread_barrier()  # every warp has its operands: the buffers may be refilled
        _kv_copy(k_desc, v_desc, ring_k, ring_v, bars, slot, row0 + (i + STAGES) * BLOCK, i + STAGES < n_tiles)
        scores = mma_v2(q_a, kt, gl.zeros([G_PAD, BLOCK], gl.float32, mma))
        offs_n = start + i * BLOCK + offs_t
        valid = (offs_n < end) & (offs_n != pos)  # row p's cache row is stale: added from registers below
        scores = gl.where(valid[None, :], scores * scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(scores, axis=1))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a tile of masked rows only: no NaN
        alpha = gl.exp(m_i - m_use)
        p = gl.exp(scores - m_use[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        acc = mma_v2(gl.convert_layout(p.to(dt), a_layout), vt, acc * alpha[:, None])
        m_i = m_new
    if owner:  # row p: its score q . k_p, one more online-softmax step
        score_p = gl.sum(q.to(gl.float32) * k_new.to(gl.float32)[None, :], axis=1) * scale
        m_new = gl.maximum(m_i, score_p)
        alpha = gl.exp(m_i - m_new)
        p_p = gl.exp(score_p - m_new)
        l_i = l_i * alpha + p_p
        acc = acc * alpha[:, None] + p_p[:, None] * v_new.to(gl.float32)[None, :]
        m_i = m_new
    for t in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(t))
    out_row = (bh * NSPLIT + s) * G_PAD + offs_g  # rows of the (B KV, NSPLIT, G_PAD) partials
    gl.store(o_ptr + out_row[:, None] * DH + offs_d[None, :], acc / l_i[:, None])  # NaN for a skipped chunk
    gl.store(lse_ptr + out_row, m_i + gl.log(l_i))  # -inf for a skipped chunk: merge ignores it


def supported(k_cache: torch.Tensor) -> bool:
    """Whether the TMA split kernel runs here: a contiguous 16-bit cache on a GPU with TMA (sm_90+)."""
    return (k_cache.is_cuda and k_cache.dtype in (torch.bfloat16, torch.float16) and k_cache.is_contiguous()
            and torch.cuda.get_device_capability(k_cache.device)[0] >= 9)


def launch_split(qkv, cos, sin_signed, pos, k_cache, v_cache, o, lse, G: int, g_pad: int, nsplit: int, split: int,
                 block: int, gdc: bool) -> None:
    """decode_attention's split step through split_kernel_tma, partials into o and lse."""
    B, KV, L, Dh = k_cache.shape
    dtype = gl.bfloat16 if k_cache.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([block, Dh], dtype)
    k_desc = TensorDescriptor.from_tensor(k_cache.view(B * KV * L, Dh), [block, Dh], layout)
    v_desc = TensorDescriptor.from_tensor(v_cache.view(B * KV * L, Dh), [block, Dh], layout)
    split_kernel_tma[(B * KV, nsplit)](
        k_desc, v_desc, qkv, cos.reshape(-1), sin_signed.reshape(-1), pos, k_cache, v_cache, o, lse,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), L, Dh**-0.5,
        KV=KV, G=G, G_PAD=g_pad, DH=Dh, SPLIT=split, NSPLIT=nsplit, BLOCK=block, STAGES=STAGES, GDC=gdc,
        PRE_WAIT=PRE_WAIT, num_warps=4, **({"launch_pdl": True} if gdc else {}), **FP_FUSION)
