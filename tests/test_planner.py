"""Latency-aware planner: the budget bounds the measured perplexity; more budget, more SPD blocks."""

import pytest
import torch

from spd.perplexity import windows_perplexity
from spd.plan import SPDPlan
from spd.run import read_json, write_json_atomic
from spd.planner import BlockForms, plan_within_budget, threshold_rule_within_budget
from spd.surgery import apply_plan_, spd_blocks
from test_block import tiny

TOKENS = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_budget_bounds_the_measured_perplexity():
    model = tiny(layers=4)
    forms = BlockForms(model)
    tight, loose = (plan_within_budget(forms, TOKENS, 2, b) for b in (0.0, 1e9))
    assert spd_blocks(model) == []  # the model is left dense
    assert loose["spd_blocks"] == 4 and tight["ppl"] <= tight["baseline_ppl"]
    base = loose["baseline_ppl"]
    incs = [t["ppl"] - base for t in loose["trace"]]  # after 1, 2, 3, 4 blocks in the greedy order
    mid_budget = (min(incs) + max(incs)) / 2 / base  # between the measured increases (this model: decreases)
    mid = plan_within_budget(forms, TOKENS, 2, mid_budget)
    assert [t["kept"] for t in mid["trace"]] == [t["ppl"] - base <= mid_budget * base for t in mid["trace"]]
    assert not all(t["kept"] for t in mid["trace"])  # some block was refused
    assert mid["spd_blocks"] == 0 or mid["ppl"] - base <= mid_budget * base
    choice = {int(i): f for i, f in loose["choice"].items()}
    apply_plan_(model, SPDPlan.zero_shot(2, 4, choice))  # zs only: no distilled forms were loaded
    assert windows_perplexity(model, TOKENS) == loose["ppl"]


@torch.no_grad()
def test_threshold_rule_takes_the_longest_prefix_within_budget():
    model = tiny(layers=4)
    forms = BlockForms(model)
    full = SPDPlan.zero_shot(2, 4, range(4))
    rule = threshold_rule_within_budget(forms, TOKENS, full, [3, 2, 1, 0], 1e9)
    assert rule["spd_blocks"] == 4 and rule["choice"] == {str(i): "zs" for i in range(4)}
    rule = threshold_rule_within_budget(forms, TOKENS, full, [3, 2, 1, 0], -1.0)
    assert rule["spd_blocks"] == 0


@torch.no_grad()
def test_isolated_costs_resume_after_an_interrupt(tmp_path, monkeypatch):
    """A run killed after two blocks keeps their measurements; the next measures only the rest, with the
    same baseline, and ends with what one uninterrupted run measures."""
    import spd.planner as planner

    forms = BlockForms(tiny(layers=4))
    whole = planner.isolated_costs(forms, TOKENS, 2)
    measure, calls = planner.windows_perplexity, []

    def dies_after_three(*a, **k):  # the baseline and blocks 0 and 1 (zs only: no distilled forms)
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return measure(*a, **k)

    monkeypatch.setattr(planner, "windows_perplexity", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        planner.shared_isolated_costs(forms, TOKENS, 2, 4, tmp_path)
    kept = read_json(next(tmp_path.glob("isolated-*.json")))
    assert not kept["complete"] and sorted(kept["isolated"]) == ["0:zs", "1:zs"]
    calls.clear()
    monkeypatch.setattr(planner, "windows_perplexity", lambda *a, **k: (calls.append(1), measure(*a, **k))[1])
    again = planner.shared_isolated_costs(forms, TOKENS, 2, 4, tmp_path)
    assert len(calls) == 2  # blocks 2 and 3 only
    assert again["isolated"] == pytest.approx(whole["isolated"]) and again["baseline_ppl"] == whole["baseline_ppl"]
    assert read_json(next(tmp_path.glob("isolated-*.json")))["complete"]
    assert planner.shared_isolated_costs(forms, TOKENS, 2, 4, tmp_path)["isolated"] == again["isolated"]
    assert len(calls) == 2  # complete: nothing measured again


def test_run_planner_measures_repaired_forms_and_reports_against_the_rule(tmp_path, monkeypatch):
    """spd-plan +experiment=quick: every block repaired as b2b and b2b_hg (shared dirs), the planner's plan and
    the threshold rule's put on a fresh model, and the report's planner table compares them."""
    from hydra import compose, initialize_config_dir

    from spd.calibration import calibration_tokens
    from spd.config import CONF_DIR, as_dataclass
    from spd.load import load_model
    from spd.planner import run_planner
    from spd.report import planner_table

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = as_dataclass(compose("plan", overrides=[
            "+experiment=quick", f"study.shared_dir={tmp_path / 'shared'}", "calib.num_samples=2", "calib.seq_len=32",
            "distill.epochs=1", "planner.budget=0.5", "report.bench=[]"]))
    cfg.run_dir = str(tmp_path / "plan")
    out = run_planner(cfg)
    model, tokenizer = load_model(cfg.model)
    calib = calibration_tokens(tokenizer, cfg.calib)
    forms = {f for k in out["planner"]["isolated"] for f in [k.split(":")[1]]}
    assert forms == {"zs", "b2b", "b2b_hg"}  # every block's repaired forms were measured
    for name, res in (("plan.json", out["planner"]), ("plan_threshold.json", out["threshold_rule"])):
        plan = SPDPlan.load(tmp_path / "plan" / name)
        model, _ = load_model(cfg.model)  # fresh: the original weights
        apply_plan_(model, plan)  # the files and head permutations it names put it on an original model
        assert len(plan.tiers) == res["spd_blocks"]
        assert windows_perplexity(model, calib) == pytest.approx(res["ppl"], rel=1e-5)
    assert "threshold rule forms" in planner_table([out], {})

    # another budget (a sweep's next job) reuses the measured isolated costs, keyed by the blocks' sha256
    import spd.planner as planner

    def measure_again(*a, **k):
        raise AssertionError("isolated costs measured again")

    monkeypatch.setattr(planner, "isolated_costs", measure_again)
    cfg.planner.budget, cfg.run_dir = 0.1, str(tmp_path / "plan2")
    again = run_planner(cfg)
    assert again["planner"]["isolated"] == out["planner"]["isolated"]
    assert again["planner"]["spd_blocks"] <= out["planner"]["spd_blocks"]
    ddir = next((tmp_path / "shared").rglob("isolated-*.json")).parent
    for f in ddir.glob("isolated-*.json"):  # stale: other weights under the same key are measured afresh
        kept = read_json(f)
        kept["settings"]["blocks"]["b2b"]["0"] = "0" * 64
        write_json_atomic(f, kept)
    with pytest.raises(AssertionError, match="measured again"):
        run_planner(cfg)
