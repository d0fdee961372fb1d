"""B2B distillation: teacher activations, only the block trains, loss drops, resume, the entry point."""

import json

import pytest
import torch

import spd.distill as distill
from spd.activations import capture_hidden_states
from spd.block import decoder_layers, spd_blocks
from dataclasses import replace

from spd.config import CalibConfig, DistillConfig, ModelConfig, ParallelConfig, RunApp, SPDConfig
from spd.errors import PlanError, SPDError
from spd.plan import SPDPlan
from test_block import EXACT_FP32, tiny

PLAN = SPDPlan(tp=2, num_layers=4, tiers={0: "ISB", 1: "SB", 3: "ESB"})
FAST = DistillConfig(epochs=2, lr=1e-3, batch_size=2)  # lr above the paper's 5e-5: visible in 2 epochs


def calib(n=4, length=24, seed=0):
    return torch.randint(0, 97, (n, length), generator=torch.Generator().manual_seed(seed))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@torch.no_grad()
def test_captured_targets_are_the_original_blocks(tmp_path, attn):
    model = tiny(layers=4)
    model.config._attn_implementation = attn
    ids = calib(n=5)
    mem = capture_hidden_states(model, ids, [1, 2], batch_size=2, progress=False)
    disk = capture_hidden_states(model, ids, [1, 2], batch_size=2, spill_dir=tmp_path / "spill", progress=False)
    ref = model(ids, output_hidden_states=True).hidden_states
    for i in (1, 2, 3):
        assert torch.equal(mem.get(i), disk.get(i))
        torch.testing.assert_close(mem.get(i), ref[i], atol=EXACT_FP32, rtol=0)
    for i in (1, 2):  # the block's forward on the stored input with the stored kwargs gives the target
        out = decoder_layers(model)[i](mem.get(i), **mem.block_kwargs())
        torch.testing.assert_close(out, mem.get(i + 1), atol=EXACT_FP32, rtol=0)
    disk.cleanup()
    assert not list((tmp_path / "spill").iterdir())


def test_only_the_distilled_blocks_change_and_loss_drops(tmp_path):
    model = tiny(layers=4)
    before = snapshot(model)
    plan, report = distill.distill_blocks_(model, PLAN, calib(), tmp_path / "d", FAST, progress=False)
    after = model.state_dict()
    for k, v in before.items():
        trained = k.startswith(("model.layers.1.", "model.layers.3."))
        assert torch.equal(after[k], v) != trained, k  # every other parameter bit-for-bit unchanged
    assert spd_blocks(model) == [0, 1, 3] and sorted(report["blocks"]) == ["1", "3"]
    for entry in report["blocks"].values():
        assert entry["loss_after"] < entry["loss_before"] and len(entry["epoch_losses"]) == 2
        assert entry["cost"]["tokens_per_s"] > 0 and entry["cost"]["tflop_per_s"] > 0  # each block says its pace
    assert report["blocks"]["1"]["head_perm"] is None and "loss_before_hg" in report["blocks"]["3"]
    assert plan.head_perm == {3: report["blocks"]["3"]["head_perm"]}
    assert model.config.spd_plan == plan.to_dict()
    assert sorted(plan.weights) == [1, 3]  # the plan names the distilled blocks' files and hashes
    for i, ref in plan.weights.items():
        assert ref["sha256"] == report["blocks"][str(i)]["sha256"] and (tmp_path / "d" / ref["file"]).is_file()


def test_spilled_activations_give_the_same_result(tmp_path):
    runs = []
    for spill in (None, 0.0):
        model = tiny(layers=4)
        opts = replace(FAST, epochs=1) if spill is None else replace(FAST, epochs=1, spill_gb=spill)
        runs.append(distill.distill_blocks_(model, PLAN, calib(), tmp_path / str(spill), opts, progress=False)[1])
    for i in ("1", "3"):
        assert runs[0]["blocks"][i]["loss_after"] == runs[1]["blocks"][i]["loss_after"]
    assert not list((tmp_path / "0.0" / "activations").glob("*.safetensors"))  # spill files removed


def test_interrupted_run_resumes_without_retraining(tmp_path, monkeypatch):
    ref_model = tiny(layers=4)
    distill.distill_blocks_(ref_model, PLAN, calib(), tmp_path / "ref", FAST, progress=False)

    model, out = tiny(layers=4), tmp_path / "run"
    real_train = distill.train_block

    def crash_in_block_3(block, *args, **kw):
        losses = real_train(block, *args, **kw)
        if args[8].startswith("block 3"):  # desc: killed after training block 3, before its weights are written
            raise KeyboardInterrupt
        return losses

    monkeypatch.setattr(distill, "train_block", crash_in_block_3)
    with pytest.raises(KeyboardInterrupt):
        distill.distill_blocks_(model, PLAN, calib(), out, FAST, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["blocks"]) == ["1"]
    assert not (out / "block_3.safetensors").exists()  # no half-trained block is kept
    assert not list(out.glob(".*.tmp"))

    calls = []
    monkeypatch.setattr(distill, "train_block", lambda block, *a, **kw: calls.append(a[8]) or real_train(block, *a, **kw))
    fresh = tiny(layers=4)
    plan, report = distill.distill_blocks_(fresh, PLAN, calib(), out, FAST, progress=False)
    assert calls and all(c.startswith("block 3 ") for c in calls)  # block 1 was loaded, not trained again
    assert report["blocks"]["1"]["resumed"] and not report["blocks"]["3"].get("resumed")
    ref = ref_model.state_dict()
    for k, v in fresh.state_dict().items():  # the same weights as the uninterrupted run
        assert torch.equal(v, ref[k]), k
    assert plan.head_perm == {3: report["blocks"]["3"]["head_perm"]}

    with pytest.raises(SPDError, match="other settings"):
        distill.distill_blocks_(tiny(layers=4), PLAN, calib(), out, replace(FAST, lr=1e-4), progress=False)


