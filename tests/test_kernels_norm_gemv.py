"""overlap.kernels.norm_gemv against its plain-torch reference: on CPU through Triton's interpreter (fp32,
a fresh subprocess with TRITON_INTERPRET=1, as tests/test_kernels_interpret.py), on a GPU in bf16."""

from __future__ import annotations

import itertools
import json
import os
import sys

import pytest
import torch

from interpreted import run_interpreted
from overlap.kernels.norm_gemv import PROGRAMS_PER_SM, auto_split_k

FP32_TOL = 1e-4  # fp32 dot products of length <= 300 summed in another order than torch's
# (M, N, K): one decode row, a few, the 16-row tile; N and K not multiples of the blocks
SHAPES = [(1, 48, 200), (3, 40, 130), (16, 64, 300)]


def test_auto_split_k_fills_the_sms_without_splitting_past_k():
    assert auto_split_k(tiles=200, k_blocks=64, sm_count=132) == 2  # 400 >= 264 programs
    assert auto_split_k(tiles=300, k_blocks=64, sm_count=132) == 1
    assert auto_split_k(tiles=20, k_blocks=64, sm_count=132) == 16  # 320 >= 264
    assert auto_split_k(tiles=20, k_blocks=4, sm_count=132) == 4  # no more shares than K blocks
    for programs in (1, 7, 80, 500):
        s = auto_split_k(programs, 64, 132)
        assert programs * s >= PROGRAMS_PER_SM * 132 or s * 2 > 64
        assert s == 1 or programs * (s // 2) < PROGRAMS_PER_SM * 132  # the smallest such power of two


def test_w13_splits_alike_with_swiglu_or_without(monkeypatch):
    """A SwiGLU program reads a gate and an up tile, so it counts twice toward the split-K target: w13 at the
    R = 4 shard, 16 rows, splits in 2 either way (with SwiGLU counted once it split in 4, and measured 1.9 ms
    slower a decode step on an H200 than in 2: docs/benchmarks/pdl.md). Launches recorded, nothing run."""
    import overlap.kernels.norm_gemv as ng

    grids = []

    class Launcher:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: grids.append(grid)

    monkeypatch.setattr(ng, "norm_gemv_kernel", Launcher())
    monkeypatch.setattr(ng, "split_k_reduce_kernel", Launcher())
    x, w13 = torch.zeros(16, 512), torch.zeros(896, 512)  # 14 tiles of 64 rows: 7 gate + 7 up
    ng.norm_gemv(x, w13, swiglu=True, sm_count=14)  # target 2 * 14 = 28 tiles in flight
    ng.norm_gemv(x, w13, sm_count=14)
    kernels = [g for g in grids if len(g) == 2]  # (programs, split_k); the reduce's grids are 1-d
    assert kernels == [(7, 2), (14, 2)], grids


def run_case(case: str) -> dict:
    return run_interpreted(__file__, case)


def test_matches_the_unfused_steps_in_the_interpreter():
    cases = run_case("kernel")
    assert len(cases) == len(SHAPES) * 2 * 2 * 3 * 2  # norm x swiglu x split_k x pdl (with pdl: a residual)
    assert {case["split_k"] for case in cases if case["residual"]} == {1, 2, "auto"}
    for case in cases:
        assert case["err"] < FP32_TOL, case
        assert case["shape"] == case["ref_shape"], case


def test_runtime_decode_with_the_kernel_equals_eager_in_the_interpreter():
    """Every use of the kernel in the runtime: Ops.norm_linear (norm + wqkv, norm + w13 + SwiGLU), Ops.gemv
    (wqkv and w13 alone), Ops.swiglu_gemv (w13 + SwiGLU), Ops.gemv_down (wo and w2), all but norm_linear at
    once with pdl (the peeled first tile), and norm_linear with gemv_down, with pdl; every decode step of every block calls each as often as it has
    weights, and prefill rows never."""
    out = run_case("runtime")
    for use, per_block in (("norm_linear", 2), ("gemv", 2), ("swiglu_gemv", 1), ("gemv_down", 2),
                           ("pdl", 4), ("norm_linear_pdl", 4)):  # with pdl: wqkv, w13 (+ SwiGLU), wo, w2
        assert out[use]["max_err"] < FP32_TOL, out
        assert out[use]["kernel_calls"] == out["steps_x_blocks"] * per_block, out


def test_bad_arguments_say_what_is_wrong():
    from overlap.kernels.checks import KernelArgError
    from overlap.kernels.norm_gemv import norm_gemv

    x, w = torch.randn(2, 64), torch.randn(33, 64)
    with pytest.raises(KernelArgError, match="swiglu needs w's rows to be \\[gate; up\\]"):
        norm_gemv(x, w, swiglu=True)
    with pytest.raises(KernelArgError, match="norm_weight has shape \\(32,\\), x's rows need \\(64,\\)"):
        norm_gemv(x, w, norm_weight=torch.ones(32))
    with pytest.raises(KernelArgError, match="split_k=9; valid: 'auto' or 1..1"):
        norm_gemv(x, w, split_k=9)
    with pytest.raises(KernelArgError, match="preload=3; valid: 0 or a power of two"):
        norm_gemv(x, w, pdl=True, preload=3)
    with pytest.raises(KernelArgError, match="17"):
        norm_gemv(torch.randn(17, 64), w)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("flags", ["triton_gemv", "swiglu_gemv", "triton_gemv,pdl", "triton_gemv,swiglu_gemv,pdl",
                                   "triton_gemv,norm_gemv,pdl", "triton_gemv,norm_gemv,pdl,stream_gemv"])
@torch.no_grad()
def test_runtime_with_the_kernel_decodes_like_cublas_on_the_gpu(flags):
    """Runtime(fuse=True, <flags>=True) (decode's wqkv and w13, or w13 + SwiGLU, through this kernel; with pdl
    every GEMV, launched with programmatic dependent launch; CUDA graphs) against the same with cuBLAS, bf16, a
    4-block random model of 70B-like proportions: logits within bf16 rounding noise and the same greedy tokens."""
    from overlap.context import single
    from overlap.model import ModelArgs, Transformer
    from overlap.runtime import Runtime

    args = ModelArgs(vocab_size=1024, dim=1024, n_layers=4, n_heads=16, n_kv_heads=2, ffn_dim=3584)
    full = Transformer.from_args(args, device="cuda", dtype=torch.bfloat16, seed=5)
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(6)).cuda()
    outs = {}
    for kernel in (False, True):
        rt = Runtime(full, single("cuda:0"), 2, 64, fuse=True, **{"triton_gemv": False,
                                                                  **{flag: kernel for flag in flags.split(",")}})
        rt.prefill(ids[:, :16])
        outs[kernel] = torch.cat([rt.decode_one(ids[:, i : i + 1]).float() for i in range(16, 24)], 1)
    err = ((outs[True] - outs[False]).norm() / outs[False].norm()).item()
    assert err < 2e-2, err  # bf16 outputs (eps 3.9e-3) of sums in another order, over 4 blocks
    assert (outs[True].argmax(-1) == outs[False].argmax(-1)).float().mean() >= 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 16])
