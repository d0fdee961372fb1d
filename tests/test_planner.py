"""Latency-aware planner: the budget bounds the measured perplexity; more budget, more SPD blocks."""

import torch

from spd.perplexity import windows_perplexity
from spd.plan import SPDPlan
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
