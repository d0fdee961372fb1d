"""Runtime(impl=...): the collective implementation of the row-parallel output projections (overlap.kernels).

CPU (gloo): impl="nccl" passed explicitly is the default path, bit for bit; the fused path
(Block.forward_fused -> Sync.matmul -> impl.matmul_all_reduce) with a reference impl (matmul, then
dist.all_reduce; patched in for overlap.kernels.get_impl) equals the default at R = 2 for baseline,
some-SPD and all-SPD plans, prefill and decode, with 2L - #SPD all-reduces, all of them through the impl;
bad names and unsupported combinations (ISO, compile) fail with messages naming what is supported.
GPU (marked gpu, 2 GPUs, NCCL): symm_mem and triton against nccl in bf16.
"""

import copy

import pytest
import torch
import torch.distributed as dist

from overlap.context import single
from overlap.kernels import KernelArgError
from overlap.launch import spawn_ranks
from overlap.model import ModelArgs, Transformer, init_weights_
from overlap.runtime import Runtime
from overlap.tp import set_plan_, shard_
from spd.plan import SPDPlan

FP32_ATOL = 1e-4  # fp32: the fused path adds the residual after the sum (and a_r inside it), another rounding order
# GPU, bf16: each impl's error against the fp32 nccl run may be at most BF16_VS_NCCL times bf16 nccl's error
# (reductions in other orders; one-shot sums fp32 in rank order). A fixed 2% between two bf16 runs failed
# for triton's decode at 2.15% on 2x H200 (session 2): the bf16 noise floor of this random model, not a bug.
BF16_VS_NCCL = 2.0
RANKS_TIMEOUT_S = 150
LAYERS, SEQ, SPLIT = 3, 12, 8
PLANS = {"base": [], "spd_some": [1], "spd_all": list(range(LAYERS))}
GPUS = torch.cuda.device_count()


def make_model(layers=LAYERS, dim=64, ffn=172, vocab=128, seed=0) -> Transformer:
    args = ModelArgs(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=8, n_kv_heads=4, ffn_dim=ffn)
    return init_weights_(Transformer.from_args(args), seed, std=0.2)  # large weights: a missed sum shows


def ids_of(b=2, s=SEQ, vocab=128) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(1))


class RefImpl:
    """The reference: matmul, then torch.distributed all-reduce; counts its fused calls."""

    name = "ref"

    def __init__(self, ctx):
        self.ctx, self.calls = ctx, 0

    def matmul_all_reduce(self, x, w, *, add=None, residual=None):
        self.calls += 1
        y = x @ w.T
        if add is not None:
            y = y + add
        dist.all_reduce(y, group=self.ctx.group)
        return y if residual is None else y + residual

    def all_reduce(self, y):
        dist.all_reduce(y, group=self.ctx.group)
        return y

    def reserve(self, **_):
        pass


def run_plan(model, rt, blocks, ids):
    """Prefill ids[:, :SPLIT], decode the rest; logits and all-reduces per forward."""
    set_plan_(model, SPDPlan.zero_shot(model.tp, LAYERS, blocks) if model.tp > 1 else None)
    rt.invalidate()
    rt.reset()
    c0 = model.sync_calls
    prefill = rt.prefill(ids[:, :SPLIT])
    c1 = model.sync_calls
    decode = torch.cat([rt.decode_one(ids[:, i : i + 1]).clone() for i in range(SPLIT, ids.shape[1])], dim=1)
    c2 = model.sync_calls
    return dict(prefill=prefill, decode=decode, prefill_syncs=c1 - c0, decode_syncs=(c2 - c1) / (ids.shape[1] - SPLIT))


