"""overlap.checkpoint: exported SPD checkpoints (and plain ones + a plan) in the TP runtime equal the emulation.

Per case (R = 2 with 8 heads / 4 KV heads; R = 3 with 9 heads / 3 KV heads, one KV head per rank) a
tiny random model gets a plan with a head permutation that moves heads across ranks. It is exported by
spd.export.export_ (weights stored permuted) and also saved unpermuted as a plain HF directory. The
gloo ranks load (1) the export, (2) the plain directory as a ModelConfig with the plan (the runtime
permutes), (3) the export with a dense plan; each must equal the single-device emulation.
"""

import copy

import pytest
import torch

from overlap.checkpoint import load_runtime_model
from overlap.context import single
from overlap.launch import spawn_ranks
from overlap.runtime import Runtime
from spd.config import ModelConfig
from spd.errors import ModelLoadError, PlanError
from spd.plan import SPDPlan
from test_overlap_tp import make_hf as make_tp_hf

TP_FP32_ATOL = 1e-4  # fp32; gloo sums the R partials in another order than the emulation's stack().sum(0)
RANKS_TIMEOUT_S = 150  # whole group, spawn and imports included (R processes share 2 CPU cores)
LAYERS, VOCAB = 3, 512  # vocab of the stories260K tokenizer saved beside the plain checkpoint

CASES = {
    "r2_gqa": dict(tp=2, heads=8, kv=4, hidden=64, tiers={0: "ISB", 2: "ESB"},
                   head_perm={2: [0, 1, 4, 5, 2, 3, 6, 7]}),  # KV heads 1 and 2 change ranks
    "r3_kv1": dict(tp=3, heads=9, kv=3, hidden=72, tiers={1: "SB", 2: "ESB"},
                   head_perm={2: [6, 7, 8, 0, 1, 2, 3, 4, 5]}),  # each rank gets another KV group
}


def make_hf(heads, kv, hidden, seed=0):
    return make_tp_hf(heads, kv, hidden, 172, seed, vocab=VOCAB)


def emulate(hf, plan: SPDPlan, permute: bool = True):
    """The single-device reference: apply_plan_ (heads permuted as the plan says, unless permute=False)."""
    from dataclasses import replace

    from spd.surgery import apply_plan_

    return apply_plan_(copy.deepcopy(hf), plan if permute else replace(plan, head_perm={}))


def load_worker(ctx, jobs: dict, ids: torch.Tensor):
    out = {}
    for name, (source, plan) in jobs.items():
        model, tokenizer, got = load_runtime_model(source, ctx, torch.float32, plan)
        rt = Runtime(model, ctx, max_batch=ids.shape[0], max_seq=ids.shape[1])
        before = model.sync_calls
        logits = rt.prefill(ids)  # (B, S, V)
        out[name] = dict(logits=logits, plan=got, syncs=model.sync_calls - before, tokenizer=tokenizer is not None,
                         positions=model.source_config.max_position_embeddings,
                         wo_cols=model.layers[0].attn.wo.weight.shape[1])
    return out


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, stories260k):
    from spd.export import export_

    spec = dict(CASES[request.param])
    tp, tiers, head_perm = spec.pop("tp"), spec.pop("tiers"), spec.pop("head_perm")
    tmp = tmp_path_factory.mktemp(request.param)
    hf = make_hf(**spec)
    plan = SPDPlan(tp=tp, num_layers=LAYERS, tiers=tiers, head_perm=head_perm)
    emulated = emulate(hf, plan)
    export_dir = export_(emulated, None, plan, tmp / "export", provenance={"source_model": "random"})
    hf.save_pretrained(tmp / "plain")  # unpermuted; the plan's head_perm is applied on loading
    stories260k[1].save_pretrained(tmp / "plain")  # spd.load's hf source loads a tokenizer too
    dense = SPDPlan(tp=tp, num_layers=LAYERS)
    jobs = {"export": (str(export_dir), None),
            "plain": (ModelConfig(name="plain", source="hf", path=str(tmp / "plain")), plan),
            "export_dense": (str(export_dir), dense)}
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))  # batch 2: not only row 0
    results = spawn_ranks(load_worker, tp, tmp / "ranks", args=(jobs, ids), timeout_s=RANKS_TIMEOUT_S)
    with torch.no_grad():
        refs = {"spd": emulated(ids).logits, "dense": hf(ids).logits,
                "spd_unpermuted": emulate(hf, plan, permute=False)(ids).logits}
    return dict(tp=tp, hf=hf, plan=plan, dense=dense, export=export_dir, results=results, refs=refs)


def _maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("job, ref", [("export", "spd"), ("plain", "spd"), ("export_dense", "dense")])
def test_runtime_logits_equal_emulation_on_every_rank(case, job, ref):
    for r, res in enumerate(case["results"]):
        assert _maxdiff(res[job]["logits"], case["refs"][ref]) <= TP_FP32_ATOL, f"rank {r}"


def test_references_differ(case):
    """Guards against vacuity: SPD and the head permutation each visibly change the emulated logits."""
    refs = case["refs"]
    assert _maxdiff(refs["spd"], refs["dense"]) > 100 * TP_FP32_ATOL
    assert _maxdiff(refs["spd"], refs["spd_unpermuted"]) > 100 * TP_FP32_ATOL


def test_plan_sharding_and_sync_count(case):
    tp, plan, H = case["tp"], case["plan"], case["hf"].config.num_attention_heads
    Dh = case["hf"].config.hidden_size // H
    for res in case["results"]:
        assert res["export"]["plan"] == plan and res["plain"]["plan"] == plan
        assert res["export_dense"]["plan"] == case["dense"]
        assert res["export"]["syncs"] == 2 * LAYERS - len(plan.tiers)
        assert res["export_dense"]["syncs"] == 2 * LAYERS
        assert res["export"]["wo_cols"] == H // tp * Dh  # row-parallel wo: this rank's head columns
        assert res["export"]["positions"] == 128
        assert not res["export"]["tokenizer"] and res["plain"]["tokenizer"]


def test_user_errors_say_what_is_right(case, tmp_path):
    tp, plan = case["tp"], case["plan"]
    with pytest.raises(PlanError, match=f"plan is for tp={tp} but 1 ranks"):
        load_runtime_model(case["export"], single())
    identity = list(range(case["hf"].config.num_attention_heads))
    other = SPDPlan(tp=tp, num_layers=LAYERS, tiers=plan.tiers, head_perm={2: identity})
    with pytest.raises(PlanError, match="already carry head permutations"):
        load_runtime_model(case["export"], single(), plan=other)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_runtime_model(tmp_path, single())
    with pytest.raises(ModelLoadError, match="not supported"):
        load_runtime_model(case["export"], single(), dtype=torch.int8)