def test_plan_with_head_permutations_is_refused(tmp_path):
    plan = SPDPlan(tp=2, num_layers=4, tiers={3: "ESB"}, head_perm={3: list(range(8))})
    with pytest.raises(PlanError, match="already has head permutations"):
        distill.distill_blocks_(tiny(layers=4), plan, calib(), tmp_path, FAST, progress=False)


def test_distill_main_on_stories260k(tmp_path, assets_dir):
    from spd.export import read_plan

    d = assets_dir / "models" / "stories260K"
    plan_file = SPDPlan(tp=2, num_layers=5, tiers={2: "ISB", 3: "SB", 4: "ESB"}, model="stories260k").save(
        tmp_path / "plan.json")
    cfg = RunApp(
        model=ModelConfig(name="stories260k", source="llama2c", path=str(d / "stories260K.bin"),
                          tokenizer=str(d / "tok512.bin")),
        parallel=ParallelConfig(tp=2), spd=SPDConfig(plan=str(plan_file)), run_dir=str(tmp_path / "run"),
        calib=CalibConfig(data="tinystories_val.jsonl", num_samples=4, seq_len=32, batch_size=2),
        distill=DistillConfig(epochs=1, lr=1e-3, batch_size=2),
    )
    out = distill.distill_main(cfg)
    run = tmp_path / "run"
    for f in ("config.yaml", "meta.json", "distill.json", "plan.json", "model/config.json", "distill/manifest.json"):
        assert (run / f).is_file(), f
    saved = json.loads((run / "distill.json").read_text())
    assert sorted(saved["blocks"]) == ["3", "4"] and saved["blocks"]["4"]["head_perm"] is not None
    assert all(len(b["epoch_losses"]) == 1 for b in saved["blocks"].values())  # distill.epochs=1 was used
    assert saved["settings"]["lr"] == 1e-3
    assert set(out["perplexity"]) == {"calibration_original", "calibration_zero_shot", "calibration_distilled"}
    assert read_plan(run / "model").head_perm == {4: saved["blocks"]["4"]["head_perm"]}


@pytest.mark.parametrize("search", ["full", "proxy"])
def test_head_grouping_never_ends_above_the_identity(tmp_path, search):
    """Every GQA ordering (8 heads, 4 KV heads, R = 2: 6) is a candidate. full: each is B2B-trained; proxy: the
    identity and the candidate with the lowest zero-shot error are. The best trained one is kept, and the
    identity candidate is exactly B2B without head grouping."""
    plan = SPDPlan(tp=2, num_layers=4, tiers={2: "ESB", 3: "ESB"})
    opts = replace(FAST, epochs=1, hg_search=search)
    _, hg = distill.distill_blocks_(tiny(layers=4), plan, calib(), tmp_path / "hg", opts, progress=False)
    _, b2b = distill.distill_blocks_(tiny(layers=4), plan, calib(), tmp_path / "b2b", opts, head_grouping=False,
                                     progress=False)
    for i in ("2", "3"):
        e = hg["blocks"][i]
        assert e["head_grouping"]["search"] == "exhaustive" and len(e["hg_candidates"]) == 6
        trained = [c for c in e["hg_candidates"] if c["loss_after"] is not None]
        assert len(trained) == e["hg_trained"] == (6 if search == "full" else 2)
        assert trained[0]["source"] == "identity"
        if search == "proxy":  # the challenger is the zero-shot best of the others
            others = e["hg_candidates"][1:]
            assert trained[1]["zero_shot"] == min(c["zero_shot"] for c in others)
        assert e["loss_after"] == min(c["loss_after"] for c in trained) <= e["identity"]["loss_after"]
        assert e["identity"]["loss_after"] == b2b["blocks"][i]["loss_after"]  # identity = B2B alone
        assert e["loss_before_hg"] == b2b["blocks"][i]["loss_before"]
        assert (e["head_perm"] is None) == (e["hg_chosen"] == "identity")


