"""Exported SPD checkpoints: a directory stock transformers loads with trust_remote_code=True.

The exported model computes exactly the in-memory emulation (spd/block.py): for every SPD block i of
the plan, out = x + sum_r (a_r + mlp_r(norm2(x + a_r))) at degree R, other blocks unchanged. Contents:

    config.json              LlamaConfig + spd_plan (schema spd.plan/1) + spd_weights (what the weights
                             carry: head_perm and distilled blocks' sha256, see spd.surgery) + spd_provenance
                             + auto_map {AutoModelForCausalLM: modeling_spd_llama.SPDLlamaForCausalLM}
    model.safetensors        the SPD model's state dict (same keys as the original LLaMA's); head-grouped
                             and distilled blocks are stored ALREADY applied, so head_perm is provenance
    modeling_spd_llama.py    LlamaForCausalLM subclass whose __init__ applies the plan with set_spd_
    block.py                 a verbatim copy of spd/block.py (torch + transformers only), imported
                             relatively: transformers' dynamic-module loader copies it alongside
    plan.json, tokenizer files, README.md (model card: plan and measured perplexity)

model_type stays "llama" so spd.load and the TP runtime read the directory as a LLaMA (apply_plan_ then
recognises the weights as the plan's and only swaps in the SPD blocks); loading WITHOUT trust_remote_code silently gives the non-SPD model.
The directory is built beside out_dir and renamed into place: an interrupted export leaves no out_dir.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from spd.plan import SPDPlan
from spd.run import git_commit, user_mode, write_json_atomic
from spd.surgery import apply_plan_, carried_weights, remove_spd_

MODELING = "modeling_spd_llama"
CLASS = "SPDLlamaForCausalLM"
BLOCK_SRC = Path(__file__).with_name("block.py")

MODELING_SRC = '''"""SPD LLaMA exported by spd-study: LlamaForCausalLM with the attention all-reduce dropped in the
blocks of config.spd_plan at tensor-parallel degree spd_plan["tp"], emulated exactly on one device:

    SPD block:  out = x + sum_r (a_r + mlp_r(norm2(x + a_r)))     (a_r: rank r's attention partial)

Weights are stored already distilled and head-permuted; __init__ only swaps in the SPD blocks.
"""

from transformers import LlamaForCausalLM

from .block import set_spd_


class SPDLlamaForCausalLM(LlamaForCausalLM):
    _no_split_modules = ["LlamaDecoderLayer", "SPDDecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        plan = getattr(config, "spd_plan", None) or {}
        tiers = {int(i): t for i, t in plan.get("tiers", {}).items()}
        set_spd_(self, int(plan.get("tp", 1)), tiers)
'''


def model_card(plan: SPDPlan, provenance: dict, perplexity: dict | None) -> str:
    """README.md: what the checkpoint is, its plan, its measured perplexity and how to load it."""
    rows = "\n".join(f"| {i} | {plan.tiers[i]} | {plan.head_perm.get(i, '')} |" for i in plan.blocks)
    ppl = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                    for k, v in (perplexity or {}).items()) or "| (not measured) | |"
    return f"""---
library_name: transformers
tags: [llama, spd, sync-point-drop, tensor-parallel]
---
# SPD LLaMA: {plan.model or provenance.get("source_model", "model")} at TP degree {plan.tp}

Sync-Point Drop (Kim et al., ICML 2025): {len(plan.tiers)} of {plan.num_layers} blocks drop the all-reduce
after attention at tensor-parallel degree R = {plan.tp}; rank r's MLP sees x + a_r instead of x + sum_j a_j.
This checkpoint computes that R-rank model exactly on one device. Exported by spd-study.

## Load

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)
```
lm-eval: `lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True ...`.
Without `trust_remote_code=True` transformers loads a plain LLaMA from these weights: NOT the SPD model.

## Plan

| block | tier | head permutation (new j = old perm[j], already applied to the weights) |
|---|---|---|
{rows}

ISB: zero-shot SPD; SB: SPD + block-to-block distillation; ESB: head grouping, then distillation.

## Measured perplexity

| measurement | value |
|---|---|
{ppl}

## Provenance

```json
{json.dumps(provenance, indent=2, default=str)}
```
"""


def _write_dir(model, tokenizer, plan: SPDPlan, d: Path, provenance: dict, perplexity: dict | None) -> None:
    remove_spd_(model)  # the same weights under the same names; offloaded ones are found through their hooks
    try:
        model.save_pretrained(d, safe_serialization=True)
    finally:
        apply_plan_(model, plan)
    if tokenizer is not None:
        tokenizer.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update({
        "architectures": [CLASS],
        "auto_map": {"AutoModelForCausalLM": f"{MODELING}.{CLASS}"},
        "spd_plan": plan.to_dict(base=d),
        "spd_weights": carried_weights(model),
        "spd_provenance": provenance,
    })
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    (d / f"{MODELING}.py").write_text(MODELING_SRC)
    shutil.copyfile(BLOCK_SRC, d / "block.py")
    (d / "README.md").write_text(model_card(plan, provenance, perplexity))


def export_(model, tokenizer, plan: SPDPlan, out_dir: str | Path, provenance: dict | None = None,
            perplexity: dict | None = None, marker: dict | None = None) -> Path:
    """Write the model with `plan` put on it (spd.surgery.apply_plan_; a no-op when it is on) to out_dir.

    Atomic: an existing out_dir is replaced only after the new directory is complete; `marker`, if given,
    is written into it as spd_export.json (the study's key for the export).
    """
    apply_plan_(model, plan)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    provenance = {"commit": git_commit(), "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(provenance or {})}
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    os.chmod(tmp, user_mode(0o777))
    old = None
    try:
        _write_dir(model, tokenizer, plan, tmp, provenance, perplexity)
        if marker is not None:
            write_json_atomic(tmp / "spd_export.json", marker)
        if out_dir.exists():  # move the old export aside; the new one appears whole or not at all
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            out_dir.rename(old / "dir")
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out_dir.exists():
            (old / "dir").rename(out_dir)  # put the previous export back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir


def read_plan(path: str | Path) -> SPDPlan:
    """The SPD plan stored in an exported directory's config.json."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    if "spd_plan" not in cfg:
        raise ValueError(f"{path}/config.json has no spd_plan: not an spd-study export")
    return SPDPlan.from_dict(cfg["spd_plan"])


def load_exported(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer or None, plan) without remote code: stock LlamaForCausalLM + apply_plan_."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = Path(path)
    plan = read_plan(path)
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return apply_plan_(model, plan), tokenizer, plan


def export_main(cfg) -> Path:
    """spd-export: load cfg.model, apply the plan cfg.spd.plan (its head permutations included), export.

    cfg: spd.config.RunApp. Writes run_dir/model (the export) and run_dir/export.json; the calibration
    perplexity of the exported model goes on the model card (when the model has a tokenizer).
    """
    from spd.calibration import calibration_tokens
    from spd.errors import PlanError
    from spd.load import load_model
    from spd.perplexity import windows_perplexity
    from spd.run import meta, start_run, to_plain

    if not cfg.spd.plan:
        raise PlanError("spd-export needs spd.plan=PATH/plan.json (from spd-rank, spd-distill or spd-study)")
    run_dir = start_run(cfg.run_dir, cfg, stage="export", tp=cfg.parallel.tp)
    plan = SPDPlan.load(cfg.spd.plan)
    if plan.tp != cfg.parallel.tp:
        raise PlanError(f"the plan is for tp={plan.tp} but parallel.tp={cfg.parallel.tp}; set parallel.tp={plan.tp}")
    model, tokenizer = load_model(cfg.model)
    apply_plan_(model, plan)
    ppl = None
    if tokenizer is not None:
        ppl = {"calibration": windows_perplexity(model, calibration_tokens(tokenizer, cfg.calib),
                                                 cfg.calib.batch_size)}
    provenance = {"source_model": to_plain(cfg.model), "plan_file": str(cfg.spd.plan), "ranking": plan.source}
    out = export_(model, tokenizer, plan, run_dir / "model", provenance=provenance, perplexity=ppl)
    write_json_atomic(run_dir / "export.json", {"schema": "spd.export/1", "path": str(out), "perplexity": ppl,
                                                "plan": plan.to_dict(), "meta": meta(stage="export", tp=plan.tp)})
    return out
