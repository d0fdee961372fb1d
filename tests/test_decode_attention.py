"""overlap.decode_attention: the Triton decode pass (RoPE + cache write + flash-decoding) against plain torch.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported, so each
case runs in a fresh subprocess: this file, run as a script). On a GPU (marked gpu) they run compiled, in
bf16 and fp32, at LLaMA-2-70B's per-rank attention shape at TP 4 and inside the runtime's CUDA graphs.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys

import pytest
import torch

from interpreted import run_interpreted

FP32_TOL = 1e-5  # fp32 (IEEE dots) in another summation order than torch's; values O(1)
BF16_VS_EAGER = 1.0  # bf16: the kernel (fp32 softmax, one rounding of q and k) may be no farther from fp32 than eager bf16
GPU_FP32_TOL = 1e-4  # fp32 on a GPU: cuBLAS and Triton reduce in other orders


def run_case(case: str) -> dict:
    return run_interpreted(__file__, case)


def test_num_splits_cover_the_rows_before_p_in_whole_tiles_in_one_wave():
    from overlap.decode_attention import BLOCK_N, SMALL_BLOCK_N, chunk_tiles, num_splits

    for bkv, L, sms in [(2, 2112, 132), (32, 2112, 132), (1, 64, 132), (3, 200, 4), (8, 100000, 132)]:
        n, block = num_splits(bkv, L, sms)
        assert bkv * n <= max(bkv, 2 * sms)  # at most two programs per SM, at least one chunk per pair
        assert n <= -(-L // block)  # no more chunks than tiles
        for pos in {0, 1, block, L // 3, L - 1}:
            per = chunk_tiles(pos, n, block)  # chunk s: rows [s per block, min((s + 1) per block, pos))
            assert n * per * block >= pos and (pos == 0 or n * (per - 1) * block < pos), (bkv, L, pos, n, per)
        # the small tile only where one BLOCK_N tile a program leaves SMs idle
        assert block == (SMALL_BLOCK_N if bkv * -(-L // BLOCK_N) < sms else BLOCK_N), (bkv, L, sms, block)
    assert num_splits(2, 2112, 132) == (66, 32)  # batch 1 at LLaMA-2-70B's TP-4 shard: a program an SM
    assert num_splits(32, 2112, 132) == (8, BLOCK_N)  # batch 16: 256 programs, one wave of two an SM
    assert chunk_tiles(2048, 8, BLOCK_N) == 4  # position 2048: 32 tiles before p, 4 a chunk


def test_kernel_equals_reference_in_the_interpreter():
    out = run_case("kernel")
    assert out["max_err"] < FP32_TOL and out["cache_err"] < FP32_TOL, out
    assert out["cases"] >= 9
    assert out["loop_tiles"] > 0, out  # some chunk ran the pipelined loop over more than one tile
    assert out["blocks"] == [32, 64], out  # both tiles: the small one where few pairs would leave SMs idle


def test_runtime_decode_with_the_kernel_equals_eager_in_the_interpreter():
    out = run_case("runtime")
    assert out["max_err"] < FP32_TOL and out["kernel_calls"] == 8 * 2, out  # 8 decode steps x 2 blocks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_kernel_on_gpu_llama2_70b_tp4_shape():
    """16 query heads, 2 KV heads, Dh 128 (LLaMA-2-70B at TP 4), batch 1 and 16, positions across the cache."""
    pytest.importorskip("triton")
    from overlap.decode_attention import decode_attention_rope, decode_reference

    for B, pos in [(1, 0), (1, 2048), (16, 777), (16, 2111)]:
        ins = make_inputs(B, 16, 2, 128, 2112, pos, "cuda", torch.float32, seed=pos)
        ref_out, ref_k, ref_v = run(decode_reference, ins)
        out, k, v = run(decode_attention_rope, ins)
        assert (out - ref_out).abs().max().item() < GPU_FP32_TOL
        assert (k - ref_k).abs().max().item() < GPU_FP32_TOL and torch.equal(v, ref_v)
        out_pdl, k_pdl, v_pdl = run(functools.partial(decode_attention_rope, pdl=True), ins)  # PDL: same kernels
        assert torch.equal(out_pdl, out) and torch.equal(k_pdl, k) and torch.equal(v_pdl, v)
        bf = {n: t.bfloat16() if torch.is_tensor(t) and t.is_floating_point() else t for n, t in ins.items()}
        eager_bf16 = run(decode_reference, bf)[0].float()
        out_bf16, k_bf16, _ = run(decode_attention_rope, bf)
        err = lambda o: ((o.float() - ref_out).norm() / ref_out.norm()).item()  # noqa: E731
        assert err(out_bf16) <= BF16_VS_EAGER * err(eager_bf16) + 1e-3, (err(out_bf16), err(eager_bf16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_fused_runtime_decode_uses_the_kernel_and_equals_eager_on_gpu():
    """A random LLaMA with head_dim 64 (the kernel's path): fused CUDA-graph decode against eager, fp32."""
    pytest.importorskip("triton")
    from overlap.context import single
    from overlap.model import ModelArgs, Transformer
    from overlap.runtime import Runtime

    args = ModelArgs(vocab_size=512, dim=256, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=512)
    full = Transformer.from_args(args, device="cuda", dtype=torch.float32, seed=1)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(5)).cuda()
    outs = []
    for fuse in (False, True):
        rt = Runtime(copy.deepcopy(full), single("cuda:0"), 2, 128, fuse=fuse)
        assert (rt.model.layers[0].attn.ops.decode_heads is not None) == fuse
        rt.prefill(ids[:, :30])
        outs.append(torch.cat([rt.decode_one(ids[:, i : i + 1]).clone() for i in range(30, 40)], 1))
    assert (outs[0] - outs[1]).abs().max().item() < GPU_FP32_TOL


