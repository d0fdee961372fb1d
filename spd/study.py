"""The study, one job: load -> rank -> plan -> distill -> evaluate -> export, resumable stage by stage.

A job directory holds config.yaml, meta.json and one artifact per stage: plan.json, distill.json,
perplexity.json, eval/results.json, model/ (the export) and study.json (the job's summary, written last).
A stage is skipped when its artifact exists, parses and belongs to the same plan; anything else is
recomputed. Work that does not depend on the job's fraction or strategy lives in study.shared_dir and
is computed once per sweep: the sensitivity ranking (per model, R, method and calibration set), the
teacher activations (per model and calibration set, every block boundary, on disk) and the distilled blocks (per model, R, calibration set, distillation settings and head-grouping switch; blocks
are distilled on the original model's hidden states, so a block's result does not depend on which other
blocks are SPD).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

from spd.block import decoder_layers
from spd.errors import SPDError
from spd.plan import SPDPlan
from spd.run import read_json, start_run, write_json_atomic

SCHEMA = "spd.study/1"
STRATEGIES = ("zs", "b2b", "b2b_hg")


def short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def shared_ranking(model, tokens, cfg) -> dict:
    """The ranking for (model, R, method, calibration): read from study.shared_dir or computed there once."""
    from spd.sensitivity import calibration_spec, ranking_in

    d = (Path(cfg.study.shared_dir) / cfg.model.name / f"tp{cfg.parallel.tp}"
         / f"rank-{cfg.spd.ranking}-{short_hash(calibration_spec(cfg.calib))}")
    if not (d / "meta.json").is_file():
        start_run(d, cfg, stage="rank", tp=cfg.parallel.tp)
    return ranking_in(d, model, tokens, cfg)


def shared_activations(model, tokens, cfg):
    """The original model's hidden states at every block boundary for this calibration set, captured once
    into study.shared_dir and reopened by every later job (they depend on neither R nor the plan)."""
    from spd.activations import ActivationStore, capture_hidden_states

    key = {"model": {k: v for k, v in asdict(cfg.model).items() if k != "device"}, "calib": asdict(cfg.calib)}
    d = Path(cfg.study.shared_dir) / cfg.model.name / f"activations-{short_hash(key)}"
    store = ActivationStore.reopen(d)
    if store is None:
        store = capture_hidden_states(model, tokens, range(len(decoder_layers(model))), cfg.calib.batch_size, d)
        store.persist()
    return store


def distill_dir(cfg) -> Path:
    key = {"calib": asdict(cfg.calib), "distill": asdict(cfg.distill), "hg": cfg.study.strategy == "b2b_hg"}
    return Path(cfg.study.shared_dir) / cfg.model.name / f"tp{cfg.parallel.tp}" / f"distill-{cfg.study.strategy}-{short_hash(key)}"


def _fresh(path: Path, plan: SPDPlan) -> dict | None:
    """The artifact at path if it exists, parses and was made for this plan (blocks, tiers, R)."""
    art = read_json(path)
    if art and art.get("plan", {}).get("tiers") == plan.to_dict()["tiers"] and art["plan"].get("tp") == plan.tp:
        return art
    return None


def run_study(cfg) -> dict:
    """One study job (RunApp cfg) in cfg.run_dir; returns the job summary (study.json)."""
    from spd.calibration import calibration_tokens
    from spd.distill import distill_blocks_
    from spd.load import load_model
    from spd.sensitivity import plan_from_ranking
    from spd.surgery import apply_spd_

    if cfg.study.strategy not in STRATEGIES:
        raise SPDError(f"study.strategy={cfg.study.strategy!r}; valid: {', '.join(STRATEGIES)}")
    t0 = time.perf_counter()
    job = start_run(cfg.run_dir, cfg, stage="study", tp=cfg.parallel.tp)
    model, tokenizer = load_model(cfg.model)
    n = len(decoder_layers(model))
    apply_spd_(model, SPDPlan(tp=cfg.parallel.tp, num_layers=n))  # validates R before any work
    tokens = calibration_tokens(tokenizer, cfg.calib)
    stages = {}

    # rank and plan
    ranking = shared_ranking(model, tokens, cfg)
    plan = SPDPlan.load(cfg.spd.plan) if cfg.spd.plan else plan_from_ranking(ranking, cfg.spd, cfg.model.name)
    plan.save(job / "plan.json")

    # distill the SB and ESB blocks (zero-shot: nothing to train)
    repaired = plan.blocks_in("SB", "ESB") if cfg.study.strategy != "zs" else []
    distill = _fresh(job / "distill.json", plan)
    if repaired:
        d0 = time.perf_counter()
        opts = asdict(cfg.distill) | {"head_grouping": cfg.study.strategy == "b2b_hg"}
        plan_after, report = distill_blocks_(model, plan, tokens, distill_dir(cfg), **opts,
                                             activations=lambda: shared_activations(model, tokens, cfg))
        if distill is None:
            distill = {**report, "plan": plan.to_dict(), "minutes": (time.perf_counter() - d0) / 60}
            write_json_atomic(job / "distill.json", distill)
        plan = plan_after
    else:
        apply_spd_(model, plan)
    stages["distill_minutes"] = (distill or {}).get("minutes", 0.0)

    # evaluate: perplexity and the lm-eval suite
    if cfg.study.perplexity and not _fresh(job / "perplexity.json", plan):
        from spd.calibration import read_texts
        from spd.perplexity import document_perplexity

        docs = read_texts(cfg.ppl.data, cfg.ppl.field)[: cfg.ppl.limit]
        ppl = document_perplexity(model, tokenizer, docs, cfg.ppl.max_length, cfg.ppl.batch_size)
        write_json_atomic(job / "perplexity.json", {**ppl, "data": cfg.ppl.data, "plan": plan.to_dict()})
    if cfg.study.evaluate and not _fresh(job / "eval" / "summary.json", plan):
        from spd.evaluate import evaluate

        evaluate(model, tokenizer, cfg.eval, job / "eval")
        summary = read_json(job / "eval" / "summary.json")
        write_json_atomic(job / "eval" / "summary.json", {**summary, "plan": plan.to_dict()})

    # export
    if cfg.study.export and not _fresh(job / "model" / "spd_export.json", plan):
        from spd.export import export_

        export_(model, tokenizer, plan, job / "model", provenance={"job": str(job), "strategy": cfg.study.strategy},
                perplexity=read_json(job / "perplexity.json"))
        write_json_atomic(job / "model" / "spd_export.json", {"plan": plan.to_dict()})

    summary = summarize_job(job, cfg, plan, ranking, stages, (time.perf_counter() - t0) / 60)
    write_json_atomic(job / "study.json", summary)
    return summary


def summarize_job(job: Path, cfg, plan: SPDPlan, ranking: dict, stages: dict, minutes: float) -> dict:
    ppl = read_json(job / "perplexity.json") or {}
    ev = read_json(job / "eval" / "summary.json") or {}
    return {
        "schema": SCHEMA, "model": cfg.model.name, "tp": plan.tp, "num_layers": plan.num_layers,
        "strategy": cfg.study.strategy, "fraction": plan.fraction, "spd_blocks": len(plan.blocks),
        "plan": plan.to_dict(), "ranking": {"method": ranking["method"], "baseline_ppl": ranking["baseline_ppl"]},
        "perplexity": {k: ppl.get(k) for k in ("token_perplexity", "word_perplexity", "bits_per_byte")},
        "eval": {k: v for k, v in ev.items() if k != "plan"},
        "distill_minutes": stages.get("distill_minutes", 0.0), "minutes": minutes,
    }
