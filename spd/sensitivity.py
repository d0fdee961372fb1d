"""Block sensitivity to SPD, and plans chosen from it.

Backward sweep (paper): switch blocks to zero-shot SPD one at a time from the last block backwards,
keeping the earlier switches; sensitivity(i) = ppl(after switching i) - ppl(before). It is path
dependent, so the isolated variant is offered too: sensitivity(i) = ppl(only block i SPD) - ppl(no SPD).
Perplexity is measured on calibration windows. Both write `spd.sensitivity/1` JSON: model, R, method,
calibration spec, baseline perplexity, per-block perplexity and sensitivity, the ascending order.

Plans: the k least sensitive blocks (k from a fraction or a count) become SPD blocks; their tiers come
from thresholds on relative sensitivity (sensitivity / baseline ppl), or from counts (the most sensitive
chosen blocks become ESB, the next SB). The paper does not say how its thresholds were set: the defaults
here (SB above 1% of baseline ppl, ESB above 10%) are ours, and configurable.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from spd.block import decoder_layers, remove_spd_, set_spd_
from spd.config import CalibConfig, SPDConfig
from spd.errors import SPDError
from spd.perplexity import windows_perplexity
from spd.plan import SPDPlan
from spd.run import read_json, write_json_atomic

SCHEMA = "spd.sensitivity/1"
METHODS = ("backward", "isolated")
DEFAULT_SB_REL, DEFAULT_ESB_REL = 0.01, 0.10


def rank_blocks(model, tokens, tp: int, method: str = "backward", batch_size: int = 4,
                progress_file: Path | None = None, spec: dict | None = None) -> dict:
    """Per-block sensitivity of `model` at degree tp on (N, L) calibration tokens (see module doc).

    With progress_file, every finished block is recorded there atomically and a re-run resumes after it.
    """
    if method not in METHODS:
        raise SPDError(f"unknown ranking method {method!r}; valid: {', '.join(METHODS)}")
    n = len(decoder_layers(model))
    done = read_json(progress_file) if progress_file else None
    key = {"tp": tp, "method": method, "calibration": spec or {}}
    if not done or done.get("key") != key:
        done = {"key": key, "baseline_ppl": None, "ppl": {}, "seconds": {}}
    remove_spd_(model)
    if done["baseline_ppl"] is None:
        done["baseline_ppl"] = windows_perplexity(model, tokens, batch_size)
    base = done["baseline_ppl"]
    order = list(range(n - 1, -1, -1))  # backward: last block first
    for i in tqdm(order, desc=f"rank ({method}, R={tp})"):
        if str(i) in done["ppl"]:
            continue
        switched = [j for j in order[: order.index(i) + 1]] if method == "backward" else [i]
        start = time.perf_counter()
        set_spd_(model, tp, {j: "ISB" for j in switched})
        done["ppl"][str(i)] = windows_perplexity(model, tokens, batch_size)
        done["seconds"][str(i)] = time.perf_counter() - start
        if progress_file:
            write_json_atomic(progress_file, done)
    remove_spd_(model)
    ppl = {i: done["ppl"][str(i)] for i in range(n)}
    if method == "backward":
        before = {i: ppl[i + 1] if i + 1 < n else base for i in range(n)}
    else:
        before = {i: base for i in range(n)}
    sens = {i: ppl[i] - before[i] for i in range(n)}
    return {
        "schema": SCHEMA, "tp": tp, "method": method, "num_layers": n, "calibration": spec or {},
        "baseline_ppl": base,
        "blocks": [{"block": i, "ppl": ppl[i], "sensitivity": sens[i], "relative": sens[i] / base,
                    "seconds": done["seconds"].get(str(i))} for i in range(n)],
        "order": sorted(range(n), key=lambda i: sens[i]),  # least sensitive first
        "seconds_total": sum(done["seconds"].values()),
    }


def plan_from_ranking(ranking: dict, cfg: SPDConfig, model_name: str = "", fraction: float | None = None) -> SPDPlan:
    """The SPD plan of a ranking: which blocks (least sensitive first) and their tiers (see module doc)."""
    n, order = ranking["num_layers"], ranking["order"]
    fraction = cfg.fraction if fraction is None else fraction
    k = n if fraction is None else round(fraction * n)
    if not 0 <= k <= n:
        raise SPDError(f"spd.fraction={fraction} must lie in [0, 1]")
    chosen = order[:k]
    rel = {b["block"]: b["relative"] for b in ranking["blocks"]}
    if cfg.sb_count is not None or cfg.esb_count is not None:
        by_sens = sorted(chosen, key=lambda i: -rel[i])
        esb = set(by_sens[: cfg.esb_count or 0])
        sb = set(by_sens[len(esb): len(esb) + (cfg.sb_count or 0)])
        tiers = {i: "ESB" if i in esb else "SB" if i in sb else "ISB" for i in chosen}
        rule = {"sb_count": cfg.sb_count, "esb_count": cfg.esb_count}
    else:
        sb_t = DEFAULT_SB_REL if cfg.sb_threshold is None else cfg.sb_threshold
        esb_t = DEFAULT_ESB_REL if cfg.esb_threshold is None else cfg.esb_threshold
        tiers = {i: "ESB" if rel[i] > esb_t else "SB" if rel[i] > sb_t else "ISB" for i in chosen}
        rule = {"sb_threshold_rel": sb_t, "esb_threshold_rel": esb_t}
    return SPDPlan(tp=ranking["tp"], num_layers=n, tiers=tiers, model=model_name,
                   source={"ranking": ranking["method"], "fraction": k / n, **rule})


def plot_sensitivity(ranking: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = ranking["blocks"]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(blocks)), 3.2))
    ax.bar([b["block"] for b in blocks], [b["sensitivity"] for b in blocks], color="tab:blue")
    ax.set_xlabel("block")
    ax.set_ylabel("perplexity increase")
    ax.set_title(f"SPD sensitivity ({ranking['method']}, R={ranking['tp']}, base ppl {ranking['baseline_ppl']:.2f})")
    ax.set_yscale("symlog", linthresh=max(1e-3, abs(ranking["baseline_ppl"]) * 1e-3))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def calibration_spec(cfg: CalibConfig) -> dict:
    return asdict(cfg)


def ranking_in(run_dir: Path, model, tokens, cfg) -> dict:
    """The ranking stored in run_dir for (R, method, calibration) of cfg (RunApp), computed there when it is
    missing or was made for other settings; resumes block by block. tokens: (N, L) or a callable giving them."""
    spec = calibration_spec(cfg.calib)
    out = Path(run_dir) / "sensitivity.json"
    ranking = read_json(out)
    key = (cfg.parallel.tp, cfg.spd.ranking, spec)
    if ranking and (ranking.get("tp"), ranking.get("method"), ranking.get("calibration")) == key:
        return ranking
    ranking = rank_blocks(model, tokens() if callable(tokens) else tokens, cfg.parallel.tp, cfg.spd.ranking,
                          cfg.calib.batch_size, progress_file=Path(run_dir) / "sensitivity.progress.json", spec=spec)
    ranking["model"] = cfg.model.name
    write_json_atomic(out, ranking)
    (Path(run_dir) / "sensitivity.progress.json").unlink(missing_ok=True)
    plot_sensitivity(ranking, Path(run_dir) / "sensitivity.png")
    return ranking


def run_rank(cfg) -> dict:
    """spd-rank: ranking, plot and plan in cfg.run_dir (RunApp); resumes a crashed run block by block."""
    from spd.calibration import calibration_tokens
    from spd.load import load_model
    from spd.run import start_run
    from spd.surgery import apply_spd_

    run_dir = start_run(cfg.run_dir, cfg, stage="rank", tp=cfg.parallel.tp)
    model, tokenizer = load_model(cfg.model)
    apply_spd_(model, SPDPlan(tp=cfg.parallel.tp, num_layers=len(decoder_layers(model))))  # validates R
    ranking = ranking_in(run_dir, model, lambda: calibration_tokens(tokenizer, cfg.calib), cfg)
    plan = plan_from_ranking(ranking, cfg.spd, cfg.model.name)
    plan.save(run_dir / "plan.json")
    print(f"baseline ppl {ranking['baseline_ppl']:.3f}; least sensitive first: {ranking['order']}")
    print(f"plan: {len(plan.blocks)}/{plan.num_layers} SPD blocks at R={plan.tp} -> {run_dir / 'plan.json'}")
    return ranking
