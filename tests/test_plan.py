"""SPD plan format."""

import json

import pytest

from spd.errors import PlanError
from spd.plan import SPDPlan


def test_round_trip(tmp_path):
    plan = SPDPlan(tp=3, num_layers=30, tiers={29: "ISB", 3: "SB", 0: "ESB"}, head_perm={0: [2, 0, 1]},
                   model="smollm2_135m", source={"ranking": "backward"})
    path = plan.save(tmp_path / "plan.json")
    back = SPDPlan.load(path)
    assert back == plan and back.blocks == [0, 3, 29] and back.blocks_in("SB", "ESB") == [0, 3]
    assert json.loads(path.read_text())["schema"] == "spd.plan/1"


def test_bad_plans(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        SPDPlan.load(tmp_path / "missing.json")
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        SPDPlan.load(tmp_path / "p.json")
    with pytest.raises(PlanError, match="schema"):
        SPDPlan.from_dict({"tp": 2})
    with pytest.raises(PlanError, match="valid tiers"):
        SPDPlan(tp=2, num_layers=4, tiers={1: "XSB"})
    with pytest.raises(PlanError, match="not an SPD block"):
        SPDPlan(tp=2, num_layers=4, tiers={1: "ISB"}, head_perm={2: [0, 1]})