def impl_worker(ctx, full: Transformer, ids: torch.Tensor):
    import overlap.kernels as kernels

    model = shard_(full, ctx)
    B = ids.shape[0]
    out = {"default": {}, "nccl": {}, "fused": {}, "impl_calls": {}}
    for name, blocks in PLANS.items():
        out["default"][name] = run_plan(model, Runtime(model, ctx, B, 32), blocks, ids)
        out["nccl"][name] = run_plan(model, Runtime(model, ctx, B, 32, impl="nccl"), blocks, ids)
    made = []

    def fake_get_impl(name, ctx_, **options):
        made.append(name)
        return RefImpl(ctx_)

    real, kernels.get_impl = kernels.get_impl, fake_get_impl
    try:
        rt = Runtime(model, ctx, B, 32, impl="triton")
        for name, blocks in PLANS.items():
            c0 = rt.impl.calls
            out["fused"][name] = run_plan(model, rt, blocks, ids)
            out["impl_calls"][name] = rt.impl.calls - c0
        out["iso"] = {}
        for name, blocks in PLANS.items():  # ISO with the fused impl: each stage's fused op per piece
            set_plan_(model, SPDPlan.zero_shot(model.tp, LAYERS, blocks))
            rt.reset()
            plain = rt.prefill(ids)
            c0 = rt.impl.calls
            rt.reset()
            out["iso"][name] = dict(plain=plain, iso=rt.prefill(ids, iso=2), calls=rt.impl.calls - c0)
        Runtime(model, ctx, B, 32, impl="triton")  # a second runtime reuses the model's impl object
        out["made"] = made
        back = Runtime(model, ctx, B, 32)  # the default again: the plain path, no impl bound
        out["back_to_nccl"] = run_plan(model, back, PLANS["spd_some"], ids)
        out["bound_after_default"] = [s.impl for s in model.syncs if s.impl is not None]
    finally:
        kernels.get_impl = real
    return out


@pytest.fixture(scope="module")
def r2(tmp_path_factory):
    ids = ids_of()
    return spawn_ranks(impl_worker, 2, tmp_path_factory.mktemp("impl_r2"), args=(make_model(), ids),
                       timeout_s=RANKS_TIMEOUT_S)


def _maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("plan", PLANS)
def test_explicit_nccl_is_the_default_bit_for_bit(r2, plan):
    for res in r2:
        d, n = res["default"][plan], res["nccl"][plan]
        assert torch.equal(d["prefill"], n["prefill"]) and torch.equal(d["decode"], n["decode"])
        assert (n["prefill_syncs"], n["decode_syncs"]) == (d["prefill_syncs"], d["decode_syncs"])


@pytest.mark.parametrize("plan", PLANS)
def test_fused_path_through_an_impl_equals_the_default_at_r2(r2, plan):
    expected = 2 * LAYERS - len(PLANS[plan])
    for res in r2:
        d, f = res["default"][plan], res["fused"][plan]
        assert _maxdiff(f["prefill"], d["prefill"]) <= FP32_ATOL
        assert _maxdiff(f["decode"], d["decode"]) <= FP32_ATOL
        assert f["prefill_syncs"] == d["prefill_syncs"] == expected
        assert f["decode_syncs"] == d["decode_syncs"] == expected
        steps = SEQ - SPLIT
        assert res["impl_calls"][plan] == expected * (1 + steps)  # every sync point went through the impl


def test_fused_path_is_not_vacuous(r2):
    """SPD changes the logits far beyond the tolerance, so the parity above is SPD's arithmetic, not luck."""
    res = r2[0]
    assert _maxdiff(res["fused"]["spd_all"]["prefill"], res["fused"]["base"]["prefill"]) > 100 * FP32_ATOL


def test_impl_is_built_once_and_unbound_by_the_default(r2):
    for res in r2:
        assert res["made"] == ["triton"]
        assert res["bound_after_default"] == []
        assert torch.equal(res["back_to_nccl"]["prefill"], res["default"]["spd_some"]["prefill"])


@pytest.mark.parametrize("plan", PLANS)
def test_iso_with_a_fused_impl_equals_plain_prefill(r2, plan):
    for res in r2:
        r = res["iso"][plan]
        assert _maxdiff(r["iso"], r["plain"]) <= FP32_ATOL
        assert r["calls"] == 2 * (2 * LAYERS - len(PLANS[plan]))  # k = 2 pieces, every sync point fused


def test_r1_fused_path_equals_default_and_nccl_is_exact():
    model, ids = make_model(), ids_of()
    ref = run_plan(model, Runtime(model, single(), 2, 32), [], ids)
    nccl = run_plan(model, Runtime(model, single(), 2, 32, impl="nccl"), [], ids)
    assert torch.equal(ref["prefill"], nccl["prefill"]) and torch.equal(ref["decode"], nccl["decode"])
    for name in ("symm_mem", "triton"):  # one rank: every impl is the local computation, on CPU too
        fused = run_plan(model, Runtime(model, single(), 2, 32, impl=name), [], ids)
        assert _maxdiff(fused["prefill"], ref["prefill"]) <= 1e-5
        assert _maxdiff(fused["decode"], ref["decode"]) <= 1e-5
        assert fused["prefill_syncs"] == fused["decode_syncs"] == 2 * LAYERS


