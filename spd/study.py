"""The study, one job: load -> rank -> plan -> distill -> evaluate -> export, resumable stage by stage.

A job directory holds config.yaml, meta.json and one artifact per stage: plan.json (the plan every number
below was measured with: tiers, head permutations, distilled blocks' files and sha256), distill.json,
kd.json and kd/ (strategies *_kd: logit distillation of the whole SPD model after B2B, spd.kd), perplexity.json, eval/ (results.json, summary.json), model/ (the export, spd_export.json inside) and
study.json (the job's summary, written last). Each artifact records its settings and key (spd.artifacts):
a re-run deletes what was made with other settings before any work, reuses an artifact only when its key
matches, and recomputes it and everything downstream otherwise. Work that does not depend on the job's
fraction or strategy lives in study.shared_dir, keyed the same way and computed once per sweep under a
file lock: the sensitivity ranking (per model, R, method and calibration set), the teacher activations
(per model and calibration set) and the distilled blocks (per model, R, calibration set and distillation
settings; each block with and without head grouping, so b2b and b2b_hg jobs train an SB block once; with
distill.inputs=dense, the paper's, blocks are distilled on the original model's hidden states, so a block's
result does not depend on which other blocks are SPD; with distill.inputs=sequential the folder is keyed by
the plan's tiers too). KD depends on the job's plan: it
lives in the job.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from spd.artifacts import atomic_dir, file_fingerprint, key_of, model_fingerprint, purge_stale, read_if, remove, shared
from spd.block import decoder_layers
from spd.errors import SPDError
from spd.plan import SPDPlan
from spd.run import meta, start_run, write_json_atomic

SCHEMA = "spd.study/2"
STRATEGIES = ("zs", "b2b", "b2b_hg", "b2b_kd", "b2b_hg_kd")
# bump when a stage's numbers change for the same settings (distill 4: HG keeps the best candidate after B2B)
ALGO = {"distill": 4, "kd": 1, "perplexity": 2, "eval": 1, "export": 1}


def head_grouping(strategy: str) -> bool:
    """Whether a strategy runs head grouping on its ESB blocks."""
    return strategy in ("b2b_hg", "b2b_hg_kd")


def logit_distillation(strategy: str) -> bool:
    """Whether a strategy ends with logit distillation of the whole SPD model (spd.kd)."""
    return strategy.endswith("_kd")


def job_settings(cfg, model) -> dict[str, dict]:
    """Per stage, every setting that can change its artifact (upstream stages' included); cfg: RunApp."""
    from spd.sensitivity import rank_settings

    if cfg.spd.plan:
        planning = {"plan_file": file_fingerprint(cfg.spd.plan), "model": model_fingerprint(cfg.model, model)}
    else:
        planning = {"rank": rank_settings(cfg, model), "spd": {k: v for k, v in asdict(cfg.spd).items() if k not in ("plan", "rank_state_gb")}}
    repair = {**planning, "strategy": cfg.study.strategy, "algo": ALGO["distill"],
              "distill": None if cfg.study.strategy == "zs" else asdict(cfg.distill),
              "calib": None if cfg.study.strategy == "zs" else asdict(cfg.calib)}
    model = {**repair, "kd": asdict(cfg.kd), "kd_algo": ALGO["kd"]} if logit_distillation(cfg.study.strategy) else repair
    return {"distill": repair, "kd": model,
            "perplexity": {"model": model, "ppl": asdict(cfg.ppl), "algo": ALGO["perplexity"]},
            "eval": {"model": model, "eval": asdict(cfg.eval), "algo": ALGO["eval"]},
            "export": {"model": model, "algo": ALGO["export"]}}


def shared_ranking(model, tokens, cfg) -> dict:
    """The ranking for (model, R, method, calibration): read from study.shared_dir or computed there once."""
    from spd.sensitivity import rank_settings, ranking_in

    d = (Path(cfg.study.shared_dir) / cfg.model.name / f"tp{cfg.parallel.tp}"
         / f"rank-{cfg.spd.ranking}-{key_of(rank_settings(cfg, model))}")
    with shared(d, "sensitivity ranking"):
        if not (d / "meta.json").is_file():
            start_run(d, cfg, stage="rank", tp=cfg.parallel.tp)
        return ranking_in(d, model, tokens, cfg, store=lambda: teacher_store(model, tokens, cfg))


def teacher_store(model, tokens, cfg):
    """The shared teacher activations (every block boundary, kept in study.shared_dir) when they fit
    spd.rank_state_gb; None for a bigger model (ranking and distillation then capture what they need)."""
    from spd.sensitivity import all_states_fit

    return shared_activations(model, tokens, cfg) if all_states_fit(model, tokens, cfg) else None


def shared_activations(model, tokens, cfg):
    """The original model's hidden states at every block boundary for this calibration set, captured once
    into study.shared_dir and reopened by every later job (they depend on neither R nor the plan)."""
    from spd.activations import ActivationStore, capture_hidden_states
    from spd.perplexity import calibration_inputs, prefix_token

    key = key_of({"model": model_fingerprint(cfg.model, model), "calib": asdict(cfg.calib), "algo": ALGO["distill"]})
    d = Path(cfg.study.shared_dir) / cfg.model.name / f"activations-{key}"
    with shared(d, "teacher activations"):
        store = ActivationStore.reopen(d)
        if store is None:
            inputs = calibration_inputs(tokens, prefix_token(config=model.config))  # what ranking and B2B see
            store = capture_hidden_states(model, inputs, range(len(decoder_layers(model))), cfg.calib.batch_size, d)
            store.persist()
    return store


def distill_dir(cfg, model, plan: SPDPlan | None = None) -> Path:
    """The shared folder of distilled blocks for (model, R, calibration, distillation settings; with
    distill.inputs=sequential also the plan's tiers). Every strategy that distils uses it: a block's entries
    with and without head grouping sit side by side (spd.distill.entry_key), so an SB block, the same for
    b2b and b2b_hg, is trained once, and *_kd jobs start from their base strategy's blocks."""
    settings = {"model": model_fingerprint(cfg.model, model), "tp": cfg.parallel.tp, "calib": asdict(cfg.calib),
                "distill": asdict(cfg.distill), "algo": ALGO["distill"]}
    if cfg.distill.inputs == "sequential":
        settings["tiers"] = plan and {str(i): t for i, t in sorted(plan.tiers.items())}
    return Path(cfg.study.shared_dir) / cfg.model.name / f"tp{cfg.parallel.tp}" / f"distill-{key_of(settings)}"


def run_study(cfg) -> dict:
    """One study job (RunApp cfg) in cfg.run_dir; returns the job summary (study.json)."""
    from spd.calibration import calibration_windows, resolve_auto_
    from spd.load import load_model
    from spd.sensitivity import plan_from_ranking
    from spd.surgery import apply_plan_

    if cfg.study.strategy not in STRATEGIES:
        raise SPDError(f"study.strategy={cfg.study.strategy!r}; valid: {', '.join(STRATEGIES)}")
    resolve_auto_(cfg)
    t0 = time.perf_counter()
    job = start_run(cfg.run_dir, cfg, stage="study", tp=cfg.parallel.tp)
    for name in ("study.json", "plan.json"):  # written by this run (the plan after ranking, the summary last)
        (job / name).unlink(missing_ok=True)
    model, tokenizer = load_model(cfg.model)
    apply_plan_(model, SPDPlan(tp=cfg.parallel.tp, num_layers=len(decoder_layers(model))))  # validates R
    settings_of = job_settings(cfg, model)
    settings = {stage: key_of(s) for stage, s in settings_of.items()}
    gone = purge_stale(job, {"distill.json": ("distill.json", settings["distill"]),
                             "kd": ("kd.json", settings["kd"]), "kd.json": ("kd.json", settings["kd"]),
                             "perplexity.json": ("perplexity.json", settings["perplexity"]),
                             "eval": ("eval/summary.json", settings["eval"]),
                             "model": ("model/spd_export.json", settings["export"])})
    if gone:
        print(f"settings changed: removed {', '.join(gone)} (made with other settings) from {job}")
    tokens, coverage = calibration_windows(tokenizer, cfg.calib)
    stages: dict[str, str] = {}

    # rank and plan
    ranking = None
    if cfg.spd.plan:
        plan, stages["rank"] = SPDPlan.load(cfg.spd.plan), "given"
    else:
        ranking = shared_ranking(model, tokens, cfg)
        stages["rank"] = "reused" if ranking["reused"] else "computed"
        plan = plan_from_ranking(ranking, cfg.spd, cfg.model.name)
    plan.save(job / "plan.json")

    # repair the SB and ESB blocks (zero-shot: nothing to train)
    plan, stages["distill"] = _distill(model, plan, tokens, cfg, job, settings["distill"])
    if logit_distillation(cfg.study.strategy):  # then the whole SPD model against the dense one
        plan, stages["kd"] = _kd(model, plan, tokens, cfg, job, settings["kd"])
    apply_plan_(model, plan)
    plan.save(job / "plan.json")  # the plan every number below is measured with
    keys = {stage: key_of({"settings": settings[stage], "plan": plan.identity()})
            for stage in ("perplexity", "eval", "export")}

    # evaluate: perplexity and the lm-eval suite
    stages["perplexity"] = _stage(job / "perplexity.json", job / "perplexity.json", keys["perplexity"],
                                  cfg.study.perplexity, lambda: _perplexity(model, tokenizer, cfg, job, plan,
                                                                             keys["perplexity"], settings["perplexity"]))
    stages["eval"] = _stage(job / "eval", job / "eval" / "summary.json", keys["eval"], cfg.study.evaluate,
                            lambda: _evaluate(model, tokenizer, cfg, job, plan, keys["eval"], settings["eval"]))
    stages["export"] = _stage(job / "model", job / "model" / "spd_export.json", keys["export"], cfg.study.export,
                              lambda: _export(model, tokenizer, cfg, job, plan, keys["export"], settings["export"]))

    summary = summarize_job(job, cfg, plan, ranking, stages, (time.perf_counter() - t0) / 60)
    summary["calibration"] = {"num_samples": cfg.calib.num_samples, "seq_len": cfg.calib.seq_len, **coverage}
    summary["key"] = key_of(keys)
    write_json_atomic(job / "study.json", summary)
    return summary


def _stage(path: Path, marker: Path, key: str, enabled: bool, compute) -> str:
    """Reuse the artifact at path when its marker records key; else compute it (or remove it when disabled)."""
    if read_if(marker, key):
        return "reused"
    if path.exists():
        remove(path)  # made for another plan (e.g. shared blocks distilled again)
    if not enabled:
        return "off"
    compute()
    return "computed"


def _distill(model, plan: SPDPlan, tokens, cfg, job: Path, settings: str) -> tuple[SPDPlan, str]:
    """(the plan after head grouping and B2B of its SB/ESB blocks, stage status); writes distill.json."""
    from spd.distill import distill_blocks_

    repaired = plan.blocks_in("SB", "ESB") if cfg.study.strategy != "zs" else []
    key = key_of({"settings": settings, "plan": plan.identity()})
    art = read_if(job / "distill.json", key)
    if plan.weights or plan.head_perm:  # a given plan.json that was repaired already (spd-distill, a study)
        (job / "distill.json").unlink(missing_ok=True)
        return plan, "given"
    if not repaired:
        (job / "distill.json").unlink(missing_ok=True)
        return plan, "none"
    if art:
        reused = SPDPlan.from_dict(art["plan"], base=job)
        if all(Path(w["file"]).is_file() for w in reused.weights.values()):
            return reused, "reused"  # else the shared blocks were deleted: distil again
    with shared(distill_dir(cfg, model, plan), "distilled blocks") as d:
        t0 = time.perf_counter()  # after the lock: a job waiting for another's blocks has spent nothing
        plan_after, report = distill_blocks_(model, plan, tokens, d, cfg.distill,
                                             head_grouping=head_grouping(cfg.study.strategy),
                                             activations=lambda: teacher_store(model, tokens, cfg))
    trained = [i for i, b in report["blocks"].items() if not b.get("resumed")]
    write_json_atomic(job / "distill.json", {**report, "key": key, "settings": settings, "trained": trained,
                                             "plan": plan_after.to_dict(base=job),
                                             "minutes": (time.perf_counter() - t0) / 60, "meta": meta(stage="distill")})
    return plan_after, "computed" if trained else "reused"


def _kd(model, plan: SPDPlan, tokens, cfg, job: Path, settings: str) -> tuple[SPDPlan, str]:
    """(the plan after logit distillation of its SPD blocks, stage status); writes kd/ and kd.json (the marker,
    last). A killed run leaves no kd.json and is redone whole."""
    from spd.kd import kd_repair_
    from spd.load import load_model

    if not plan.blocks:
        (job / "kd.json").unlink(missing_ok=True)
        return plan, "none"
    key = key_of({"settings": settings, "plan": plan.identity()})
    if art := read_if(job / "kd.json", key):
        reused = SPDPlan.from_dict(art["plan"], base=job)
        if all(Path(w["file"]).is_file() for w in reused.weights.values()):
            return reused, "reused"
    (job / "kd.json").unlink(missing_ok=True)
    remove(job / "kd")
    teacher, _ = load_model(cfg.model)  # the dense original
    plan_after, report = kd_repair_(model, teacher, plan, tokens, job / "kd", cfg.kd, cfg.calib.batch_size)
    del teacher
    write_json_atomic(job / "kd.json", {**report, "key": key, "settings": settings, "plan": plan_after.to_dict(base=job),
                                        "meta": meta(stage="kd")})
    return plan_after, "computed"


def _perplexity(model, tokenizer, cfg, job: Path, plan: SPDPlan, key: str, settings: str) -> None:
    from spd.calibration import read_texts
    from spd.perplexity import document_perplexity, perplexity_table

    docs = read_texts(cfg.ppl.data, cfg.ppl.field)[: cfg.ppl.limit]
    ppl = document_perplexity(model, tokenizer, docs, cfg.ppl.max_length, cfg.ppl.batch_size, cfg.ppl.preprocess)
    write_json_atomic(job / "perplexity.json", {"schema": "spd.perplexity/1", **ppl, "data": cfg.ppl.data,
                                                "key": key, "settings": settings, "plan": plan.to_dict(base=job),
                                                "meta": meta(stage="perplexity")})
    print(perplexity_table(ppl))


def _evaluate(model, tokenizer, cfg, job: Path, plan: SPDPlan, key: str, settings: str) -> None:
    from spd.evaluate import evaluate
    from spd.run import read_json

    with atomic_dir(job / "eval") as tmp:
        evaluate(model, tokenizer, cfg.eval, tmp)
        summary = read_json(tmp / "summary.json")
        write_json_atomic(tmp / "summary.json", {**summary, "key": key, "settings": settings,
                                                 "plan": plan.to_dict(base=job), "meta": meta(stage="eval")})


def _export(model, tokenizer, cfg, job: Path, plan: SPDPlan, key: str, settings: str) -> None:
    from spd.export import export_
    from spd.run import read_json

    export_(model, tokenizer, plan, job / "model", provenance={"job": str(job), "strategy": cfg.study.strategy},
            perplexity=read_json(job / "perplexity.json"),
            marker={"schema": "spd.export/1", "key": key, "settings": settings, "meta": meta(stage="export")})


def summarize_job(job: Path, cfg, plan: SPDPlan, ranking: dict | None, stages: dict, minutes: float) -> dict:
    from spd.run import read_json

    ppl = read_json(job / "perplexity.json") or {}
    ev = read_json(job / "eval" / "summary.json") or {}
    distill = read_json(job / "distill.json") or {}
    kd = read_json(job / "kd.json") or {}
    return {
        "schema": SCHEMA, "model": cfg.model.name, "tp": plan.tp, "num_layers": plan.num_layers,
        "strategy": cfg.study.strategy, "fraction": plan.fraction, "spd_blocks": len(plan.blocks),
        "plan": plan.to_dict(base=job),
        "ranking": ranking and {"method": ranking["method"], "baseline_ppl": ranking["baseline_ppl"]},
        "perplexity": {k: ppl.get(k) for k in ("token_perplexity", "word_perplexity", "bits_per_byte")},
        "eval": {k: v for k, v in ev.items() if k not in ("plan", "settings", "meta")},
        "stages": stages, "distill_minutes": distill.get("minutes", 0.0), "kd_minutes": kd.get("minutes", 0.0),
        "kd": {k: kd.get(k) for k in ("kl_before", "kl_after", "calibration_ppl_before", "calibration_ppl_after")}
        if kd else None, "minutes": minutes,
    }


def study_table(summary: dict) -> str:
    """A short Markdown table of a finished job: stages and headline numbers."""
    groups = set(summary["eval"].get("groups", []))
    acc = [m["acc"]["value"] for t, m in summary["eval"].get("tasks", {}).items() if "acc" in m and t not in groups]
    ppl = summary["perplexity"].get("word_perplexity")
    lines = [f"{summary['model']} R={summary['tp']}: {summary['spd_blocks']}/{summary['num_layers']} SPD blocks, "
             f"strategy {summary['strategy']}, {summary['minutes']:.1f} min in this run (reused stages not counted)",
             "| stage | status |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary["stages"].items()]
    lines += ["", "| measure | value |", "|---|---|",
              f"| word perplexity | {'-' if ppl is None else f'{ppl:.4f}'} |",
              f"| mean acc over {len(acc)} tasks | {'-' if not acc else f'{sum(acc) / len(acc):.4f}'} |"]
    return "\n".join(lines)