def test_bf16_on_the_gpu_matches_the_unfused_steps(m):
    from overlap.kernels.norm_gemv import norm_gemv, reference

    g = torch.Generator(device="cuda").manual_seed(0)
    for n, k, swiglu in ((2560, 8192, False), (2 * 7168, 8192, True), (2 * 3584, 8192, True)):  # 70B R = 4, 8
        x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
        gw = (1 + 0.1 * torch.randn(k, device="cuda", generator=g)).bfloat16()
        ref = reference(x, w, norm_weight=gw, swiglu=swiglu).float()
        for split_k, pdl in itertools.product((1, 4, "auto"), (False, True)):
            out = norm_gemv(x, w, norm_weight=gw, swiglu=swiglu, split_k=split_k, pdl=pdl).float()
            # bf16 outputs: a rounding step apart at most where the fp32 sums differ in their last bits
            assert torch.allclose(out, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()), (n, split_k, pdl)


def _interpreted() -> list[dict]:
    from overlap.kernels.norm_gemv import norm_gemv, reference

    out = []
    for i, (m, n, k) in enumerate(SHAPES):
        gen = torch.Generator().manual_seed(i)
        x, w = torch.randn(m, k, generator=gen), torch.randn(2 * n, k, generator=gen)
        gw = 1 + 0.1 * torch.randn(k, generator=gen)
        for norm in (None, gw):
            for swiglu in (False, True):
                r = torch.randn(m, n if swiglu else 2 * n, generator=gen)
                for split_k, pdl in itertools.product((1, 2, "auto"), (False, True)):  # pdl: first tile peeled
                    residual = r if pdl else None  # added in the epilogue (the reduce's with split-K)
                    y = norm_gemv(x, w, norm_weight=norm, swiglu=swiglu, split_k=split_k, block_k=32, sm_count=4,
                                  pdl=pdl, residual=residual)
                    ref = reference(x, w, norm_weight=norm, swiglu=swiglu, residual=residual)
                    err = ((y - ref).abs().max() / ref.abs().max()).item()
                    out.append({"m": m, "n": n, "k": k, "norm": norm is not None, "swiglu": swiglu, "pdl": pdl,
                                "split_k": split_k, "residual": residual is not None, "err": err,
                                "shape": list(y.shape), "ref_shape": list(ref.shape)})
    return out


