"""Sensitivity ranking (backward and isolated), resuming, and plans from rankings."""

import pytest
import torch

import spd.sensitivity as sens_mod
from spd.config import SPDConfig
from spd.perplexity import windows_perplexity
from spd.plan import SPDPlan
from spd.sensitivity import plan_from_ranking, rank_blocks
from spd.surgery import apply_plan_, spd_blocks
from test_block import tiny

TOKENS = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_backward_sweep_accumulates_and_ends_at_all_spd():
    model = tiny(layers=4)
    r = rank_blocks(model, TOKENS, tp=2, method="backward")
    assert spd_blocks(model) == []  # the model is left as it was
    ppl = {b["block"]: b["ppl"] for b in r["blocks"]}
    apply_plan_(model, SPDPlan.zero_shot(2, 4, [0, 1, 2, 3]))
    assert ppl[0] == pytest.approx(windows_perplexity(model, TOKENS))  # block 0 is switched last
    total = sum(b["sensitivity"] for b in r["blocks"])
    assert total == pytest.approx(ppl[0] - r["baseline_ppl"])  # the increments telescope
    assert sorted(r["order"]) == [0, 1, 2, 3]
    assert [r["blocks"][i]["sensitivity"] for i in r["order"]] == sorted(b["sensitivity"] for b in r["blocks"])


@torch.no_grad()
def test_isolated_ranking():
    model = tiny(layers=3)
    r = rank_blocks(model, TOKENS, tp=4, method="isolated")
    apply_plan_(model, SPDPlan.zero_shot(4, 3, [1]))
    assert r["blocks"][1]["ppl"] == pytest.approx(windows_perplexity(model, TOKENS))


@torch.no_grad()
def test_resume_after_crash(tmp_path, monkeypatch):
    model, progress = tiny(layers=4), tmp_path / "progress.json"
    full = rank_blocks(model, TOKENS, tp=2)
    calls, real = [], sens_mod.windows_perplexity

    def crash_after_two(*a, **k):
        calls.append(1)
        if len(calls) > 3:  # baseline + two blocks
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sens_mod, "windows_perplexity", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        rank_blocks(model, TOKENS, tp=2, progress_file=progress)
    monkeypatch.setattr(sens_mod, "windows_perplexity", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    calls.clear()
    resumed = rank_blocks(model, TOKENS, tp=2, progress_file=progress)
    assert len(calls) == 2  # only the two blocks not finished before the crash
    assert [b["ppl"] for b in resumed["blocks"]] == pytest.approx([b["ppl"] for b in full["blocks"]])


def fake_ranking(rel):
    n = len(rel)
    return {"num_layers": n, "tp": 3, "method": "backward", "baseline_ppl": 10.0,
            "order": sorted(range(n), key=lambda i: rel[i]),
            "blocks": [{"block": i, "relative": rel[i], "sensitivity": 10 * rel[i]} for i in range(n)]}


def test_plan_by_fraction_and_thresholds():
    r = fake_ranking([0.5, 0.001, 0.02, 0.0, 0.2, 0.003, 0.05, 0.3])
    plan = plan_from_ranking(r, SPDConfig(fraction=0.75))
    assert plan.blocks == [1, 2, 3, 4, 5, 6]  # the 6 least sensitive
    assert plan.tiers == {3: "ISB", 1: "ISB", 5: "ISB", 2: "SB", 6: "SB", 4: "ESB"}
    plan = plan_from_ranking(r, SPDConfig(fraction=0.5, sb_count=1, esb_count=1))
    assert plan.tiers == {3: "ISB", 1: "ISB", 5: "SB", 2: "ESB"}
    assert plan_from_ranking(r, SPDConfig()).fraction == 1.0
    with pytest.raises(ValueError, match="fraction"):
        plan_from_ranking(r, SPDConfig(fraction=1.5))


@pytest.mark.parametrize("fraction, n, k", [
    (0.25, 30, 8), (0.75, 30, 23),  # 7.5 and 22.5: halves round up (round() would give 8 and 22)
    (0.5, 5, 3), (0.1, 30, 3), (0.7, 10, 7),  # 0.7 * 10 = 7.000000000000001, 0.1 * 30 = 3.0000000000000004
    (0.0, 30, 0), (1.0, 30, 30), (0.49, 5, 2), (0.51, 5, 3)])
def test_fraction_to_block_count_rounds_halves_up(fraction, n, k):
    from spd.sensitivity import spd_block_count

    assert spd_block_count(fraction, n) == k


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_fraction_outside_0_1_is_refused(fraction):
    from spd.errors import SPDError
    from spd.sensitivity import spd_block_count

    with pytest.raises(SPDError, match=r"must lie in \[0, 1\]"):
        spd_block_count(fraction, 10)


@pytest.mark.parametrize("method", ["backward", "isolated"])
@pytest.mark.parametrize("spill", [False, True])
@torch.no_grad()
def test_ranking_from_cached_block_inputs_is_the_same_ranking(method, spill, stories260k, tmp_path):
    """Each step starts at the switched block's cached input (the dense model's hidden state): the same
    perplexities as full forwards (fp32, summation order only), the same order, L(L+1)/2 block forwards."""
    from spd.activations import capture_hidden_states
    from spd.perplexity import calibration_inputs, prefix_token

    model = stories260k[0]
    tokens = torch.randint(3, 512, (6, 48), generator=torch.Generator().manual_seed(1))
    n = 5
    full = rank_blocks(model, tokens, tp=2, method=method, batch_size=4)
    store = capture_hidden_states(model, calibration_inputs(tokens, prefix_token(config=model.config)), range(n),
                                  batch_size=4, spill_dir=tmp_path / "spill" if spill else None, progress=False)
    fast = rank_blocks(model, tokens, tp=2, method=method, batch_size=4, store=store)
    assert fast["order"] == full["order"]
    for a, b in zip(fast["blocks"], full["blocks"]):
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-5)
    assert full["cost"]["block_forwards"] == n + n * n and fast["cost"]["block_forwards"] == n + n * (n + 1) // 2
    assert fast["cost"]["cached_inputs"] and fast["cost"]["tflop_per_s"] > 0
    assert spd_blocks(model) == []
    # bounded memory: block inputs captured two at a time (a forward up to each chunk's last block)
    inputs = calibration_inputs(tokens, prefix_token(config=model.config))
    chunked = rank_blocks(model, tokens, tp=2, method=method, batch_size=4, max_states=2,
                          capture=lambda b: capture_hidden_states(model, inputs, b, 4, progress=False, inputs_only=True))
    assert chunked["order"] == full["order"]
    for a, b in zip(chunked["blocks"], full["blocks"]):
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-5)
    assert spd_blocks(model) == []
