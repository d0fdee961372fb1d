"""Every head-grouping candidate of chosen ESB blocks B2B-trained (distill.hg_search=full): does the zero-shot
error rank them as the error after B2B does? Writes the candidates' errors as JSON, prints the orders.

    python scripts/hg_candidates.py --blocks 0 1 3 13 --out docs/results/hg_candidates_smollm2.json

SmolLM2-135M (the default model), R = 3, calibration 16 x 512 of SimpleBooks-92 valid, the paper's B2B
(10 epochs, lr 5e-5), on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spd.calibration import calibration_tokens  # noqa: E402
from spd.config import CalibConfig, DistillConfig  # noqa: E402
from spd.distill import distill_blocks_  # noqa: E402
from spd.load import load_model, model_config_by_name  # noqa: E402
from spd.plan import SPDPlan  # noqa: E402
from spd.run import meta  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", nargs="+", type=int, default=[0, 1, 3, 13])
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--work", default="runs/hg_candidates")
    p.add_argument("--out", default="docs/results/hg_candidates_smollm2.json")
    a = p.parse_args()
    model, tok = load_model(replace(model_config_by_name("smollm2_135m"), device="cpu"))
    tokens = calibration_tokens(tok, CalibConfig(num_samples=16, seq_len=512))
    plan = SPDPlan(tp=a.tp, num_layers=len(model.model.layers), tiers={b: "ESB" for b in a.blocks})
    t0 = time.time()
    _, rep = distill_blocks_(model, plan, tokens, a.work, DistillConfig(hg_search="full"), progress=False)
    cands = {b: rep["blocks"][str(b)]["hg_candidates"] for b in a.blocks}
    Path(a.out).write_text(json.dumps({"command": "python scripts/hg_candidates.py " + " ".join(sys.argv[1:]),
                                       "minutes": (time.time() - t0) / 60, "candidates": cands,
                                       **meta(stage="hg-candidates")}, indent=1) + "\n")
    for b, cs in cands.items():
        order = lambda key: sorted(range(len(cs)), key=lambda k: cs[k][key])  # noqa: E731
        print(f"block {b}: after B2B {order('loss_after')}, zero-shot {order('zero_shot')}, "
              f"first epoch {sorted(range(len(cs)), key=lambda k: cs[k]['epoch_losses'][0])}")


if __name__ == "__main__":
    main()
