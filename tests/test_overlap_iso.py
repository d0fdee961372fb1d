"""ISO prefill (overlap/iso.py) against plain prefill: the split rule, the schedule, gloo ranks on CPU in
fp32 (R = 2 with 8 heads / 4 KV heads; R = 4 with 8 / 2, each KV head replicated on two ranks; batch 2;
baseline, some-SPD and all-SPD plans; k = 2 and 3 pieces), and NCCL ranks in fp32 and bf16 (marked gpu).

Plain prefill is itself checked against the single-device SPD emulation (test_overlap_tp.py), so ISO
equal to plain on every rank is ISO equal to the reference.
"""

import pytest
import torch

from overlap.context import single
from overlap.iso import attention_weight, chunk_cost, iso_forward, split_bounds
from overlap.launch import spawn_ranks
from overlap.model import ModelArgs, Transformer, init_weights_
from overlap.sync import Pending, Sync
from overlap.runtime import Runtime
from overlap.tp import set_plan_, shard_
from spd.plan import SPDPlan

ISO_FP32_ATOL = 1e-4  # fp32; pieces only re-block the GEMM rows and move later pieces onto the masked attention path
RANKS_TIMEOUT_S = 150  # whole group, spawn and imports included: a hung collective fails the test, never blocks it
WEIGHT_STD = 0.2  # larger than LLaMA's init so that a missing or doubled sum visibly changes the logits
LAYERS, SEQ, PREFIX = 3, 16, 9  # decode checks: prefill SEQ[:PREFIX], then decode the rest one token at a time
KS = (2, 3)
PLANS = {"base": [], "spd_some": [1], "spd_all": list(range(LAYERS))}
CASES = {"r2_gqa": dict(tp=2, heads=8, kv=4), "r4_kv_replicated": dict(tp=4, heads=8, kv=2)}
LLAMA2_70B = ModelArgs(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672)


def make_model(heads=8, kv=4, layers=LAYERS, seed=0) -> Transformer:
    args = ModelArgs(vocab_size=128, dim=64, n_layers=layers, n_heads=heads, n_kv_heads=kv, ffn_dim=172)
    return init_weights_(Transformer.from_args(args), seed, std=WEIGHT_STD)


def ids_of(b=2, s=SEQ, seed=1) -> torch.Tensor:
    return torch.randint(0, 128, (b, s), generator=torch.Generator().manual_seed(seed))  # batch 2: not only row 0


# ---- the split rule ----------------------------------------------------------------------------------

def test_attention_weight_is_pair_flops_over_token_flops():
    linear = 2 * (8192 * (64 + 16) * 128 + 64 * 128 * 8192 + 3 * 8192 * 28672)  # LLaMA-2-70B, one layer
    assert attention_weight(LLAMA2_70B) == pytest.approx(4 * 64 * 128 / linear)
    assert attention_weight(LLAMA2_70B) == pytest.approx(1.915e-5, rel=1e-3)
    assert attention_weight(LLAMA2_70B, slowdown=2.0) == pytest.approx(2 * attention_weight(LLAMA2_70B))


def test_without_attention_cost_the_split_is_token_balanced():
    assert split_bounds(0, 100, 4, 0.0) == [0, 25, 50, 75, 100]
    assert split_bounds(10, 30, 2, 0.0) == [10, 20, 30]
    assert split_bounds(0, 100, 1, 1.0) == [0, 100]


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("start", [0, 4096])
def test_llama2_70b_split_balances_cost(k, start):
    w, stop = attention_weight(LLAMA2_70B), start + 8192
    bounds = split_bounds(start, stop, k, w)
    costs = [chunk_cost(a, b, w) for a, b in zip(bounds, bounds[1:])]
    one_token = chunk_cost(stop - 1, stop, w)  # the dearest token: rounding moves at most half of one
    assert max(costs) - min(costs) <= one_token
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    assert sizes == sorted(sizes, reverse=True)  # later pieces see more keys, so they get fewer tokens