def _runtime() -> dict:
    """Runtime decode (eager ops) against the same with each Ops field of the kernel set to it (one at a time,
    then gemv, swiglu_gemv and gemv_down at once with pdl, and norm_linear with gemv_down with pdl), fp32, one baseline and one SPD block
    (overlap.tp.set_plan_ at R = 1 marks it; with norm_linear its arithmetic is forward_norm_linear's SPD branch)."""
    import copy
    import dataclasses
    import functools

    from overlap.context import single
    from overlap.kernels.norm_gemv import gemv_down_op, gemv_op, norm_linear_op, swiglu_gemv_op
    from overlap.model import ModelArgs, Transformer
    from overlap.runtime import Runtime

    args = ModelArgs(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)
    full = Transformer.from_args(args, seed=3)
    full.layers[1].spd = True
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(4))
    pdl = {f: functools.partial(fn, pdl=True)
           for f, fn in (("gemv", gemv_op), ("swiglu_gemv", swiglu_gemv_op), ("gemv_down", gemv_down_op))}
    uses = {"norm_linear": {"norm_linear": norm_linear_op}, "gemv": {"gemv": gemv_op},
            "swiglu_gemv": {"swiglu_gemv": swiglu_gemv_op}, "gemv_down": {"gemv_down": gemv_down_op}, "pdl": pdl,
            "norm_linear_pdl": {"norm_linear": functools.partial(norm_linear_op, pdl=True),
                                "gemv_down": pdl["gemv_down"]}}
    calls = {use: [] for use in uses}

    def counted(use, fn):
        def call(*a, **kw):
            calls[use].append(1)
            return fn(*a, **kw)
        return call

    outs = {}
    for use in (None, *uses):
        model = copy.deepcopy(full)
        rt = Runtime(model, single("cpu"), 2, 72, cuda_graphs=False)  # eager ops
        if use:
            ops = dataclasses.replace(model.layers[0].ops, **{f: counted(use, fn) for f, fn in uses[use].items()})
            for m in model.modules():
                if hasattr(m, "ops"):
                    m.ops = ops
        with torch.no_grad():
            rt.prefill(ids[:, :12])  # 24 rows: the unfused path
            outs[use] = torch.cat([rt.decode_one(ids[:, i : i + 1]) for i in range(12, 20)], 1)
    scale = outs[None].abs().max().item()
    return {**{use: {"max_err": (outs[None] - outs[use]).abs().max().item() / scale, "kernel_calls": len(calls[use])}
               for use in calls}, "steps_x_blocks": 8 * args.n_layers}


