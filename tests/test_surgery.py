"""apply_plan_, the one way to put a plan on a model: every entry point gives the same logits.

A plan with head groups and distilled blocks is made on stories260K (distill_blocks_, the study's path,
leaves the SPD model in memory: the reference). Then the model is prepared again by each entry point from
the original checkpoint and the saved plan.json: spd-ppl and spd-eval (load_model + apply_plan_ inside their
commands), spd-lm-eval (SPDLM with plan=), spd-export (stock transformers, trust_remote_code), and the
tensor-parallel runtime (2 gloo ranks). Each must give the reference's logits (fp32).
"""

import copy
import json
import math
from dataclasses import replace

import pytest
import torch

from overlap.checkpoint import load_runtime_model
from overlap.launch import spawn_ranks
from overlap.runtime import Runtime
from spd.config import CalibConfig, DistillConfig, EvalConfig, ModelConfig, ParallelConfig, PerplexityConfig, RunApp, SPDConfig
from spd.distill import distill_blocks_
from spd.errors import PlanError
from spd.plan import SPDPlan
from spd.surgery import apply_plan_, carried_weights

SAME = 1e-5  # fp32, the same weights and the same ops; only summation order may differ
TP_SAME = 1e-5  # relative to the largest logit: fp32 over gloo sums the R partials in another order


def stories_cfg(assets_dir) -> ModelConfig:
    d = assets_dir / "models" / "stories260K"
    return ModelConfig(name="stories260k", source="llama2c", path=str(d / "stories260K.bin"),
                       tokenizer=str(d / "tok512.bin"))


@pytest.fixture(scope="module")
def made(tmp_path_factory, stories260k, assets_dir):
    tmp = tmp_path_factory.mktemp("surgery")
    model, tok = copy.deepcopy(stories260k[0]), stories260k[1]
    calib = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    plan, _ = distill_blocks_(model, SPDPlan(tp=2, num_layers=5, tiers={1: "ISB", 3: "SB", 4: "ESB"}), calib,
                              tmp / "distill", DistillConfig(epochs=1, lr=1e-3, batch_size=2, hg_search="full"),
                              progress=False)  # full: a grouping beats the identity here (the path under test)
    assert plan.head_perm and sorted(plan.weights) == [3, 4]
    plan_file = plan.save(tmp / "job" / "plan.json")
    rows = [tok(t).input_ids for t in ("Once upon a time, there was a little girl", "The dog ran to the park and")]
    ids = torch.tensor([r[:min(map(len, rows))] for r in rows])  # (2, S): batch 2, not only row 0
    with torch.no_grad():
        ref = model(ids).logits
        dense = stories260k[0](ids).logits
    cfg = RunApp(model=stories_cfg(assets_dir), parallel=ParallelConfig(tp=2), spd=SPDConfig(plan=str(plan_file)),
                 calib=CalibConfig(data="tinystories_val.jsonl", num_samples=2, seq_len=32),
                 ppl=PerplexityConfig(data="tinystories_val.jsonl", field="text", max_length=64, limit=4,
                                      preprocess=None),
                 eval=EvalConfig(tasks=["spd_tinystories_cloze"], limit=6, batch_size=4, max_length=128))
    return dict(tmp=tmp, model=model, tok=tok, plan=plan, plan_file=plan_file, ids=ids, ref=ref, dense=dense, cfg=cfg)


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


def test_plan_file_round_trips_with_relative_weights(made):
    saved = json.loads(made["plan_file"].read_text())
    assert all(not w["file"].startswith("/") for w in saved["weights"].values())  # beside the plan, movable
    assert SPDPlan.load(made["plan_file"]).identity() == made["plan"].identity()


def test_reference_differs_from_dense(made):
    assert maxdiff(made["ref"], made["dense"]) > 1e3 * SAME  # SPD + distillation visibly change the logits


@torch.no_grad()
def test_apply_plan_on_the_original_checkpoint(made, stories260k):
    model = apply_plan_(copy.deepcopy(stories260k[0]), SPDPlan.load(made["plan_file"]))
    assert maxdiff(model(made["ids"]).logits, made["ref"]) <= SAME
    assert carried_weights(model)["weights"] == {str(i): w["sha256"] for i, w in made["plan"].weights.items()}
    apply_plan_(model, made["plan"])  # again: recognised as carried, not permuted twice
    assert maxdiff(model(made["ids"]).logits, made["ref"]) <= SAME


def test_spd_ppl_entry_point(made):
    from spd.perplexity import document_perplexity, run_perplexity
    from spd.calibration import read_texts

    cfg = replace(made["cfg"], run_dir=str(made["tmp"] / "ppl"))
    got = run_perplexity(cfg)
    docs = read_texts("tinystories_val.jsonl", "text")[:4]
    ref = document_perplexity(made["model"], made["tok"], docs, 64, 4, None, progress=False)
    assert math.isclose(got["nll"], ref["nll"], rel_tol=SAME) and got["tokens"] == ref["tokens"]


def test_spd_eval_entry_point(made):
    from spd.evaluate import evaluate, main

    cfg = replace(made["cfg"], run_dir=str(made["tmp"] / "eval"))
    got = main(cfg)["results"]["spd_tinystories_cloze"]
    ref = evaluate(made["model"], made["tok"], cfg.eval, made["tmp"] / "eval_ref")["results"]["spd_tinystories_cloze"]
    assert got["acc,none"] == ref["acc,none"]
    assert math.isclose(got["perplexity,none"], ref["perplexity,none"], rel_tol=SAME)


@torch.no_grad()
def test_spd_lm_eval_entry_point(made):
    from spd.lm_eval_model import SPDLM

    lm = SPDLM(model="stories260k", plan=str(made["plan_file"]), batch_size=2)
    assert maxdiff(lm.forward_logits(made["ids"]), made["ref"]) <= SAME


@torch.no_grad()
def test_spd_export_entry_point(made):
    from transformers import AutoModelForCausalLM

    from spd.export import export_main

    cfg = replace(made["cfg"], run_dir=str(made["tmp"] / "export"))
    out = export_main(cfg)
    stock = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(stock).__name__ == "SPDLlamaForCausalLM"
    assert maxdiff(stock(made["ids"]).logits, made["ref"]) <= SAME


def runtime_worker(ctx, source, plan_file, ids):
    model, _, plan = load_runtime_model(source, ctx, torch.float32, SPDPlan.load(plan_file))
    return Runtime(model, ctx, max_batch=ids.shape[0], max_seq=ids.shape[1]).prefill(ids)


def test_tensor_parallel_runtime_entry_point(made, assets_dir):
    results = spawn_ranks(runtime_worker, 2, made["tmp"] / "ranks",
                          args=(stories_cfg(assets_dir), str(made["plan_file"]), made["ids"]), timeout_s=150)
    for r, logits in enumerate(results):
        assert maxdiff(logits, made["ref"]) <= TP_SAME * made["ref"].abs().max().item(), f"rank {r}"


def test_changed_weights_file_is_refused(made, stories260k, tmp_path):
    plan = made["plan"]
    i, ref = next(iter(plan.weights.items()))
    bad = tmp_path / "block.safetensors"
    bad.write_bytes(open(ref["file"], "rb").read()[:-1] + b" ")
    wrong = replace(plan, weights={**plan.weights, i: {"file": str(bad), "sha256": ref["sha256"]}})
    with pytest.raises(PlanError, match="changed after the plan was written"):
        apply_plan_(copy.deepcopy(stories260k[0]), wrong)
