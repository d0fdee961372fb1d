"""The main job as users run it: `spd-study` with its defaults (SmolLM2-135M, R = 3, 50% SPD, B2B + HG, the offline
suite, export), only the sizes cut down, on the newest packages pip gives. Every stage must complete, and the
exported directory must load in stock transformers and give the in-memory SPD model's logits."""

import contextlib
import io
import json
import sys

import pytest
import torch

SAME = 1e-5  # fp32: the same weights through stock transformers + the exported block.py
TINY = ["calib.num_samples=2", "calib.seq_len=64", "distill.epochs=1", "eval.limit=2", "ppl.limit=1",
        "ppl.max_length=256", "spd.sb_count=2", "spd.esb_count=1"]  # counts: SB and ESB blocks whatever the ranking


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """`spd-study TINY...` as the console script runs it (Hydra's main, in this process: the reference load
    below then reuses the dequantised checkpoint instead of converting the GGUF again)."""
    from spd.cli import study

    cwd = tmp_path_factory.mktemp("main_job")
    mp = pytest.MonkeyPatch()
    mp.chdir(cwd)
    mp.setattr(sys, "argv", ["spd-study", *TINY])
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            study()
    finally:
        mp.undo()
    (d,) = cwd.glob("runs/study/smollm2_135m/tp3/*")
    return d, out.getvalue()


def test_every_stage_completes(job):
    d, stdout = job
    summary = json.loads((d / "study.json").read_text())
    assert summary["stages"] == {"rank": "computed", "distill": "computed", "perplexity": "computed",
                                 "eval": "computed", "export": "computed"}
    assert summary["model"] == "smollm2_135m" and summary["tp"] == 3 and summary["spd_blocks"] == 15
    assert sorted(summary["eval"]["tasks"]) == ["spd_arc_challenge", "spd_arc_easy", "spd_hellaswag",
                                                "spd_lambada", "spd_offline", "spd_piqa"]
    assert "| stage | status |" in stdout and "-spd_hellaswag|" in stdout.replace(" ", "")  # tables, not JSON


@torch.no_grad()
def test_export_loads_in_stock_transformers_with_the_spd_logits(job):
    from transformers import AutoModelForCausalLM

    from spd.load import load_model, model_config_by_name
    from spd.plan import SPDPlan
    from spd.surgery import apply_plan_

    d, _ = job
    plan = SPDPlan.load(d / "plan.json")
    assert plan.head_perm and plan.weights  # head grouping and distillation ran
    model, tok = load_model(model_config_by_name("smollm2_135m"))
    apply_plan_(model, plan)
    stock = AutoModelForCausalLM.from_pretrained(d / "model", trust_remote_code=True, dtype=torch.float32).eval()
    assert type(stock).__name__ == "SPDLlamaForCausalLM"
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert (stock(ids).logits - model(ids).logits).abs().max() <= SAME
