"""overlap.kernels.row_norm against F.rms_norm (overlap.ops.rms_norm): on CPU through Triton's interpreter (fp32,
a fresh subprocess with TRITON_INTERPRET=1), on a GPU in bf16; its place in the runtime's decode step."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from interpreted import run_interpreted

FP32_TOL = 1e-5
# (M, K, chunk, max_block): one row, a few, the 16-row tile; K not a multiple of the chunk; a K above the
# statistics' block (a loop of 3 loads)
CASES = [(1, 64, 16, 8192), (3, 300, 128, 8192), (16, 1000, 256, 8192), (5, 200, 64, 64)]


def test_matches_rms_norm_in_the_interpreter():
    out = run_interpreted(__file__, "kernel")
    assert [c["case"] for c in out["cases"]] == [list(c) for c in CASES]
    for case in out["cases"]:
        assert case["err"] < FP32_TOL, case
    assert out["runtime"]["max_err"] < FP32_TOL, out
    # per decode step: block 0's attn_norm and mlp_norm, SPD block 1's attn_norm (its mlp norm is add_norm's),
    # the final norm; 8 steps; the prefill's 24 rows never
    assert out["runtime"]["kernel_calls"] == 8 * 4, out


def test_bad_arguments_say_what_is_wrong():
    from overlap.kernels.checks import KernelArgError
    from overlap.kernels.row_norm import row_norm

    with pytest.raises(KernelArgError, match="handles 1..16 rows .*got 17; more rows take overlap.ops.rms_norm"):
        row_norm(torch.randn(17, 64), torch.ones(64), 1e-5)
    with pytest.raises(KernelArgError, match="weight has shape \\(32,\\), x's rows need \\(64,\\)"):
        row_norm(torch.randn(2, 64), torch.ones(32), 1e-5)
    with pytest.raises(KernelArgError, match="x needs unit stride along K"):
        row_norm(torch.randn(64, 2).t(), torch.ones(64), 1e-5)
    with pytest.raises(KernelArgError, match="chunk=48; valid: a power of two >= 16"):
        row_norm(torch.randn(2, 64), torch.ones(64), 1e-5, chunk=48)


def test_the_step_with_pdl_routes_its_norms_here(monkeypatch):
    """Transformer.set_fused_(pdl=True) puts decode_norm in front of the compiled norm (row_norm.WITH_PDL), and
    not without PDL or with WITH_PDL off."""
    from overlap.kernels import row_norm
    from overlap.model import ModelArgs, Transformer

    model = Transformer.from_args(ModelArgs(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=48))
    routed = lambda: model.layers[0].ops.norm.__qualname__.startswith("decode_norm")  # noqa: E731
    model.set_fused_(on=True, triton_gemv=True, pdl=True)
    assert routed() and model.norm.ops is model.layers[0].ops
    model.set_fused_(on=True, triton_gemv=True)
    assert not routed()
    monkeypatch.setattr(row_norm, "WITH_PDL", False)
    model.set_fused_(on=True, triton_gemv=True, pdl=True)
    assert not routed()


def test_pdl_waits_before_its_first_load_and_lets_the_next_kernel_launch_at_once():
    """In the sm_90 PTX (compiled on any machine): one griddepcontrol.wait before the first global load (x is
    the previous kernel's output), launch_dependents right after it."""
    from test_kernels_norm_gemv import _sm90_ptx

    from overlap.kernels.row_norm import row_norm_kernel

    sig = {"x_ptr": "*bf16", "g_ptr": "*bf16", "y_ptr": "*bf16", "K": "i32", "stride_x": "i32", "stride_y": "i32",
           "eps": "fp32", "BLOCK": "constexpr", "CHUNK": "constexpr", "GDC": "constexpr", "WAIT": "constexpr"}
    ptx = _sm90_ptx(row_norm_kernel, sig, {"BLOCK": 8192, "CHUNK": 1024, "GDC": True, "WAIT": True}, num_warps=4)
    wait, launch = ptx.index("griddepcontrol.wait"), ptx.index("griddepcontrol.launch_dependents")
    assert ptx.count("griddepcontrol.wait") == 1 and wait < launch < ptx.index("ld.global")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_on_the_gpu_matches_rms_norm():
    from overlap.kernels.row_norm import row_norm
    from overlap.ops import rms_norm

    g = torch.Generator(device="cuda").manual_seed(0)
    for m, k in ((1, 8192), (16, 8192), (16, 1024), (5, 10000)):
        x = torch.randn(m, k, device="cuda", generator=g).bfloat16() * 3
        w = (1 + 0.1 * torch.randn(k, device="cuda", generator=g)).bfloat16()
        ref = rms_norm(x.float(), w.float(), 1e-5)
        for pdl in (False, True):
            y = row_norm(x, w, 1e-5, pdl=pdl)
            assert y.dtype == torch.bfloat16 and y.shape == x.shape
            # one bf16 rounding of the fp32 result (F.rms_norm in bf16 may round twice)
            assert torch.allclose(y.float(), ref, rtol=1e-2, atol=1e-2), (m, k, pdl)


def _interpreted() -> dict:
    import copy
    import dataclasses

    import overlap.kernels.row_norm as rn
    from overlap.context import single
    from overlap.model import ModelArgs, Transformer
    from overlap.ops import rms_norm
    from overlap.runtime import Runtime

    gen = torch.Generator().manual_seed(0)
    cases = []
    for m, k, chunk, max_block in CASES:
        rn.MAX_BLOCK = max_block
        x, w = torch.randn(m, k, generator=gen) * 3, 1 + 0.1 * torch.randn(k, generator=gen)
        y, ref = rn.row_norm(x, w, 1e-5, chunk=chunk), rms_norm(x, w, 1e-5)
        cases.append({"case": [m, k, chunk, max_block], "err": ((y - ref).abs().max() / ref.abs().max()).item()})
    rn.MAX_BLOCK = 8192

    # the runtime's decode step (eager ops) with ops.norm through decode_norm, fp32; block 1 an SPD block
    args = ModelArgs(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)
    full = Transformer.from_args(args, seed=3)
    full.layers[1].spd = True
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(4))
    calls = []
    kernel = rn.row_norm
    rn.row_norm = lambda *a, **kw: calls.append(1) or kernel(*a, **kw)
    outs = {}
    for routed in (False, True):
        model = copy.deepcopy(full)
        rt = Runtime(model, single("cpu"), 2, 72, cuda_graphs=False)  # eager ops
        if routed:
            ops = dataclasses.replace(model.layers[0].ops, norm=rn.decode_norm(model.layers[0].ops.norm))
            for mod in model.modules():
                if hasattr(mod, "ops"):
                    mod.ops = ops
        with torch.no_grad():
            rt.prefill(ids[:, :12])  # 24 rows: the fallback
            outs[routed] = torch.cat([rt.decode_one(ids[:, i : i + 1]) for i in range(12, 20)], 1)
    err = ((outs[True] - outs[False]).abs().max() / outs[False].abs().max()).item()
    return {"cases": cases, "runtime": {"max_err": err, "kernel_calls": len(calls)}}


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the tests (they set TRITON_INTERPRET=1)"
    print(json.dumps({"kernel": _interpreted}[sys.argv[1]]()))