# ----------------------------------------------------------------------------------------------------
# Shared by the GPU tests and the interpreter worker.


def make_inputs(B, H, KV, Dh, L, pos, device, dtype, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    theta = pos * 10000.0 ** (-torch.arange(0, Dh, 2).double() / Dh)
    emb = torch.cat([theta, theta])
    sin = emb.sin()
    return dict(qkv=torch.randn(B, 1, (H + 2 * KV) * Dh, generator=g).to(device, dtype),
                cos=emb.cos().view(1, 1, Dh).to(device, dtype),
                sin=torch.cat([-sin[: Dh // 2], sin[Dh // 2 :]]).view(1, 1, Dh).to(device, dtype),
                pos=torch.tensor([pos], device=device),
                k=torch.randn(B, KV, L, Dh, generator=g).to(device, dtype),
                v=torch.randn(B, KV, L, Dh, generator=g).to(device, dtype), H=H, KV=KV)


def run(fn, ins: dict):
    k, v = ins["k"].clone(), ins["v"].clone()
    out = fn(ins["qkv"], ins["cos"], ins["sin"], ins["pos"], k, v, ins["H"], ins["KV"])
    return out, k, v


def _kernel_case() -> dict:
    from overlap.decode_attention import _sm_count, chunk_tiles, decode_attention_rope, decode_reference, num_splits

    errs, cache_errs, cases, loop_tiles, blocks = [], [], 0, 0, set()
    # (B, H, KV, Dh, Lmax, pos): GQA groups of 1, 3 (padded to 16 rows) and 8; p = 0 (no cache row before it:
    # only the last chunk's row p), p at and after tile edges, at the cache's last row; Lmax 600 makes chunks
    # of 2 tiles (the loop after the first tile), p = 192 of 1 (three full chunks, one empty)
    for B, H, KV, Dh, L, pos in [(1, 8, 2, 16, 200, 0), (2, 6, 2, 32, 200, 63), (2, 6, 2, 32, 200, 64),
                                 (1, 16, 2, 16, 300, 299), (3, 4, 4, 16, 130, 129), (1, 8, 1, 32, 70, 5),
                                 (1, 8, 2, 16, 600, 500), (1, 8, 2, 16, 600, 192), (1, 8, 2, 16, 600, 383)]:
        ins = make_inputs(B, H, KV, Dh, L, pos, "cpu", torch.float32, seed=pos + L)
        ref_out, ref_k, ref_v = run(decode_reference, ins)
        out, k, v = run(decode_attention_rope, ins)
        errs.append((out - ref_out).abs().max().item())
        cache_errs.append(max((k - ref_k).abs().max().item(), (v - ref_v).abs().max().item()))
        cases += 1
        n, block = num_splits(B * KV, L, _sm_count(torch.device("cpu")))
        loop_tiles += chunk_tiles(pos, n, block) > 1  # a chunk's loop ran over more than one tile
        blocks.add(block)
    return {"max_err": max(errs), "cache_err": max(cache_errs), "cases": cases, "loop_tiles": loop_tiles,
            "blocks": sorted(blocks)}


def _runtime_case() -> dict:
    """Runtime decode (eager ops) against the same with the kernel as decode_heads, fp32 on CPU."""
    import dataclasses

    from overlap.context import single
    from overlap.decode_attention import decode_attention_rope
    from overlap.model import ModelArgs, Transformer
    from overlap.ops import EAGER_OPS
    from overlap.runtime import Runtime

    torch.manual_seed(0)
    args = ModelArgs(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)
    full = Transformer.from_args(args, seed=3)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(4))
    calls = []

    def counted(*a):
        calls.append(1)
        return decode_attention_rope(*a)

    kernel_ops = dataclasses.replace(EAGER_OPS, decode_heads=counted)
    outs = []
    for ops in (EAGER_OPS, kernel_ops):
        model = copy.deepcopy(full)
        rt = Runtime(model, single("cpu"), 2, 72, cuda_graphs=False)  # sets the eager ops
        for m in model.modules():
            if hasattr(m, "ops"):
                m.ops = ops
        with torch.no_grad():
            rt.prefill(ids[:, :12])
            outs.append(torch.cat([rt.decode_one(ids[:, i : i + 1]) for i in range(12, 20)], 1))
    return {"max_err": (outs[0] - outs[1]).abs().max().item(), "kernel_calls": len(calls)}


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the tests (they set TRITON_INTERPRET=1)"
    print(json.dumps({"kernel": _kernel_case, "runtime": _runtime_case}[sys.argv[1]]()))
