"""overlap.kernels.stream_gemv against its plain-torch reference on a GPU (Gluon: Triton's CPU interpreter does
not run it); on any machine its configuration, its argument checks, and its PTX compiled ahead of time for sm_90
(the weight copies before the PDL wait)."""

from __future__ import annotations

import pytest
import torch

from overlap.kernels.checks import KernelArgError
from overlap.kernels.stream_gemv import BLOCK_K, BLOCK_N, PROGRAMS_PER_SM, STAGES, config, reference, stream_gemv

BF16_TOL = 1e-2  # one bf16 rounding of the output (eps 3.9e-3) over fp32 sums in another order


def test_config_splits_k_to_fill_the_sms_and_only_where_its_tiles_divide():
    for n, k in ((2560, 8192), (8192, 2048), (14336, 8192), (8192, 7168), (1280, 8192), (640, 384)):
        c = config(n, k, 132)
        s = c["split_k"]
        assert (c["block_n"], c["block_k"], c["stages"]) == (BLOCK_N, BLOCK_K, STAGES)
        assert (k // BLOCK_K) % s == 0  # every share has whole tiles
        programs = -(-n // BLOCK_N)
        assert s == 1 or programs * (s // 2) < PROGRAMS_PER_SM * 132  # the smallest such power of two
        assert programs * s >= PROGRAMS_PER_SM * 132 or (k // BLOCK_K) % (s * 2)  # enough, or K allows no more
    assert config(14336, 8192, 132)["split_k"] == 1  # 448 programs already


def test_bad_arguments_say_what_is_wrong():
    w = torch.zeros(64, 256, dtype=torch.bfloat16)
    with pytest.raises(KernelArgError, match="one row"):
        stream_gemv(torch.zeros(2, 256, dtype=torch.bfloat16), w)
    with pytest.raises(KernelArgError, match="block_k"):
        stream_gemv(torch.zeros(1, 256, dtype=torch.bfloat16), w, block_k=96)
    with pytest.raises(KernelArgError, match="multiple"):
        stream_gemv(torch.zeros(1, 256, dtype=torch.bfloat16), w, block_k=128, split_k=4)
    with pytest.raises(KernelArgError, match="CUDA"):
        stream_gemv(torch.zeros(1, 256, dtype=torch.bfloat16), w, block_k=128)
    with pytest.raises(KernelArgError, match="norm_weight has shape \\(128,\\), x's rows need \\(256,\\)"):
        stream_gemv(torch.zeros(1, 256, dtype=torch.bfloat16), w, norm_weight=torch.ones(128))
    with pytest.raises(KernelArgError, match="swiglu needs w's rows to be \\[gate; up\\]"):
        stream_gemv(torch.zeros(1, 256, dtype=torch.bfloat16), w[:63], swiglu=True)


def test_config_of_swiglu_halves_the_rows_of_a_tile():
    c = config(2 * 7168, 8192, 132, swiglu=True)  # w13 of the LLaMA-2-70B R = 4 shard: 448 programs of 16 + 16 rows
    assert (c["block_n"], c["split_k"]) == (BLOCK_N // 2, 1)


@torch.no_grad()
def test_runtime_routes_one_row_decode_through_the_fused_norm_and_swiglu(monkeypatch):
    """On the CPU, with stream_gemv standing in as its plain-torch reference (the kernel itself is Gluon, GPU-only):
    Transformer.set_fused_(stream_gemv=True)'s ops run a batch-1 decode step's attn_norm + wqkv and mlp_norm + w13
    + SwiGLU as one norm_linear call each, and wo and w2 as one GEMV each, with configurations the kernel takes;
    batch 2 takes the unfused steps; logits equal the eager model's (fp32) in a baseline and an SPD block."""
    import copy
    import dataclasses

    import overlap.kernels.stream_gemv as sg
    from overlap.context import single
    from overlap.model import ModelArgs, Transformer
    from overlap.ops import EAGER_OPS
    from overlap.runtime import Runtime

    calls = []

    def fake(x, w, *, norm_weight=None, eps=1e-5, swiglu=False, block_n, block_k, stages, split_k, pdl, residual=None):
        assert pdl and x.shape[0] == 1 and w.shape[1] % (block_k * split_k) == 0 and stages == STAGES
        calls.append((norm_weight is not None, swiglu, residual is not None))
        y = reference(x, w, norm_weight=norm_weight, eps=eps, swiglu=swiglu)
        return y if residual is None else y + residual

    monkeypatch.setattr(sg, "stream_gemv", fake)
    monkeypatch.setattr(sg, "supported", lambda x, w, block_k: x.shape[0] == 1)
    monkeypatch.setattr(sg, "_device", lambda device: (9, 132))
    args = ModelArgs(vocab_size=128, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384)
    full = Transformer.from_args(args, seed=3)
    full.layers[1].spd = True
    for batch in (1, 2):
        ids = torch.randint(0, 128, (batch, 14), generator=torch.Generator().manual_seed(batch))
        outs = {}
        for fused in (False, True):
            model = copy.deepcopy(full)
            rt = Runtime(model, single("cpu"), batch, 32, cuda_graphs=False)  # eager ops
            if fused:
                ops = dataclasses.replace(EAGER_OPS, gemv=lambda x, w: x @ w.T,
                                          gemv_down=lambda x, w, residual=None: x @ w.T + (0 if residual is None
                                                                                            else residual))
                ops = dataclasses.replace(ops, gemv=sg.streamed(ops.gemv), gemv_down=sg.streamed(ops.gemv_down))
                ops = dataclasses.replace(ops, norm_linear=sg.streamed_norm_linear(ops), norm_linear_rows=1)
                for m in model.modules():
                    if hasattr(m, "ops"):
                        m.ops = ops
            calls.clear()
            rt.prefill(ids[:, :10])
            outs[fused] = torch.cat([rt.decode_one(ids[:, i : i + 1]) for i in range(10, 14)], 1)
        assert (outs[True] - outs[False]).abs().max() <= 1e-4 * outs[False].abs().max()
        # wqkv, wo, w13, w2 of the baseline block (the residual in wo's and w2's epilogue), then of the SPD block
        # (the residual x + a rides in w2's)
        per_step = ([(True, False, False), (False, False, True), (True, True, False), (False, False, True)]
                    + [(True, False, False), (False, False, False), (True, True, False), (False, False, True)])
        assert calls == (per_step * 4 if batch == 1 else []), calls[:8]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k", [(2560, 8192), (8192, 2048), (200, 1024), (96, 512)])
@pytest.mark.parametrize("cfg", [dict(block_n=32, block_k=128, stages=8, split_k=1),
                                 dict(block_n=16, block_k=256, stages=4, split_k=2),
                                 dict(block_n=64, block_k=128, stages=2, split_k=4)])
@pytest.mark.parametrize("pdl", [False, True])
def test_matches_plain_torch_on_the_gpu(n, k, cfg, pdl):
    """bf16, N not always a multiple of block_n, fewer tiles than stages (k 512 at split 4: one tile a share)."""
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability >= 9")
    g = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(1, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
    ref = (x.float() @ w.float().T)
    out = stream_gemv(x, w, pdl=pdl, **cfg).float()
    assert out.shape == (1, n)
    assert ((out - ref).norm() / ref.norm()).item() < BF16_TOL
    r = torch.randn(1, n, device="cuda", generator=g).bfloat16()  # a residual, in the reduce's epilogue
    out_r = stream_gemv(x, w, pdl=pdl, residual=r, **cfg).float()
    ref_r = ref + r.float()
    assert ((out_r - ref_r).norm() / ref_r.norm()).item() < BF16_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k", [(2560, 8192), (14336, 8192), (200, 1024)])
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("split_k", [1, 4])
@pytest.mark.parametrize("pdl", [False, True])
def test_norm_and_swiglu_match_the_unfused_steps_on_the_gpu(n, k, swiglu, split_k, pdl):
    """With the norm folded in (and SwiGLU of [gate; up] rows): against reference, the unfused steps in plain torch
    (rms_norm, linear, swiglu); x with a non-unit scale and norm weights away from 1, so a missing rstd or g fails."""
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability >= 9")
    g = torch.Generator(device="cuda").manual_seed(n + k + split_k)
    x = (torch.randn(1, k, device="cuda", generator=g) * 3).bfloat16()
    nw = (1 + 0.5 * torch.randn(k, device="cuda", generator=g)).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
    ref = reference(x, w, norm_weight=nw, eps=1e-5, swiglu=swiglu).float()
    block_n = 16 if swiglu else 32
    out = stream_gemv(x, w, norm_weight=nw, eps=1e-5, swiglu=swiglu, block_n=block_n, split_k=split_k, pdl=pdl)
    assert out.shape == (1, n // 2 if swiglu else n)
    assert ((out.float() - ref).norm() / ref.norm()).item() < BF16_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a GPU of compute capability >= 9 (PDL, TMA)")
@torch.no_grad()
def test_runtime_with_stream_gemv_decodes_like_without_it():
    """Runtime(stream_gemv=True) at batch 1 (every decode GEMV through the kernel, CUDA graphs, PDL) against
    Runtime(pdl=True) alone, over 4 blocks of a random bf16 model: their logits differ by no more than the
    Triton GEMV's differ from cuBLAS's (the bf16 rounding noise of sums in another order; a kernel reading a
    wrong tile or row would be off by O(1)). Greedy tokens are no yardstick here: a random model's top logits
    are near ties."""
    from overlap.context import single
    from overlap.model import ModelArgs, Transformer
    from overlap.runtime import Runtime

    args = ModelArgs(vocab_size=1024, dim=1024, n_layers=4, n_heads=16, n_kv_heads=2, ffn_dim=3584)
    full = Transformer.from_args(args, device="cuda", dtype=torch.bfloat16, seed=5)
    ids = torch.randint(0, 1024, (1, 40), generator=torch.Generator().manual_seed(6)).cuda()
    outs = {}
    for name, flags in (("cublas", {}), ("pdl", dict(triton_gemv=True, pdl=True)),
                        ("stream", dict(triton_gemv=True, pdl=True, stream_gemv=True))):
        rt = Runtime(full, single("cuda:0"), 1, 64, fuse=True, **flags)
        rt.prefill(ids[:, :16])
        outs[name] = torch.cat([rt.decode_one(ids[:, i : i + 1]).float() for i in range(16, 40)], 1)

    def err(a, b):
        return ((outs[a] - outs[b]).norm() / outs[b].norm()).item()

    noise = err("pdl", "cublas")
    assert 0 < err("stream", "pdl") <= 2 * noise + 1e-3, (err("stream", "pdl"), noise)
    assert err("stream", "pdl") < 2e-2


class _FakeWeight:
    """What TensorDescriptor and Triton's argument binding read of a tensor, with no tensor behind it."""

    def __init__(self, n: int, k: int):
        self.dtype, self.shape = torch.bfloat16, [n, k]

    def data_ptr(self):
        return 0

    def stride(self):
        return (self.shape[1], 1)


def _compile_for_sm90(n: int, k: int, split_k: int, norm: bool = False, swiglu: bool = False, late: bool = False):
    """stream_gemv_kernel compiled ahead of time for sm_90 (ptxas ships with Triton), or None where this Triton's
    private binding helpers differ from the ones this uses."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl

    from overlap.kernels.compile_options import FP_FUSION
    from overlap.kernels.stream_gemv import TensorDescriptor, stream_gemv_kernel

    target = GPUTarget("cuda", 90, 32)
    try:
        from triton.compiler import make_backend
        from triton.experimental.gluon._runtime import GluonASTSource
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(target)
        w = _FakeWeight(n, k)
        desc = TensorDescriptor(w, w.shape, w.stride(), [BLOCK_N, BLOCK_K],
                                gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.bfloat16))
        x = _FakeWeight(1, k)
        n_out = n // 2 if swiglu else n
        args = (desc, x, x, x, _FakeWeight(split_k, n), _FakeWeight(split_k, 1), n_out, k, 1e-5, k // split_k, BLOCK_N,
                BLOCK_K, STAGES, split_k, True, norm, swiglu, late)
        binder = create_function_from_signature(stream_gemv_kernel.signature, stream_gemv_kernel.params, backend)
        bound, spec, options = binder(*args, num_warps=4, launch_pdl=True, **FP_FUSION)
        options, signature, constexprs, attrs = stream_gemv_kernel._pack_args(
            backend, dict(num_warps=4, launch_pdl=True, **FP_FUSION), bound, spec, options)
    except (ImportError, AttributeError, TypeError, ValueError) as e:  # Triton's private API moved
        pytest.skip(f"this Triton's ahead-of-time binding differs: {e}")
    return triton.compile(GluonASTSource(stream_gemv_kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


@pytest.mark.parametrize("n,k,split_k,norm,swiglu", [(2560, 8192, 4, False, False), (8192, 2048, 1, False, False),
                                                    (2560, 8192, 4, True, False), (14336, 8192, 1, True, True)])
def test_the_weight_copies_are_issued_before_the_pdl_wait(n, k, split_k, norm, swiglu):
    """The kernel's point, checked in its PTX on any machine: STAGES TMA copies of weight tiles (with SwiGLU a
    gate and an up tile each) come before griddepcontrol.wait (x's and the norm weight's loads after it), the K
    loop refills the ring, and it fits in shared memory."""
    kernel = _compile_for_sm90(n, k, split_k, norm, swiglu)
    ptx = kernel.asm["ptx"]
    wait = ptx.index("griddepcontrol.wait")
    halves = 2 if swiglu else 1
    before = ptx[:wait].count("cp.async.bulk.tensor")
    assert before == STAGES * halves, before
    assert ptx[wait:].count("cp.async.bulk.tensor") >= halves  # the refill in the loop
    assert "ld.global" not in ptx[:wait]  # x (the previous kernel's output) is read only after the wait
    assert kernel.metadata.shared >= STAGES * halves * BLOCK_N * BLOCK_K * 2


@pytest.mark.parametrize("late", [False, True])
def test_the_next_kernel_launches_after_the_wait_or_after_the_k_loop(late):
    """LATE moves griddepcontrol.launch_dependents from right after the wait to after the K loop (its last
    mbarrier wait for a weight tile): the next kernel's programs then launch as this one ends."""
    ptx = _compile_for_sm90(14336, 8192, 1, True, True, late).asm["ptx"]
    wait, launch = ptx.index("griddepcontrol.wait"), ptx.index("griddepcontrol.launch_dependents")
    assert ptx.count("griddepcontrol.launch_dependents") == 1
    last_tile_wait = ptx.rindex("mbarrier.try_wait")
    assert (launch > last_tile_wait) if late else (wait < launch < ptx.index("mbarrier.try_wait"))


def test_the_next_kernel_launches_late_exactly_where_no_reduce_follows(monkeypatch):
    """stream_gemv's launches, recorded on the CPU (nothing runs): without split-K the GEMV lets the next kernel
    launch after its K loop (LATE); with split-K it lets the reduce launch right after its wait, and the reduce
    lets the next kernel launch after its own wait (docs/benchmarks/pdl.md: either way round was slower)."""
    import overlap.kernels.stream_gemv as sg

    launches = []

    class Launcher:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, kwargs))

    monkeypatch.setattr(sg, "stream_gemv_kernel", Launcher("gemv"))
    monkeypatch.setattr(sg, "split_k_reduce_kernel", Launcher("reduce"))

    class OnCuda(torch.Tensor):  # passes the CUDA check; the launches are recorded, not run
        is_cuda = True

    x = torch.zeros(1, 1024, dtype=torch.bfloat16).as_subclass(OnCuda)
    w = torch.zeros(256, 1024, dtype=torch.bfloat16)
    for split_k in (1, 2):
        launches.clear()
        sg.stream_gemv(x, w, split_k=split_k, pdl=True)
        assert [name for name, _ in launches] == ["gemv"] + ["reduce"] * (split_k > 1)
        assert launches[0][1]["LATE"] == (split_k == 1) and launches[0][1]["GDC"]
        if split_k > 1:
            assert launches[1][1]["LAUNCH_AFTER_WAIT"] and launches[1][1]["GDC"]