def test_sequential_inputs_are_the_partly_converted_models(tmp_path):
    """inputs=sequential: block 2 trains on the hidden state after SPD block 0 (zero-shot) and dense block 1,
    against the original model's output; the plan's tiers key the blocks."""
    from spd.perplexity import calibration_inputs, prefix_token
    from spd.block import SPDDecoderLayer

    plan = SPDPlan(tp=2, num_layers=4, tiers={0: "ISB", 2: "SB"})
    seq = replace(FAST, epochs=1, inputs="sequential")
    _, report = distill.distill_blocks_(tiny(layers=4), plan, calib(), tmp_path / "s", seq, progress=False)
    _, dense = distill.distill_blocks_(tiny(layers=4), plan, calib(), tmp_path / "d", replace(seq, inputs="dense"),
                                       progress=False)
    model = tiny(layers=4)
    inputs = calibration_inputs(calib(), prefix_token(config=model.config))
    target = capture_hidden_states(model, inputs, [2], batch_size=2, progress=False).get(3)
    distill.apply_plan_(model, SPDPlan.zero_shot(2, 4, [0]))
    store = capture_hidden_states(model, inputs, [2], batch_size=2, progress=False)
    spd = SPDDecoderLayer(decoder_layers(model)[2], 2, "SB")
    expect = distill.block_mse(spd, store.get(2), target, store.block_kwargs(), 2)
    assert report["blocks"]["2"]["loss_before"] == pytest.approx(expect, rel=1e-5)
    assert report["blocks"]["2"]["loss_before"] != dense["blocks"]["2"]["loss_before"]
    assert report["settings"]["tiers"] == {"0": "ISB", "2": "SB"}
    with pytest.raises(SPDError, match="other settings"):  # another plan's blocks are not reused
        distill.distill_blocks_(tiny(layers=4), SPDPlan(tp=2, num_layers=4, tiers={2: "SB"}), calib(),
                                tmp_path / "s", seq, progress=False)


def test_bad_distill_settings_say_what_is_valid(tmp_path):
    with pytest.raises(SPDError, match="valid: dense, sequential"):
        distill.distill_blocks_(tiny(layers=4), PLAN, calib(), tmp_path, replace(FAST, inputs="chained"))
    with pytest.raises(SPDError, match="valid: constant, cosine"):
        distill.distill_blocks_(tiny(layers=4), PLAN, calib(), tmp_path, replace(FAST, schedule="step"))
    with pytest.raises(SPDError, match="valid: proxy, full"):
        distill.distill_blocks_(tiny(layers=4), PLAN, calib(), tmp_path, replace(FAST, hg_search="all"))


def test_a_block_with_and_without_head_grouping_share_one_directory(tmp_path, monkeypatch):
    """Block 3 as SB (B2B alone) and as ESB (HG + B2B) in one folder: both kept, each reused, neither retrained."""
    out = tmp_path / "shared"
    as_sb = SPDPlan(tp=2, num_layers=4, tiers={3: "SB"})
    as_esb = SPDPlan(tp=2, num_layers=4, tiers={3: "ESB"})
    first = {}
    for name, plan in (("sb", as_sb), ("esb", as_esb)):
        model = tiny(layers=4)
        first[name] = distill.distill_blocks_(model, plan, calib(), out, FAST, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["blocks"]) == ["3", "3_hg"]
    assert manifest["blocks"]["3"]["hg"] is False and manifest["blocks"]["3_hg"]["hg"] is True
    monkeypatch.setattr(distill, "train_block", lambda *a, **kw: pytest.fail("a kept block was trained again"))
    for name, plan in (("sb", as_sb), ("esb", as_esb)):
        again, report = distill.distill_blocks_(tiny(layers=4), plan, calib(), out, FAST, progress=False)
        assert report["blocks"]["3"]["resumed"] and again.weights == first[name][0].weights
    assert first["sb"][0].weights[3]["sha256"] != first["esb"][0].weights[3]["sha256"]


def test_head_grouping_takes_the_identity_candidate_from_a_kept_b2b_block(tmp_path, monkeypatch):
    """With B2B alone of a block already in the folder, the HG search loads it as its identity candidate instead
    of training it again, and ends with the same weights, bit for bit, as a search that trained it."""
    plan = SPDPlan(tp=2, num_layers=4, tiers={2: "ESB", 3: "ESB"})
    opts = replace(FAST, epochs=1)
    _, fresh = distill.distill_blocks_(tiny(layers=4), plan, calib(), tmp_path / "fresh", opts, progress=False)
    shared = tmp_path / "shared"
    distill.distill_blocks_(tiny(layers=4), plan, calib(), shared, opts, head_grouping=False, progress=False)
    descs = []
    real_train = distill.train_block
    monkeypatch.setattr(distill, "train_block", lambda block, *a, **kw: descs.append(a[8]) or real_train(block, *a, **kw))
    _, reused = distill.distill_blocks_(tiny(layers=4), plan, calib(), shared, opts, progress=False)
    assert descs and not [d for d in descs if "identity" in d]  # 5 orderings trained a block, not 6
    for i in ("2", "3"):
        a, b = fresh["blocks"][i], reused["blocks"][i]
        assert b["hg_identity_reused"] and not a["hg_identity_reused"] and b["hg_trained"] == a["hg_trained"] - 1
        assert b["sha256"] == a["sha256"] and b["head_perm"] == a["head_perm"] and b["hg_chosen"] == a["hg_chosen"]
        assert b["hg_candidates"] == a["hg_candidates"]  # the identity's losses too
