"""Exported SPD checkpoints load in stock transformers and lm-eval and reproduce the in-memory SPD model."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import spd.export as export
from spd.config import DistillConfig
from spd.distill import distill_blocks_
from spd.heads import permute_heads_
from spd.errors import PlanError
from spd.plan import SPDPlan
from spd.run import PROJECT_ROOT
from spd.surgery import apply_plan_
from test_block import tiny, tokens

ROUND_TRIP = 1e-5  # fp32, same weights; sdpa after loading vs eager in memory reorders sums only
LOGLIK = 1e-4  # a sum of a few log-probabilities, each within ROUND_TRIP

# Runs in a fresh process, like a user would: stock transformers (and lm-eval's HFLM, as `--model hf
# --model_args pretrained=PATH,trust_remote_code=True` builds it), offline, with no spd package imported.
LOADER = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
job = json.load(open(sys.argv[1]))
out = {}
for name, path in job["dirs"].items():
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.tensor(job["ids"][name])
    with torch.no_grad():
        spd = [l for l in model.model.layers if type(l).__name__ == "SPDDecoderLayer"]
        logits = model(ids).logits.tolist()
        loaded = [l.self_attn.o_proj.weight for l in spd]
        linked = all(l.restore().self_attn.o_proj.weight is w for l, w in zip(spd, loaded))
        out[name] = {"cls": type(model).__name__, "logits": logits, "linked": linked,
                     "spd_blocks": [i for i, l in enumerate(model.model.layers) if l in spd]}
if job.get("lm_eval"):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    lm = get_model("hf").create_from_arg_string(
        f"pretrained={job['lm_eval']},trust_remote_code=True,dtype=float32", {"batch_size": 1, "device": "cpu"})
    ctx, cont = job["request"]
    (ll, _), = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)], disable_tqdm=True)
    c, t = lm._encode_pair(ctx, cont)
    out["lm_eval"] = {"cls": type(lm.model).__name__, "loglik": ll, "ctx": c, "cont": t,
                      "spd_modules": sorted({type(m).__name__ for m in lm.model.modules()})}
assert "spd" not in sys.modules, "the export must load without spd-study installed"
json.dump(out, open(job["out"], "w"))
"""


def load_in_fresh_process(tmp_path, job: dict) -> dict:
    job = {**job, "out": str(tmp_path / "out.json")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": "",
           "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}  # PYTHONPATH empty: only the export makes SPD
    r = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "job.json")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads((tmp_path / "out.json").read_text())


@pytest.fixture(scope="module")
def exported(tmp_path_factory, stories260k):
    """A random tiny GQA model and a distilled stories260K, exported; reference logits from memory."""
    tmp = tmp_path_factory.mktemp("export")
    small = tiny(heads=8, kv=2, layers=3)
    plan_small = SPDPlan(tp=4, num_layers=3, tiers={0: "ISB", 2: "ESB"}, head_perm={2: [4, 5, 6, 7, 0, 1, 2, 3]})
    apply_plan_(small, plan_small)  # permutes block 2's heads
    model, tok = copy.deepcopy(stories260k[0]), stories260k[1]  # the fixture is shared: never change it
    calib = torch.randint(3, 512, (4, 24), generator=torch.Generator().manual_seed(0))
    plan, _ = distill_blocks_(model, SPDPlan(tp=2, num_layers=5, tiers={1: "ISB", 3: "SB", 4: "ESB"}), calib,
                              tmp / "distill", DistillConfig(epochs=1, batch_size=2), progress=False)
    dirs = {"tiny": export.export_(small, None, plan_small, tmp / "tiny", provenance={"source_model": "random"}),
            "stories": export.export_(model, tok, plan, tmp / "stories", provenance={"source_model": "stories260K"},
                                      perplexity={"calibration": 12.5})}
    ids = {"tiny": tokens(), "stories": tok("Once upon a time, there was a little", return_tensors="pt").input_ids}
    request = ("Once upon a time, there was a little", " girl")
    job = {"dirs": {k: str(v) for k, v in dirs.items()}, "ids": {k: v.tolist() for k, v in ids.items()},
           "lm_eval": str(dirs["stories"]), "request": request}
    loaded = load_in_fresh_process(tmp, job)
    with torch.no_grad():
        ref = {"tiny": small(ids["tiny"]).logits, "stories": model(ids["stories"]).logits}
    return dict(dirs=dirs, plans={"tiny": plan_small, "stories": plan}, models={"tiny": small, "stories": model},
                ids=ids, ref=ref, loaded=loaded)


@pytest.mark.parametrize("name", ["tiny", "stories"])
def test_fresh_process_reproduces_the_spd_logits(exported, name):
    got = exported["loaded"][name]
    assert got["cls"] == "SPDLlamaForCausalLM" and got["spd_blocks"] == exported["plans"][name].blocks
    assert got["linked"]  # remove_spd_ would restore the loaded o_proj, not the pre-load placeholder
    assert (torch.tensor(got["logits"]) - exported["ref"][name]).abs().max() <= ROUND_TRIP


