"""overlap.kernels.stream_mma against its plain-torch reference on a GPU (Gluon: Triton's CPU interpreter does not
run it); on any machine its configuration and argument checks."""

from __future__ import annotations

import pytest
import torch

from overlap.kernels.checks import KernelArgError
from overlap.kernels.stream_mma import BLOCK_K, BLOCK_N, PROGRAMS_PER_SM, config, reference, stream_mma

BF16_TOL = 1e-2  # one bf16 rounding of the output (eps 3.9e-3) over fp32 sums in another order
GPU = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                         reason="needs a CUDA GPU of compute capability >= 9 (TMA, PDL)")


def test_config_splits_k_to_fill_the_sms_and_only_where_its_tiles_divide():
    for n, k, swiglu in ((2560, 8192, False), (8192, 2048, False), (14336, 8192, True), (8192, 7168, False),
                         (7168, 8192, True), (640, 384, False)):
        c = config(n, k, 132, swiglu)
        s, bk = c["split_k"], c["block_k"]
        assert bk == (BLOCK_K // 2 if swiglu else BLOCK_K) and c["block_n"] == BLOCK_N
        assert (k // bk) % s == 0
        programs = -(-(n // 2 if swiglu else n) // BLOCK_N) * (2 if swiglu else 1)
        assert s == 1 or programs * (s // 2) < PROGRAMS_PER_SM * 132
        assert programs * s >= PROGRAMS_PER_SM * 132 or (k // bk) % (s * 2)


def test_bad_arguments_say_what_is_wrong():
    w = torch.zeros(64, 256, dtype=torch.bfloat16)
    with pytest.raises(KernelArgError, match="2 to 16 rows, got x of 1"):
        stream_mma(torch.zeros(1, 256, dtype=torch.bfloat16), w)
    with pytest.raises(KernelArgError, match="2 to 16 rows, got x of 17"):
        stream_mma(torch.zeros(17, 256, dtype=torch.bfloat16), w)
    with pytest.raises(KernelArgError, match="block_k"):
        stream_mma(torch.zeros(2, 256, dtype=torch.bfloat16), w, block_k=96)
    with pytest.raises(KernelArgError, match="multiple"):
        stream_mma(torch.zeros(2, 256, dtype=torch.bfloat16), w, block_k=128, split_k=4)
    with pytest.raises(KernelArgError, match="CUDA"):
        stream_mma(torch.zeros(2, 256, dtype=torch.bfloat16), w)
    with pytest.raises(KernelArgError, match="norm_weight has shape \\(128,\\), x's rows need \\(256,\\)"):
        stream_mma(torch.zeros(2, 256, dtype=torch.bfloat16), w, norm_weight=torch.ones(128))


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("n,k", [(2560, 8192), (8192, 2048), (200, 1024)])
@pytest.mark.parametrize("m", [2, 5, 16])
@pytest.mark.parametrize("split_k", [1, 4])
@pytest.mark.parametrize("pdl", [False, True])
def test_matches_plain_torch_on_the_gpu(n, k, m, split_k, pdl):
    """bf16, N not always a multiple of BLOCK_N, M below 16 (the padded rows must not leak), with a residual."""
    g = torch.Generator(device="cuda").manual_seed(n + k + m)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
    ref = x.float() @ w.float().T
    out = stream_mma(x, w, pdl=pdl, split_k=split_k).float()
    assert out.shape == (m, n)
    assert ((out - ref).norm() / ref.norm()).item() < BF16_TOL
    r = torch.randn(m, n, device="cuda", generator=g).bfloat16()
    ref_r = ref + r.float()
    out_r = stream_mma(x, w, pdl=pdl, split_k=split_k, residual=r).float()
    assert ((out_r - ref_r).norm() / ref_r.norm()).item() < BF16_TOL
    for i in range(m):  # every row its own: a row mix-up would pass the norm above only by luck
        assert ((out_r[i] - ref_r[i]).norm() / ref_r[i].norm()).item() < BF16_TOL


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("n,k", [(2560, 8192), (14336, 8192), (200, 1024)])
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("m", [3, 16])
def test_norm_and_swiglu_match_the_unfused_steps_on_the_gpu(n, k, swiglu, split_k, m):
    """With the norm folded in (and SwiGLU of [gate; up] rows): against the unfused steps in plain torch; rows
    of different scales and norm weights away from 1, so a missing or mixed-up rstd or g fails."""
    g = torch.Generator(device="cuda").manual_seed(n + k + split_k + m)
    x = (torch.randn(m, k, device="cuda", generator=g) * torch.arange(1, m + 1, device="cuda")[:, None]).bfloat16()
    nw = (1 + 0.5 * torch.randn(k, device="cuda", generator=g)).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
    ref = reference(x, w, norm_weight=nw, eps=1e-5, swiglu=swiglu).float()
    out = stream_mma(x, w, norm_weight=nw, eps=1e-5, swiglu=swiglu, split_k=split_k, pdl=True).float()
    assert out.shape == (m, n // 2 if swiglu else n)
    for i in range(m):
        assert ((out[i] - ref[i]).norm() / ref[i].norm()).item() < BF16_TOL


@pytest.mark.gpu
@GPU
@torch.no_grad()
def test_runtime_with_stream_gemv_decodes_batch_16_like_without_it():
    """Runtime(stream_gemv=True) at batch 16 (every decode GEMV through stream_mma, norms and SwiGLU folded in,
    CUDA graphs, PDL) against Runtime(pdl=True) alone: logits within twice the Triton GEMV's distance from
    cuBLAS's (bf16 noise of sums in another order; a wrong tile or row would be off by O(1))."""
    from overlap.context import single
    from overlap.model import ModelArgs, Transformer
    from overlap.runtime import Runtime

    args = ModelArgs(vocab_size=1024, dim=1024, n_layers=4, n_heads=16, n_kv_heads=2, ffn_dim=3584)
    full = Transformer.from_args(args, device="cuda", dtype=torch.bfloat16, seed=5)
    ids = torch.randint(0, 1024, (16, 40), generator=torch.Generator().manual_seed(6)).cuda()
    outs = {}
    for name, flags in (("cublas", {}), ("pdl", dict(triton_gemv=True, pdl=True, swiglu_gemv=True)),
                        ("stream", dict(triton_gemv=True, pdl=True, swiglu_gemv=True, stream_gemv=True))):
        rt = Runtime(full, single("cuda:0"), 16, 64, fuse=True, **flags)
        rt.prefill(ids[:, :16])
        outs[name] = torch.cat([rt.decode_one(ids[:, i : i + 1]).float() for i in range(16, 40)], 1)

    def err(a, b):
        return ((outs[a] - outs[b]).norm() / outs[b].norm()).item()

    noise = err("pdl", "cublas")
    assert 0 < err("stream", "pdl") <= 2 * noise + 1e-3, (err("stream", "pdl"), noise)
    assert err("stream", "pdl") < 2e-2
