"""Logit distillation after B2B: it lowers the calibration KL, trains only the SPD blocks, and its plan carries it."""

import pytest
import torch

from spd.config import KDConfig
from spd.errors import SPDError
from spd.kd import calibration_kl, kd_loss, kd_repair_
from spd.perplexity import calibration_inputs, prefix_token
from spd.plan import SPDPlan
from spd.schedule import lr_factor
from spd.surgery import apply_plan_
from test_block import EXACT_FP32, tiny

PLAN = SPDPlan(tp=2, num_layers=3, tiers={0: "ISB", 2: "SB"})
TOKENS = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0))
FAST = KDConfig(steps=15, lr=3e-3, batch_size=2)


def test_kd_loss_is_the_kl_of_the_distributions():
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    p = t.softmax(-1)
    ref = (p * (p.log() - s.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, t, 1.0), ref)
    assert kd_loss(t, t, 2.0).abs() < 1e-6


def test_kd_lowers_the_calibration_kl_and_its_plan_carries_it(tmp_path):
    teacher, model = tiny(), tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan, report = kd_repair_(model, teacher, PLAN, TOKENS, tmp_path / "kd", FAST, batch_size=2, progress=False)
    assert report["kl_after"] < report["kl_before"] and len(report["losses"]) == FAST.steps
    assert report["cost"]["tokens_per_s"] > 0 and report["cost"]["tflop_per_s"] > 0
    assert report["calibration_ppl_after"] > 1 and report["minutes"] > 0  # random weights: ppl near the vocabulary size
    for k, v in model.state_dict().items():  # only the SPD blocks' parameters trained
        assert torch.equal(v, before[k]) != k.startswith(("model.layers.0.", "model.layers.2.")), k
    assert sorted(plan.weights) == [0, 2] and plan.tiers == PLAN.tiers
    fresh = apply_plan_(tiny(), plan)  # the plan's files put the same model on an original checkpoint
    inputs = calibration_inputs(TOKENS, prefix_token(config=model.config))
    with torch.no_grad():
        assert (fresh(inputs).logits - model(inputs).logits).abs().max() <= EXACT_FP32
    assert calibration_kl(fresh, teacher, inputs, 2) == pytest.approx(report["kl_after"], rel=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # frozen only while training


def test_bad_kd_settings_say_what_is_valid(tmp_path):
    with pytest.raises(SPDError, match="valid: constant, cosine"):
        kd_repair_(tiny(), tiny(), PLAN, TOKENS, tmp_path, KDConfig(schedule="linear"), progress=False)
    with pytest.raises(SPDError, match="needs SPD blocks"):
        kd_repair_(tiny(), tiny(), SPDPlan(tp=2, num_layers=3), TOKENS, tmp_path, FAST, progress=False)


def test_schedules():
    assert [lr_factor(t, 10, "constant", 0.2) for t in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    cos = [lr_factor(t, 10, "cosine", 0.0) for t in range(10)]
    assert cos[0] == 1.0 and all(a > b for a, b in zip(cos, cos[1:])) and cos[-1] > 0