@pytest.mark.parametrize("name", ["tiny", "stories"])
def test_directory_holds_plan_code_and_card(exported, name):
    d, plan = exported["dirs"][name], exported["plans"][name]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["spd_plan"] == plan.to_dict(base=d) and cfg["model_type"] == "llama"
    assert cfg["spd_weights"] == {k: plan.identity()[k] for k in ("head_perm", "weights")}
    assert cfg["auto_map"] == {"AutoModelForCausalLM": "modeling_spd_llama.SPDLlamaForCausalLM"}
    assert cfg["spd_provenance"]["commit"] and cfg["spd_provenance"]["source_model"]
    assert (d / "block.py").read_text() == (PROJECT_ROOT / "spd" / "block.py").read_text()
    assert export.read_plan(d).identity() == plan.identity()
    card = (d / "README.md").read_text()
    assert "trust_remote_code=True" in card and f"degree R = {plan.tp}" in card
    if name == "stories":
        assert (d / "tokenizer.json").is_file() and "12.5000" in card
    assert not [p for p in d.parent.iterdir() if p.name.startswith(f".{name}.")]  # no temp dirs left


@pytest.mark.parametrize("name", ["tiny", "stories"])
@torch.no_grad()
def test_load_exported_without_remote_code(exported, name):
    model, tok, plan = export.load_exported(exported["dirs"][name])
    assert plan.identity() == exported["plans"][name].identity() and (tok is None) == (name == "tiny")
    logits = model(exported["ids"][name]).logits
    assert (logits - exported["ref"][name]).abs().max() <= ROUND_TRIP
    assert list(model.state_dict()) == list(exported["models"][name].state_dict())


def test_lm_eval_hf_model_scores_the_spd_model(exported):
    got = exported["loaded"]["lm_eval"]
    assert got["cls"] == "SPDLlamaForCausalLM" and "SPDDecoderLayer" in got["spd_modules"]
    ids = torch.tensor(got["ctx"] + got["cont"])[None]
    with torch.no_grad():
        logp = exported["models"]["stories"](ids[:, :-1]).logits.log_softmax(-1)[0]
    n = len(got["cont"])
    ref = logp[-n:].gather(-1, ids[0, -n:, None]).sum().item()
    assert got["loglik"] == pytest.approx(ref, abs=LOGLIK)


def test_interrupted_export_leaves_no_directory(tmp_path, monkeypatch):
    model = tiny()
    plan = SPDPlan.zero_shot(2, 3, [1])
    apply_plan_(model, plan)

    def boom(*a, **k):
        raise KeyboardInterrupt  # killed after the weights were written, before the model card

    monkeypatch.setattr(export, "model_card", boom)
    with pytest.raises(KeyboardInterrupt):
        export.export_(model, None, plan, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    first = export.export_(model, None, plan, tmp_path / "out", provenance={"n": 1})
    monkeypatch.setattr(export, "model_card", boom)
    with pytest.raises(KeyboardInterrupt):  # a failed re-export keeps the previous export whole
        export.export_(model, None, plan, tmp_path / "out", provenance={"n": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert json.loads((first / "config.json").read_text())["spd_provenance"]["n"] == 1


def test_export_refuses_a_model_carrying_another_plan(tmp_path):
    model = apply_plan_(tiny(), SPDPlan(tp=2, num_layers=3, tiers={1: "ESB"}, head_perm={1: [4, 5, 6, 7, 0, 1, 2, 3]}))
    with pytest.raises(PlanError, match="already carry head permutations"):
        export.export_(model, None, SPDPlan(tp=2, num_layers=3, tiers={1: "ESB"}, head_perm={1: list(range(8))}),
                       tmp_path / "out")
    assert not (tmp_path / "out").exists()


@torch.no_grad()
def test_export_main_applies_the_plan_and_its_permutation(tmp_path, assets_dir, stories260k):
    from spd.config import CalibConfig, ModelConfig, ParallelConfig, RunApp, SPDConfig

    d = assets_dir / "models" / "stories260K"
    perm = [2, 3, 0, 1, 6, 7, 4, 5]  # KV heads 1, 0, 3, 2 with their query heads
    plan = SPDPlan(tp=2, num_layers=5, tiers={0: "ISB", 4: "ESB"}, head_perm={4: perm})
    cfg = RunApp(model=ModelConfig(name="stories260k", source="llama2c", path=str(d / "stories260K.bin"),
                                   tokenizer=str(d / "tok512.bin")),
                 parallel=ParallelConfig(tp=2), spd=SPDConfig(plan=str(plan.save(tmp_path / "plan.json"))),
                 calib=CalibConfig(data="tinystories_val.jsonl", num_samples=2, seq_len=32),
                 run_dir=str(tmp_path / "run"))
    out = export.export_main(cfg)
    ref = copy.deepcopy(stories260k[0])
    permute_heads_(ref.model.layers[4], perm)
    apply_plan_(ref, plan)
    model, _, got_plan = export.load_exported(out)
    ids = tokens(v=512)
    assert got_plan.identity() == plan.identity() and (model(ids).logits - ref(ids).logits).abs().max() <= ROUND_TRIP
    saved = json.loads((tmp_path / "run" / "export.json").read_text())
    assert saved["perplexity"]["calibration"] > 1 and (tmp_path / "run" / "meta.json").is_file()