@pytest.mark.parametrize("after", [False, True])
def test_split_k_reduce_lets_the_next_kernel_launch_before_or_after_its_wait(after):
    """The reduce's PDL order, checked in its sm_90 PTX on any machine: launch_dependents before
    griddepcontrol.wait by default (norm_gemv's), after it with LAUNCH_AFTER_WAIT (stream_gemv's)."""
    from overlap.kernels.norm_gemv import split_k_reduce_kernel

    sig = {"part_ptr": "*fp32", "ss_ptr": "*fp32", "y_ptr": "*bf16", "r_ptr": "*bf16", "M": "i32", "N_OUT": "i32",
           "K": "i32", "eps": "fp32", "BLOCK": "constexpr", "NORM": "constexpr", "SWIGLU": "constexpr",
           "SPLIT_K": "constexpr", "GDC": "constexpr", "LAUNCH_AFTER_WAIT": "constexpr", "RESIDUAL": "constexpr"}
    consts = {"BLOCK": 256, "NORM": True, "SWIGLU": False, "SPLIT_K": 4, "GDC": True, "LAUNCH_AFTER_WAIT": after,
              "RESIDUAL": True}
    ptx = _sm90_ptx(split_k_reduce_kernel, sig, consts)
    wait, launch = ptx.index("griddepcontrol.wait"), ptx.index("griddepcontrol.launch_dependents")
    assert (launch > wait) == after


def test_with_pdl_and_no_preload_every_load_comes_after_the_wait():
    """In the kernel's sm_90 PTX: with PDL and no weight tile loaded before the wait (preload=0), the kernel
    still waits for the previous kernel (whose output x is), before its first global load, and lets the next
    kernel launch only after that."""
    from overlap.kernels.norm_gemv import norm_gemv_kernel

    ptrs = {"x_ptr": "*bf16", "g_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "r_ptr": "*bf16",
            "part_ptr": "*fp32", "ss_ptr": "*fp32"}
    ints = {k: "i32" for k in ("M", "N_OUT", "K", "K_SHARE", "stride_xm", "stride_wn")}
    consts = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "NORM": False, "SWIGLU": False, "SPLIT_K": 1,
              "PRELOAD": 0, "GDC": True, "RESIDUAL": True, "TMA": False}
    sig = {**ptrs, **ints, "eps": "fp32", **{k: "constexpr" for k in consts}}
    ptx = _sm90_ptx(norm_gemv_kernel, sig, consts, num_warps=4)
    assert ptx.count("griddepcontrol.wait") == 1, "no wait for the previous kernel"
    wait = ptx.index("griddepcontrol.wait")
    loads = [i for i in range(len(ptx)) if ptx.startswith("ld.global", i) or ptx.startswith("cp.async", i)]
    assert loads and min(loads) > wait
    assert ptx.index("griddepcontrol.launch_dependents") > wait


def _sm90_ptx(kernel, sig: dict, consts: dict, **options) -> str:
    """The kernel's PTX for sm_90, compiled ahead of time on any machine (ptxas ships with Triton) with the
    runtime's compile options; the test skips where this Triton's private compile API differs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from overlap.kernels.compile_options import FP_FUSION

    try:
        src = ASTSource(kernel, sig, consts)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={**options, **FP_FUSION}).asm["ptx"]
    except (TypeError, ValueError, AttributeError) as e:  # Triton's private API moved
        pytest.skip(f"this Triton's ahead-of-time compile differs: {e}")


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the tests (they set TRITON_INTERPRET=1)"
    print(json.dumps({"kernel": _interpreted, "runtime": _runtime}[sys.argv[1]]()))