def test_bad_impl_name_lists_the_valid_ones():
    model = make_model(layers=1)
    with pytest.raises(KernelArgError, match="valid: nccl, symm_mem, triton"):
        Runtime(model, single(), 1, 16, impl="mpi")


def test_compile_needs_nccl():
    model = make_model(layers=1)
    with pytest.raises(ValueError, match="compile=True needs impl='nccl'"):
        Runtime(model, single(), 1, 16, compile=True, impl="triton")


def test_iso_with_fused_impl_at_r1_equals_plain():
    model = make_model(layers=1)
    rt = Runtime(model, single(), 1, 16, impl="symm_mem")  # one rank: the impl's local path
    plain = rt.prefill(ids_of(1, 8))
    rt.reset()
    assert _maxdiff(rt.prefill(ids_of(1, 8), iso=2), plain) <= FP32_ATOL


# ---- GPU: the real symm_mem / triton collectives against nccl ------------------------------------------

GPU_PLANS = {"base": [], "spd_half": [2, 3]}


def gpu_worker(ctx, ids: torch.Tensor, impls: tuple):
    """Same weights on every rank (seed 0), sharded; per impl and plan: prefill + graph-captured decode in bf16,
    and the nccl run in fp32 as ("fp32", plan), the reference."""
    full = make_model(layers=4, dim=128, ffn=344, vocab=512).to(ctx.device)
    ids = ids.to(ctx.device)
    out = {}
    for impl in ("fp32",) + tuple(impls):
        dtype = torch.float32 if impl == "fp32" else torch.bfloat16
        model = shard_(copy.deepcopy(full).to(dtype), ctx)
        impl = "nccl" if impl == "fp32" else impl
        rt = Runtime(model, ctx, ids.shape[0], 256, impl=impl)  # CUDA graphs on: reserve() before capture
        for name, blocks in GPU_PLANS.items():
            set_plan_(model, SPDPlan.zero_shot(ctx.world_size, 4, blocks))
            rt.invalidate()
            rt.reset()
            c0 = model.sync_calls
            prefill = rt.prefill(ids[:, :160]).float().cpu()
            syncs = model.sync_calls - c0
            decode = torch.cat([rt.decode_one(ids[:, i : i + 1]).float().cpu() for i in range(160, 168)], dim=1)
            path = getattr(rt.impl, "last_path", "nccl")
            rt.reset()
            iso = rt.prefill(ids[:, :160], iso=2).float().cpu()  # pieces of 128 + 32 tokens, fused ops on comm stream
            key = "fp32" if dtype == torch.float32 else impl
            out[(key, name)] = dict(prefill=prefill, decode=decode, iso=iso, syncs=syncs, path=path)
        if rt.impl is not None and hasattr(rt.impl, "check_status"):
            rt.impl.check_status()
        rt.invalidate()
        del rt
    return out


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["symm_mem", "triton"])
@pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA GPUs, {GPUS} visible")
def test_fused_impl_on_gpus_equals_nccl_in_bf16(tmp_path, impl):
    if impl == "triton":
        pytest.importorskip("triton")
    ids = ids_of(2, 168, vocab=512)
    results = spawn_ranks(gpu_worker, 2, tmp_path, args=(ids, ("nccl", impl)), backend="nccl", timeout_s=300)
    for res in results:
        for name, blocks in GPU_PLANS.items():
            ref, nccl, got = res[("fp32", name)], res[("nccl", name)], res[(impl, name)]
            assert got["syncs"] == nccl["syncs"] == ref["syncs"] == 2 * 4 - len(blocks)
            for part in ("prefill", "decode", "iso"):  # ISO's reference: the fp32 plain prefill
                target = ref["prefill" if part == "iso" else part]
                err, floor = _rel(got[part], target), _rel(nccl[part], target)
                assert err <= BF16_VS_NCCL * floor, (name, part, got["path"], err, floor)