def test_llama2_70b_at_8192_splits_after_half():
    w = attention_weight(LLAMA2_70B)
    assert split_bounds(0, 8192, 2, w) == [0, 4245, 8192]  # the documented value (docs/iso.md)
    assert split_bounds(0, 8192, 2, attention_weight(LLAMA2_70B, 2.0)) == [0, 4372, 8192]
    assert split_bounds(0, 8192, 2, w, align=128) == [0, 4224, 8192]  # 33 full 128-row tiles, then 31


def test_split_keeps_every_piece_non_empty():
    assert split_bounds(0, 2, 3, 1.0) == [0, 1, 2]  # k capped at the token count
    for n in range(1, 12):
        for k in (2, 3, 5):
            b = split_bounds(7, 7 + n, k, 10.0, align=4)  # heavy attention pushes every boundary right
            assert b[0] == 7 and b[-1] == 7 + n and all(y > x for x, y in zip(b, b[1:])), (n, k, b)
    assert split_bounds(0, 1000, 3, 0.0, align=128) == [0, 384, 640, 1000]  # 333, 667 snapped to 128s
    assert split_bounds(0, 300, 3, 0.0, align=128) == [0, 100, 200, 300]  # too short to align
    with pytest.raises(ValueError, match="k >= 1"):
        split_bounds(0, 10, 0, 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        split_bounds(5, 5, 2, 1.0)


# ---- one process: the schedule, the counts, the bounds --------------------------------------------

def test_schedule_overlaps_each_all_reduce_with_the_other_pieces(monkeypatch):
    """Baseline block 0, SPD block 1, pieces A = [0, 7) and B = [7, 16): the order method.md describes."""
    model = make_model(layers=2)
    ctx = single()
    rt = Runtime(shard_(model, ctx, SPDPlan.zero_shot(1, 2, [1])), ctx, 2, 32)
    log = []
    piece = {7: "A", 9: "B"}

    class LoggedPending(Pending):
        def wait(self):
            log.append(("wait", self.name, piece[self.x.shape[1]]))
            return super().wait()

    def start(self, x, stream=None, group=None):
        self.calls += 1
        log.append(("start", self.name, piece[x.shape[1]]))
        p = LoggedPending(x)
        p.name = self.name
        return p

    monkeypatch.setattr(Sync, "start", start)
    iso_forward(model, ids_of(), [0, 7, 16])
    assert log == [
        ("start", "attn", "A"), ("start", "attn", "B"),  # attn(B) computes while AR(A attn) is in flight
        ("wait", "attn", "A"), ("start", "mlp", "A"),  # mlp(A) while AR(B attn)
        ("wait", "attn", "B"), ("start", "mlp", "B"),  # mlp(B) while AR(A mlp)
        ("wait", "mlp", "A"), ("start", "block", "A"),  # next layer: A's SPD block while AR(B mlp)
        ("wait", "mlp", "B"), ("start", "block", "B"),
        ("wait", "block", "A"), ("wait", "block", "B"),  # the last sums, before the final norm
    ]


def test_iso_at_r1_equals_prefill_and_counts_k_times_the_syncs():
    ctx = single()
    model = shard_(make_model(), ctx, SPDPlan.zero_shot(1, LAYERS, [2]))
    rt = Runtime(model, ctx, 2, 32)
    ids = ids_of()
    ref = rt.prefill(ids)
    for k in (2, 3, SEQ + 5):  # more pieces than tokens: one token a piece
        c0 = model.sync_calls
        out = rt.prefill(ids, iso=k)
        assert model.sync_calls - c0 == min(k, SEQ) * (2 * LAYERS - 1)
        assert (out - ref).abs().max() <= ISO_FP32_ATOL
        assert rt.pos == SEQ
    for bounds in ([0, 1, SEQ], [0, 15, SEQ], [0, 3, 4, 12, SEQ]):  # uneven, one-token pieces
        rt.reset()
        assert (iso_forward(model, ids, bounds) - ref).abs().max() <= ISO_FP32_ATOL
    with pytest.raises(ValueError, match="span its 16 tokens"):
        iso_forward(model, ids, [0, 8, 15])
    with pytest.raises(ValueError, match="increase strictly"):
        iso_forward(model, ids, [0, 8, 8, 16])


# ---- gloo ranks ------------------------------------------------------------------------------------

def rank_worker(ctx, full: Transformer, ids: torch.Tensor):
    model = shard_(full, ctx)
    rt = Runtime(model, ctx, max_batch=ids.shape[0], max_seq=32)
    out = {"rank": ctx.rank}

    def decode_rest():
        return torch.cat([rt.decode_one(ids[:, i : i + 1]).clone() for i in range(PREFIX, SEQ)], dim=1)

    for name, blocks in PLANS.items():
        set_plan_(model, SPDPlan.zero_shot(ctx.world_size, LAYERS, blocks))
        rt.reset()
        res = dict(plain=rt.prefill(ids))  # (B, S, V)
        rt.reset()
        rt.prefill(ids[:, :PREFIX])
        res["decode_plain"] = decode_rest()
        for k in KS:
            rt.reset()
            c0 = model.sync_calls
            res[k] = rt.prefill(ids, iso=k)
            res[f"syncs{k}"] = model.sync_calls - c0
            res[f"last{k}"] = rt.prefill(ids, iso=k, last_only=True)  # (B, 1, V)
            rt.reset()
            rt.prefill(ids[:, :PREFIX], iso=k)
            res[f"decode{k}"] = decode_rest()
        rt.reset()
        rt.prefill(ids[:, :5])
        res["later"] = rt.prefill(ids[:, 5:], start=5, iso=2)  # ISO of a later chunk against the cache
        out[name] = res
    return out


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    spec = dict(CASES[request.param])
    tp = spec.pop("tp")
    results = spawn_ranks(rank_worker, tp, tmp_path_factory.mktemp(request.param),
                          args=(make_model(**spec), ids_of()), timeout_s=RANKS_TIMEOUT_S)
    return dict(tp=tp, results=results)


def _maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("plan", PLANS)
def test_iso_prefill_equals_plain_prefill_on_every_rank(case, plan, k):
    for res in case["results"]:
        r = res[plan]
        assert _maxdiff(r[k], r["plain"]) <= ISO_FP32_ATOL, f"rank {res['rank']}"
        assert _maxdiff(r[f"last{k}"], r["plain"][:, -1:]) <= ISO_FP32_ATOL, f"rank {res['rank']}"
        assert r[f"syncs{k}"] == k * (2 * LAYERS - len(PLANS[plan]))


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("plan", PLANS)
def test_decode_after_iso_prefill_equals_decode_after_plain(case, plan, k):
    for res in case["results"]:
        r = res[plan]
        assert _maxdiff(r[f"decode{k}"], r["decode_plain"]) <= ISO_FP32_ATOL, f"rank {res['rank']}"
        assert _maxdiff(r["decode_plain"], r["plain"][:, PREFIX:]) <= ISO_FP32_ATOL


@pytest.mark.parametrize("plan", PLANS)
def test_iso_of_a_later_chunk_attends_to_the_cache(case, plan):
    r = case["results"][0][plan]
    assert _maxdiff(r["later"], r["plain"][:, 5:]) <= ISO_FP32_ATOL


def test_plans_change_the_logits(case):
    """Guards the parity tests against vacuity: each plan's syncs matter at these weights."""
    r = case["results"][0]
    assert _maxdiff(r["spd_some"]["plain"], r["base"]["plain"]) > 100 * ISO_FP32_ATOL
    assert _maxdiff(r["spd_all"]["plain"], r["spd_some"]["plain"]) > 100 * ISO_FP32_ATOL


# ---- NCCL ranks ------------------------------------------------------------------------------------

GPUS = torch.cuda.device_count()
NCCL_TIMEOUT_S = 300
BF16_VS_PLAIN = 1.5  # bf16 ISO may be at most this many times farther from the fp32 result than bf16 plain prefill
FP32_GPU_ATOL = 5e-4  # fp32 on GPUs: other kernels (flash vs math attention, GEMM tiles) sum in other orders
GPU_SEQ, GPU_PREFIX = 640, 600  # long enough for 128-aligned pieces


def nccl_worker(ctx, state: dict, args: ModelArgs, ids: torch.Tensor, plans: dict):
    """Per dtype and plan: plain and ISO (k = 2, 3) prefill logits, and decode after each (CUDA graphs)."""
    out = {}
    ids = ids.to(ctx.device)
    for dtype in (torch.float32, torch.bfloat16):
        with torch.device("meta"):
            model = Transformer(args)
        model.to(dtype).to_empty(device=ctx.device)
        model.load_state_dict({n: t.to(dtype) for n, t in state.items()})
        model = shard_(model.eval(), ctx)
        rt = Runtime(model, ctx, ids.shape[0], GPU_SEQ + 64)
        for name, blocks in plans.items():
            set_plan_(model, SPDPlan.zero_shot(ctx.world_size, args.n_layers, blocks))
            rt.invalidate()
            res = {}
            for k in (1, 2, 3):
                rt.reset()
                res[k] = rt.prefill(ids, iso=k).float().cpu()
                rt.reset()
                rt.prefill(ids[:, :GPU_PREFIX], iso=k)
                res[f"decode{k}"] = torch.cat([rt.decode_one(ids[:, i : i + 1]).float().cpu()
                                               for i in range(GPU_PREFIX, GPU_SEQ)], dim=1)
            rt.set_iso_(max_ctas=2, sm_carveout=16, high_priority=True)  # ISO's capped NCCL group, GEMMs carved
            rt.reset()
            res["capped"] = rt.prefill(ids, iso=2).float().cpu()
            rt.set_iso_()
            out[(str(dtype), name)] = res
        del rt, model
        torch.cuda.empty_cache()
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("tp", [r for r in (2, 4) if r <= GPUS] or [2])
@pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA GPUs, {GPUS} visible")
def test_iso_on_nccl_equals_plain_prefill(tmp_path, tp):
    full = make_model(heads=8, kv=2, layers=4)
    ids = torch.randint(0, 128, (2, GPU_SEQ), generator=torch.Generator().manual_seed(5))
    plans = {"base": [], "spd_half": [2, 3]}
    results = spawn_ranks(nccl_worker, tp, tmp_path, backend="nccl", timeout_s=NCCL_TIMEOUT_S,
                          args=(full.state_dict(), full.args, ids, plans))
    for res in results:
        for name in plans:
            f32, b16 = res[(str(torch.float32), name)], res[(str(torch.bfloat16), name)]
            assert _maxdiff(f32["capped"], f32[1]) <= FP32_GPU_ATOL, name
            ref = f32[1]
            err_capped = ((b16["capped"] - ref).norm() / ref.norm()).item()
            assert err_capped <= BF16_VS_PLAIN * ((b16[1] - ref).norm() / ref.norm()).item() + 1e-3, name
            for k in (2, 3):
                assert _maxdiff(f32[k], f32[1]) <= FP32_GPU_ATOL, (name, k)
                assert _maxdiff(f32[f"decode{k}"], f32["decode1"]) <= FP32_GPU_ATOL, (name, k)
                for key in (k, f"decode{k}"):
                    plain_key = 1 if key == k else "decode1"
                    ref = f32[plain_key]
                    err_plain = ((b16[plain_key] - ref).norm() / ref.norm()).item()
                    err_iso = ((b16[key] - ref).norm() / ref.norm()).item()
                    assert err_iso <= BF16_VS_PLAIN * err_plain + 1e-3, (name, key, err_iso, err_plain)
