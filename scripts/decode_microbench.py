"""Single-GPU micro-benchmark of a decode step's pieces at LLaMA-2-70B's TP-4 shard (one H200 is enough).

    python scripts/decode_microbench.py --out runs/decode_micro.jsonl

1. Row-parallel GEMV (o: 8192 x 2048, down: 8192 x 7168; M = 1, 16): cuBLAS (F.linear) against the GEMV
   of overlap.kernels.gemv_all_reduce run at world size 1 (its own buffer and signal pad: the barrier
   is local), over configurations (block_k, warps, stages, programs). What the fused decode kernel's
   GEMV costs, apart from NVLink, against what it must beat.
2. Every weight GEMV of a step (wqkv, wo, w13, w2 at M = 1) through F.linear, torch.mv and w @ x.T.
3. Decode attention (16 query heads, 2 KV heads, Dh 128, cache 2112, position 2048; batch 1, 16): the
   eager path (RoPE, two cache writes, two batched GEMMs, softmax), fused_ops' compiled version, and
   overlap.decode_attention's Triton pass over programs per SM (chunk counts), warps, tile rows and register
   caps, each with its floor (the K/V bytes over the copy bandwidth measured in the same run) and the split
   kernel as compiled for that configuration: registers a thread, spilled bytes, shared memory, and the asynchronous
   copies in its PTX (split_regs, split_spills, split_smem, split_cp_async: 0 when Triton's pipeliner did
   not stage the loads).
4. overlap.kernels.norm_gemv (--only norm_gemv) at the R = 4 and 8 shards (--tp): attn_norm + wqkv,
   mlp_norm + w13 + SwiGLU, and wo and w2 alone, M = 1, 16, against the steps it replaces, eager
   (overlap.ops.norm_linear: F.rms_norm, F.linear (cuBLAS), SwiGLU: impl "unfused") and as the runtime runs
   them with bench.fuse=true (compiled norm and SwiGLU around cuBLAS: "compiled"), over block sizes, split-K
   and warps; the GEMV alone at wqkv and w13 ("cublas_no_norm", "norm_gemv_no_norm": bench.triton_gemv), and
   w13's GEMV with SwiGLU in its epilogue ("swiglu_gemv": bench.swiglu_gemv) against the GEMV, then the
   compiled SwiGLU ("gemv_then_swiglu").
   Each record carries the weight bytes over the copy bandwidth measured in the same run (floor_us) and
   the fraction reached; each config is checked against the reference before it is timed (rel_err).

5. overlap.kernels.stream_gemv (--only stream_gemv) at M = 1: every weight GEMV of the shards, against the
   Triton GEMV the runtime runs without it, over block sizes, stages and split-K (stream_gemv_cases); at wqkv
   and w13 also with the norm (and SwiGLU) folded in, against the compiled steps it replaces (fused_cases).

6. Early-launched waiters (--only pdl_wait) at the R = 4 shard, M = 16: wo's and w2's Triton GEMV (gemv_down_op,
   with PDL, as the batch-16 step runs it), each call followed by a kernel launched with PDL whose P programs
   wait for the GEMV (griddepcontrol.wait) and then read its output ("light": a few registers; "heavy": each
   program holds a row of K fp32 values, as a one-row-a-program RMSNorm does), P = 0 (the GEMV alone), 16, 128,
   528 (4 an SM); and each waiter back to back, for its own time. Whether programs that sit launched
   and waiting slow the GEMV they wait for (docs/benchmarks/pdl.md, "Batch 16's two RMSNorms").

7. Well-kept decode attention (--only attention_peers) at attention_cases' shape: torch's flex_attention
   (compiled: its flex-decoding Triton kernel) and scaled_dot_product_attention's flash, cuDNN and
   memory-efficient backends, attention only, against overlap.decode_attention's two launches (which also
   rotate and write the new token), and the compiled RoPE + cache write a peer would need beside it.

Each op is timed inside a CUDA graph of CALLS calls that cycle over enough weight copies (> L2) that no
call reads a weight from L2 (as in a real step, where every layer has its own weights); medians of
REPLAYS replays, per call. One JSON line per measurement (schema spd.decode_micro/1).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CALLS = 24  # ops per captured graph
REPLAYS = 30
L2_BYTES = 60 << 20  # H200's L2 is 60 MB: weight copies together at least 4x this


def compiled_resources(jit_fn) -> dict:
    """{specialisation key: {regs (a thread), spills (bytes), smem (bytes), cp_async (asynchronous copies in
    its PTX: whether Triton's pipeliner staged loads)}} of a Triton JIT function's compiled variants launched so
    far (found by shape in its device caches, whose layout differs across Triton versions)."""
    out = {}
    for cache in getattr(jit_fn, "device_caches", {}).values():
        for part in cache if isinstance(cache, tuple) else ():
            for key, kernel in part.items() if isinstance(part, dict) else ():
                if getattr(kernel, "n_regs", None) is not None:
                    out[str(key)] = dict(regs=kernel.n_regs, spills=kernel.n_spills,
                                         smem=getattr(kernel.metadata, "shared", None),
                                         cp_async=kernel.asm.get("ptx", "").count("cp.async"))
    return out


def time_graph(fn) -> float:
    """Median microseconds per call of fn(i) for i in range(CALLS), replayed from one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(REPLAYS + 1)]
    ev[0].record()
    for i in range(REPLAYS):
        graph.replay()
        ev[i + 1].record()
    torch.cuda.synchronize()
    return statistics.median(ev[i].elapsed_time(ev[i + 1]) for i in range(REPLAYS)) * 1e3 / CALLS


def copies(shape, dtype, gen) -> list[torch.Tensor]:
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    n = max(2, -(-4 * L2_BYTES // nbytes))
    return [torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype) for _ in range(n)]


def world1_tables(n: int):
    from overlap.kernels.gemv_all_reduce import workspace_bytes
    from overlap.kernels.symm import PeerTables

    buf = torch.zeros(workspace_bytes(n, 1), dtype=torch.uint8, device="cuda")
    pad = torch.zeros(2048 // 4, dtype=torch.int32, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    t = PeerTables(buf_table=torch.tensor([buf.data_ptr()], dtype=torch.int64, device="cuda"),
                   pad_table=torch.tensor([pad.data_ptr()], dtype=torch.int64, device="cuda"),
                   state=torch.zeros(4, dtype=torch.int32, device="cuda"), rank=0, world=1, nbytes=buf.numel(),
                   pad_bytes=2048, sm_count=sms)
    t._keep = (buf, pad)
    return t


def gemv_cases(emit) -> None:
    from overlap.kernels.gemv_all_reduce import gemv_all_reduce

    gen = torch.Generator(device="cuda").manual_seed(0)
    for layer, (n, k) in {"o": (8192, 2048), "down": (8192, 7168)}.items():
        ws = copies((n, k), torch.bfloat16, gen)
        t = world1_tables(n)
        for m in (1, 16):
            x = torch.randn(m, k, generator=gen, device="cuda").bfloat16()
            ref = F.linear(x, ws[0])
            us = time_graph(lambda i: F.linear(x, ws[i % len(ws)]))
            gbps = n * k * 2 / us / 1e3
            emit(dict(piece="gemv", layer=layer, m=m, n=n, k=k, impl="cublas", us=us, tb_s=gbps / 1e3))
            for block_k in (64, 128, 256):
                for warps in (4, 8):
                    for stages in (3, 4, 6):
                        for programs in (None, 64):
                            cap = t.sm_count if programs is None else programs
                            t.sm_count = cap
                            try:
                                out = gemv_all_reduce(x, ws[0], t, block_k=block_k, num_warps=warps, num_stages=stages)
                                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                                us = time_graph(lambda i: gemv_all_reduce(x, ws[i % len(ws)], t, block_k=block_k,
                                                                          num_warps=warps, num_stages=stages))
                            except Exception as e:  # a config Triton cannot build (shared memory)
                                emit(dict(piece="gemv", layer=layer, m=m, impl="triton_w1", block_k=block_k,
                                          warps=warps, stages=stages, programs=cap, error=str(e)[:200]))
                                continue
                            finally:
                                t.sm_count = torch.cuda.get_device_properties(0).multi_processor_count
                            emit(dict(piece="gemv", layer=layer, m=m, n=n, k=k, impl="triton_w1", block_k=block_k,
                                      warps=warps, stages=stages, programs=cap, us=us,
                                      tb_s=n * k * 2 / us / 1e6, rel_err=err))


def weight_cases(emit) -> None:
    """Every weight GEMV of a decode step at M = 1 through three torch entry points (cuBLAS picks per call)."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    for layer, (n, k) in {"wqkv": (2560, 8192), "wo": (8192, 2048), "w13": (14336, 8192), "w2": (8192, 7168)}.items():
        ws = copies((n, k), torch.bfloat16, gen)
        x = torch.randn(1, k, generator=gen, device="cuda").bfloat16()
        ways = {"linear": lambda i: F.linear(x, ws[i % len(ws)]), "mv": lambda i: torch.mv(ws[i % len(ws)], x[0]),
                "matmul_t": lambda i: (ws[i % len(ws)] @ x.T).T}
        for name, fn in ways.items():
            us = time_graph(fn)
            emit(dict(piece="weight_gemv", layer=layer, m=1, n=n, k=k, impl=name, us=us, tb_s=n * k * 2 / us / 1e6))


ATTENTION_SHAPE = (16, 2, 128, 2112, 2048)  # query heads, KV heads, head_dim, cache length, position: the R = 4 shard


def attention_inputs(B: int, gen) -> tuple:
    """(qkv, caches, cos, sin) of a decode step at ATTENTION_SHAPE: bf16, with enough (K, V) cache copies (> L2)
    that no call reads its cache from L2."""
    H, KV, Dh, L, _ = ATTENTION_SHAPE
    qkv = torch.randn(B, 1, (H + 2 * KV) * Dh, generator=gen, device="cuda").bfloat16()
    caches = [(torch.randn(B, KV, L, Dh, generator=gen, device="cuda").bfloat16(),
               torch.randn(B, KV, L, Dh, generator=gen, device="cuda").bfloat16())
              for _ in range(max(2, -(-4 * L2_BYTES // (2 * B * KV * L * Dh * 2))))]
    cos = torch.randn(1, 1, Dh, device="cuda").bfloat16()
    sin = torch.randn(1, 1, Dh, device="cuda").bfloat16()
    return qkv, caches, cos, sin


def attention_cases(emit) -> None:
    from overlap import decode_attention as da
    from overlap.floors import measure_rates
    from overlap.fused_ops import fused_ops

    H, KV, Dh, L, pos = ATTENTION_SHAPE
    gen = torch.Generator(device="cuda").manual_seed(1)
    compiled = fused_ops()
    rates = measure_rates(torch.device("cuda"))  # floor_us: the K/V bytes over the copy bandwidth of this run
    emit(dict(piece="rates", **rates))
    for B in (1, 16):
        qkv, caches, cos, sin = attention_inputs(B, gen)
        p = torch.tensor([pos], device="cuda")
        allowed = torch.arange(L, device="cuda")[None, :] <= p[:, None]
        mask = torch.zeros(allowed.shape, dtype=torch.bfloat16, device="cuda").masked_fill_(~allowed, float("-inf"))

        def path(ops):
            def run(i):
                kc, vc = caches[i % len(caches)]
                qk = ops.rope(qkv[..., : (H + KV) * Dh].view(B, 1, H + KV, Dh), cos, sin)
                q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
                v = qkv[..., (H + KV) * Dh :].view(B, 1, KV, Dh).transpose(1, 2)
                kc.index_copy_(2, p, k)
                vc.index_copy_(2, p, v)
                return ops.decode_attention(q, kc, vc, mask).transpose(1, 2).reshape(B, 1, H * Dh)
            return run

        from overlap.ops import EAGER_OPS

        emit(dict(piece="attention", batch=B, impl="eager", us=time_graph(path(EAGER_OPS))))
        emit(dict(piece="attention", batch=B, impl="compiled", us=time_graph(path(compiled))))
        default = da.PROGRAMS_PER_SM, da.NUM_WARPS, da.BLOCK_N, da.SMALL_BLOCK_N, da.MAXNREG
        ref = path(EAGER_OPS)(0).float()
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for per_sm, warps, block, maxnreg in ATTENTION_GRID:
            # the tile pinned: SMALL_BLOCK_N = block (the default step picks its tile by batch, num_splits)
            da.PROGRAMS_PER_SM, da.NUM_WARPS, da.BLOCK_N, da.SMALL_BLOCK_N, da.MAXNREG = (per_sm, warps, block, block,
                                                                                           maxnreg)
            cfg = dict(programs_per_sm=per_sm, num_warps=warps, block_n=block, maxnreg=maxnreg,
                       nsplit=da.num_splits(B * KV, L, sms)[0])
            try:
                seen = compiled_resources(da._kernels()[0])
                out = da.decode_attention_rope(qkv, cos, sin, p, *caches[0], H, KV).float()
                new = [r for k, r in compiled_resources(da._kernels()[0]).items() if k not in seen]
                if len(new) == 1:  # the split kernel compiled for this config
                    cfg.update({f"split_{k}": v for k, v in new[0].items()})
                us = time_graph(lambda i: da.decode_attention_rope(qkv, cos, sin, p, *caches[i % len(caches)], H, KV))
            except Exception as e:  # a config Triton cannot build (shared memory)
                emit(dict(piece="attention", batch=B, impl="triton", **cfg, error=str(e)[:200]))
                continue
            emit(dict(piece="attention", batch=B, impl="triton", **cfg, us=us,
                      rel_err_vs_eager=((out - ref).norm() / ref.norm()).item(),
                      floor_us=2 * B * KV * (pos + 1) * Dh * 2 / (rates["copy_tbps"] * 1e12) * 1e6))
        da.PROGRAMS_PER_SM, da.NUM_WARPS, da.BLOCK_N, da.SMALL_BLOCK_N, da.MAXNREG = default


def attention_peer_cases(emit) -> None:
    """Well-kept decode attention kernels at the shape of attention_cases (attention only: RoPE and the cache
    write are not in them), against overlap.decode_attention's two launches (which include both), and the
    compiled RoPE + cache write a peer would need beside it. Each peer attends to positions <= p of the static
    cache, the G query heads of a KV head folded into G query rows where the backend has no GQA of its own."""
    from torch.nn.attention import SDPBackend
    from torch.nn.attention.flex_attention import flex_attention

    from overlap import decode_attention as da
    from overlap.floors import measure_rates
    from overlap.fused_ops import fused_ops

    H, KV, Dh, L, pos = ATTENTION_SHAPE
    G = H // KV
    gen = torch.Generator(device="cuda").manual_seed(1)
    rates = measure_rates(torch.device("cuda"))
    emit(dict(piece="rates", **rates))
    compiled = fused_ops()
    flex = torch.compile(flex_attention, dynamic=False)
    p = torch.tensor([pos], device="cuda")

    def visible(score, b, h, q_idx, kv_idx):
        return torch.where(kv_idx <= p[0], score, float("-inf"))

    for B in (1, 16):
        floor_us = 2 * B * KV * (pos + 1) * Dh * 2 / (rates["copy_tbps"] * 1e12) * 1e6
        qkv, caches, cos, sin = attention_inputs(B, gen)
        q = torch.randn(B, H, 1, Dh, generator=gen, device="cuda").bfloat16()
        qg = q.view(B, KV, G, Dh)  # query heads of a KV head as G query rows
        mask = torch.zeros(1, 1, 1, L, device="cuda", dtype=torch.bfloat16)
        mask[..., pos + 1:] = float("-inf")
        kc0, vc0 = caches[0]
        ref = F.scaled_dot_product_attention(qg.float(), kc0[:, :, : pos + 1].float(),
                                             vc0[:, :, : pos + 1].float()).reshape(B, H, 1, Dh)

        def rope_write(i):  # what a peer needs beside it: fused_ops' compiled RoPE, then the cache writes
            kc, vc = caches[i % len(caches)]
            qk = compiled.rope(qkv[..., : (H + KV) * Dh].view(B, 1, H + KV, Dh), cos, sin)
            kc.index_copy_(2, p, qk[:, :, H:].transpose(1, 2))
            vc.index_copy_(2, p, qkv[..., (H + KV) * Dh :].view(B, 1, KV, Dh).transpose(1, 2))

        peers = {
            "flex_attention": lambda i: flex(q, *caches[i % len(caches)], score_mod=visible, enable_gqa=True),
            "sdpa_flash": lambda i: _sdpa(SDPBackend.FLASH_ATTENTION, qg, caches[i % len(caches)], pos + 1, None),
            "sdpa_cudnn": lambda i: _sdpa(SDPBackend.CUDNN_ATTENTION, qg, caches[i % len(caches)], pos + 1, None),
            "sdpa_efficient": lambda i: _sdpa(SDPBackend.EFFICIENT_ATTENTION, qg, caches[i % len(caches)], L, mask),
            "sdpa_cudnn_masked": lambda i: _sdpa(SDPBackend.CUDNN_ATTENTION, qg, caches[i % len(caches)], L, mask),
        }
        for name, fn in peers.items():
            try:
                out = fn(0).reshape(B, H, 1, Dh).float()
                us = time_graph(fn)
            except Exception as e:  # a backend that does not take this shape here
                emit(dict(piece="attention_peer", batch=B, impl=name, error=str(e)[:300]))
                continue
            emit(dict(piece="attention_peer", batch=B, impl=name, us=us, floor_us=floor_us,
                      rel_err=((out - ref).norm() / ref.norm()).item()))
        emit(dict(piece="attention_peer", batch=B, impl="rope_cache_write_compiled", us=time_graph(rope_write)))
        us = time_graph(lambda i: da.decode_attention_rope(qkv, cos, sin, p, *caches[i % len(caches)], H, KV))
        emit(dict(piece="attention_peer", batch=B, impl="ours_rope_write_attention", us=us, floor_us=floor_us,
                  nsplit=da.num_splits(B * KV, L, torch.cuda.get_device_properties(0).multi_processor_count)[0]))


def _sdpa(backend, qg, cache, length: int, mask):
    """torch's scaled_dot_product_attention on one backend over cache rows [0, length)."""
    from torch.nn.attention import sdpa_kernel

    kc, vc = cache
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(qg, kc[:, :, :length], vc[:, :, :length], attn_mask=mask)


# (programs per SM, warps, tile rows, register cap) of the decode attention's split kernel: every chunk count
# (per SM 8 is 33 chunks at batch 16: one tile each) at 4 and 8 warps, tiles of 32 and 128 rows; and chunkings
# that fit one wave (1.9 per SM: 8 chunks of 288 rows at batch 16 with 32-row tiles, 7 of 320 with 64) or
# registers capped so that 3 or 4 programs fit an SM (at 252 registers a thread only 2 do: ncu, commit ed7ca8a)
ATTENTION_GRID = ([(per_sm, warps, 64, None) for per_sm in (0.5, 1, 2, 4, 8) for warps in (4, 8)]
                  + [(per_sm, 4, block, None) for per_sm in (1, 2) for block in (32, 128)]
                  + [(1.9, 4, block, None) for block in (32, 64)]
                  + [(per_sm, 4, block, cap) for per_sm in (1.9, 2) for block in (32, 64) for cap in (128, 168)])


# 8 warps and block_n 16 lost everywhere in the sweep of commit 604ee40 (docs/benchmarks/norm_gemv.md); wider
# blocks were still gaining at 64
NORM_GEMV_GRID = ([dict(block_n=bn, block_k=bk, num_warps=4, split_k="auto") for bn in (32, 64, 128)
                   for bk in (64, 128, 256)]
                  + [dict(block_n=bn, block_k=64, num_warps=4, split_k=s) for bn in (32, 64) for s in (1, 2, 4, 8, 16)])


def compiled_steps(ops, x, w, g, swiglu: bool) -> torch.Tensor:
    """What the runtime runs without the kernel (bench.fuse=true): the compiled norm, cuBLAS, the compiled SwiGLU."""
    y = F.linear(x if g is None else ops.norm(x, g, 1e-5), w)
    return ops.swiglu(y, w.shape[0] // 2) if swiglu else y


def norm_gemv_cases(emit, tps=(4, 8), deadline: float = float("inf")) -> None:
    from overlap.floors import measure_rates
    from overlap.fused_ops import fused_ops
    from overlap.kernel_bench import llama70b_layers
    from overlap.kernels.norm_gemv import norm_gemv, reference
    from overlap.ops import norm_linear

    fused = fused_ops()
    rates = measure_rates(torch.device("cuda"))
    emit(dict(piece="rates", **rates))
    bw = rates["copy_tbps"] * 1e12
    gen = torch.Generator(device="cuda").manual_seed(3)
    for tp in tps:
        for layer, (_, k, n) in llama70b_layers(tp).items():
            norm, swiglu = layer in ("qkv", "gate_up"), layer == "gate_up"
            ws = copies((n, k), torch.bfloat16, gen)
            g = (1 + 0.1 * torch.randn(k, generator=gen, device="cuda")).bfloat16() if norm else None
            floor_us = n * k * 2 / bw * 1e6
            base = dict(piece="norm_gemv", tp=tp, layer=layer, n=n, k=k, norm=norm, swiglu=swiglu,
                        floor_us=floor_us)
            for m in (1, 16):
                x = torch.randn(m, k, generator=gen, device="cuda").bfloat16()
                ref = norm_linear(x, ws[0], g, 1e-5, swiglu).float()
                us = time_graph(lambda i: norm_linear(x, ws[i % len(ws)], g, 1e-5, swiglu))
                emit(dict(base, m=m, impl="unfused", us=us, floor_frac=floor_us / us))
                us = time_graph(lambda i: compiled_steps(fused, x, ws[i % len(ws)], g, swiglu))
                emit(dict(base, m=m, impl="compiled", us=us, floor_frac=floor_us / us))
                if norm:  # the GEMV alone, cuBLAS and this kernel: what the norm (and SwiGLU) cost each of them
                    us = time_graph(lambda i: F.linear(x, ws[i % len(ws)]))
                    emit(dict(base, m=m, impl="cublas_no_norm", us=us, floor_frac=floor_us / us))
                    us = time_graph(lambda i: norm_gemv(x, ws[i % len(ws)]))
                    emit(dict(base, m=m, impl="norm_gemv_no_norm", us=us, floor_frac=floor_us / us))
                if swiglu:  # w13's GEMV with SwiGLU in its epilogue (Ops.swiglu_gemv) against GEMV, then SwiGLU
                    ref_s = reference(x, ws[0], swiglu=True).float()
                    out = norm_gemv(x, ws[0], swiglu=True).float()
                    err = ((out - ref_s).norm() / ref_s.norm()).item()
                    us = time_graph(lambda i: norm_gemv(x, ws[i % len(ws)], swiglu=True))
                    emit(dict(base, m=m, impl="swiglu_gemv", us=us, floor_frac=floor_us / us, rel_err=err))
                    us = time_graph(lambda i: fused.swiglu(norm_gemv(x, ws[i % len(ws)]), n // 2))
                    emit(dict(base, m=m, impl="gemv_then_swiglu", us=us, floor_frac=floor_us / us))
                for cfg in NORM_GEMV_GRID:
                    if time.time() > deadline:
                        emit(dict(base, m=m, impl="stopped", reason="--seconds reached"))
                        return
                    try:
                        out = norm_gemv(x, ws[0], norm_weight=g, swiglu=swiglu, **cfg).float()
                        err = ((out - ref).norm() / ref.norm()).item()
                        us = time_graph(lambda i: norm_gemv(x, ws[i % len(ws)], norm_weight=g, swiglu=swiglu, **cfg))
                    except Exception as e:  # a config Triton cannot build (shared memory) or a bad split
                        emit(dict(base, m=m, impl="norm_gemv", **cfg, error=str(e)[:200]))
                        continue
                    emit(dict(base, m=m, impl="norm_gemv", **cfg, us=us, floor_frac=floor_us / us, rel_err=err))
                    if layer == "qkv":  # the kernel as wqkv's plain GEMV (the norm left to its compiled kernel)
                        us = time_graph(lambda i: norm_gemv(x, ws[i % len(ws)], **cfg))
                        emit(dict(base, m=m, impl="norm_gemv_no_norm", **cfg, us=us, floor_frac=floor_us / us))
            del ws
            torch.cuda.empty_cache()


STREAM_GRID = [dict(block_n=bn, block_k=bk, stages=st) for bn in (16, 32, 64) for bk in (128, 256) for st in (4, 8)
               if bn * bk * st * 2 <= 128 << 10]  # shared memory a program


def fused_cases(emit, base: dict, x, ws: list, gated: bool, sms: int) -> None:
    """stream_gemv with the norm (and SwiGLU when gated) folded in, at the runtime's configuration, against the
    steps it replaces (fused_ops' compiled RMSNorm, stream_gemv, compiled SwiGLU) and the plain GEMV alone; no
    PDL, so each launch waits for the one before (what the fold costs inside the kernel)."""
    from overlap.fused_ops import fused_ops
    from overlap.kernels.stream_gemv import config, reference, stream_gemv

    ops = fused_ops()
    n, k = ws[0].shape
    g = (1 + 0.1 * torch.randn(k, device="cuda")).bfloat16()
    fold = config(n, k, sms, swiglu=gated)
    plain = config(n, k, sms)
    ref = reference(x, ws[0], norm_weight=g, swiglu=gated).float()

    def steps(i):
        y = stream_gemv(ops.norm(x, g, 1e-5), ws[i % len(ws)], **plain)
        return ops.swiglu(y, n // 2) if gated else y

    runs = {"stream_gemv_fused": lambda i: stream_gemv(x, ws[i % len(ws)], norm_weight=g, swiglu=gated, **fold),
            "compiled_steps": steps, "stream_gemv_plain": lambda i: stream_gemv(x, ws[i % len(ws)], **plain)}
    for impl, fn in runs.items():
        err = None if impl == "stream_gemv_plain" else ((fn(0).float() - ref).norm() / ref.norm()).item()
        us = time_graph(fn)
        emit(dict(base, impl=impl, **(fold if impl == "stream_gemv_fused" else plain), norm=impl != "stream_gemv_plain",
                  swiglu=gated and impl != "stream_gemv_plain", us=us, floor_frac=base["floor_us"] / us, rel_err=err))


def stream_gemv_cases(emit, tps=(4, 8), deadline: float = float("inf")) -> None:
    """overlap.kernels.stream_gemv at M = 1 against the Triton GEMV the runtime runs without it (gemv_op for wqkv
    and w13, gemv_down_op for wo and w2), both without PDL (back to back: what the shared-memory ring costs or
    saves by itself; its point, the copies before the PDL wait, shows only in the step): the runtime's config
    and STREAM_GRID with split-K 1, 2, 4, 8 where the shares divide K and give 0.5 to 4 programs an SM."""
    from overlap.floors import measure_rates
    from overlap.kernel_bench import llama70b_layers
    from overlap.kernels.norm_gemv import gemv_down_op, gemv_op
    from overlap.kernels.stream_gemv import config, reference, stream_gemv

    rates = measure_rates(torch.device("cuda"))
    emit(dict(piece="rates", **rates))
    bw = rates["copy_tbps"] * 1e12
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(4)
    for tp in tps:
        for layer, (style, k, n) in llama70b_layers(tp).items():
            ws = copies((n, k), torch.bfloat16, gen)
            x = torch.randn(1, k, generator=gen, device="cuda").bfloat16()
            ref = reference(x, ws[0]).float()
            base = dict(piece="stream_gemv", tp=tp, layer=layer, n=n, k=k, m=1, floor_us=n * k * 2 / bw * 1e6)
            now = gemv_down_op if style == "row" else gemv_op
            us = time_graph(lambda i: now(x, ws[i % len(ws)]))
            emit(dict(base, impl="triton_gemv", us=us, floor_frac=base["floor_us"] / us))
            if style == "col":  # what the runtime runs there: the norm (and at gate_up SwiGLU) folded in
                fused_cases(emit, base, x, ws, layer == "gate_up", sms)
            cfgs = [dict(config(n, k, sms), runtime=True)]
            cfgs += [dict(c, split_k=s) for c in STREAM_GRID for s in (1, 2, 4, 8) if k % (c["block_k"] * s) == 0
                     and sms // 2 <= -(-n // c["block_n"]) * s <= 4 * sms]  # programs: half a wave to 4 an SM
            for cfg in cfgs:
                if time.time() > deadline:
                    emit(dict(base, impl="stopped", reason="--seconds reached"))
                    return
                args = {key: v for key, v in cfg.items() if key != "runtime"}
                try:
                    err = ((stream_gemv(x, ws[0], **args).float() - ref).norm() / ref.norm()).item()
                    us = time_graph(lambda i: stream_gemv(x, ws[i % len(ws)], **args))
                except Exception as e:  # a config Triton cannot build
                    emit(dict(base, impl="stream_gemv", **cfg, error=str(e)[:200]))
                    continue
                emit(dict(base, impl="stream_gemv", **cfg, us=us, floor_frac=base["floor_us"] / us, rel_err=err))
            del ws
            torch.cuda.empty_cache()


PDL_WAIT_PROGRAMS = (0, 16, 128, 528)  # waiter programs: none, one a decode row, 8 a row, 4 an SM of 132


@functools.cache
def _waiter():
    """The waiter kernel (defined once, on first use: Triton is imported only where it runs): program p waits for the
    previous kernel, lets the next launch, then reads row p % M of y (M, N) and stores its sum of squares; HEAVY
    reads the row in one (BLOCK,) fp32 tile (registers held from launch), else BLOCK // 8 columns of it."""
    import triton
    import triton.language as tl

    @triton.jit
    def waiter_kernel(y_ptr, out_ptr, M, N, BLOCK: tl.constexpr, HEAVY: tl.constexpr, GDC: tl.constexpr):
        p = tl.program_id(0)
        if GDC:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        width: tl.constexpr = BLOCK if HEAVY else BLOCK // 8
        offs = tl.arange(0, width)
        v = tl.load(y_ptr + (p % M) * N + offs, mask=offs < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + p, tl.sum(v * v, axis=0))

    return waiter_kernel


def waiter(y: torch.Tensor, out: torch.Tensor, programs: int, heavy: bool, pdl: bool) -> None:
    """out[p] = sum of squares of (the first N, or N / 8 without heavy, columns of) y's row p % M, p < programs."""
    import triton

    M, N = y.shape
    _waiter()[(programs,)](y, out, M, N, BLOCK=triton.next_power_of_2(N), HEAVY=heavy, GDC=pdl and y.is_cuda,
                           **({"launch_pdl": True} if pdl and y.is_cuda else {}))


def pdl_wait_cases(emit) -> None:
    """Section 6 of the module's docstring."""
    from overlap.floors import measure_rates
    from overlap.kernel_bench import llama70b_layers
    from overlap.kernels.norm_gemv import gemv_down_op

    rates = measure_rates(torch.device("cuda"))
    emit(dict(piece="rates", **rates))
    bw = rates["copy_tbps"] * 1e12
    gen = torch.Generator(device="cuda").manual_seed(6)
    out = torch.empty(max(PDL_WAIT_PROGRAMS), device="cuda")
    for layer, (style, k, n) in llama70b_layers(4).items():
        if style != "row":  # wo and w2
            continue
        ws = copies((n, k), torch.bfloat16, gen)
        x = torch.randn(16, k, generator=gen, device="cuda").bfloat16()
        y0 = gemv_down_op(x, ws[0], pdl=True)  # what the waiters alone read
        base = dict(piece="pdl_wait", tp=4, layer=layer, n=n, k=k, m=16, floor_us=n * k * 2 / bw * 1e6)
        for heavy in (False, True):
            for programs in PDL_WAIT_PROGRAMS:
                if programs == 0 and heavy:
                    continue

                def call(i, programs=programs, heavy=heavy):
                    y = gemv_down_op(x, ws[i % len(ws)], pdl=True)
                    if programs:
                        waiter(y, out, programs, heavy, pdl=True)

                def alone(i, programs=programs, heavy=heavy):  # waiters back to back, each waiting for the last
                    waiter(y0, out, programs, heavy, pdl=True)

                pair = time_graph(call)
                tail = time_graph(alone) if programs else 0.0
                emit(dict(base, waiter="none" if not programs else "heavy" if heavy else "light", programs=programs,
                          us=pair, waiter_alone_us=tail))
        del ws
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", choices=("gemv", "attention", "attention_peers", "weights", "norm_gemv", "stream_gemv", "pdl_wait"))
    parser.add_argument("--tp", type=int, nargs="+", default=[4, 8], help="norm_gemv: the shards' degrees")
    parser.add_argument("--seconds", type=float, default=float("inf"),
                        help="norm_gemv, stream_gemv: stop after this long")
    a = parser.parse_args()
    from spd.run import git_commit

    import sys

    import triton

    prov = dict(schema="spd.decode_micro/1", device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, command="python " + " ".join(sys.argv), commit=git_commit(), time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    a.out.parent.mkdir(parents=True, exist_ok=True)

    def emit(rec):
        rec = {**rec, **prov}
        with open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()
                       if k not in prov), flush=True)

    if a.only in (None, "attention"):
        attention_cases(emit)
    if a.only in (None, "attention_peers"):
        attention_peer_cases(emit)
    if a.only in (None, "weights"):
        weight_cases(emit)
    if a.only in (None, "gemv"):
        gemv_cases(emit)
    if a.only in (None, "norm_gemv"):
        norm_gemv_cases(emit, a.tp, time.time() + a.seconds)
    if a.only in (None, "stream_gemv"):
        stream_gemv_cases(emit, a.tp, time.time() + a.seconds)
    if a.only in (None, "pdl_wait"):
        pdl_wait_cases(emit)


if __name__ == "__main__":
    main()
