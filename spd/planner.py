"""Latency-aware planning: the most SPD blocks, each with its best repair, within a perplexity budget.

Beyond the paper's hand-set thresholds. Every SPD block removes one all-reduce of the same size, so the
latency saving grows with the number of SPD blocks k (spd-bench measures the curve); maximising the
saving under a budget is maximising k. Each block i has two candidate forms: zero-shot SPD (zs) and
SPD with block-to-block distilled weights (b2b, trained once per block on the original model's hidden
states, so a block's weights do not depend on the other blocks). With c_i(s) the isolated calibration
perplexity increase of block i in form s, the planner sorts blocks by min_s c_i(s), adds them greedily
in their best form, measures the calibration perplexity of the whole plan after each addition and
keeps the block only when the measured increase stays within budget * baseline (interactions are
measured, not assumed additive). The paper's rule at equal budget, for comparison: blocks in the
backward ranking's order, zs for ISB and b2b for SB/ESB (thresholds as in spd.sensitivity), the largest
prefix whose measured increase is within budget.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from spd.block import decoder_layers, remove_spd_, set_spd_
from spd.perplexity import windows_perplexity
from spd.plan import SPDPlan
from spd.run import read_json

SCHEMA = "spd.planner/1"


class BlockForms:
    """Original and distilled weights of every block, swapped in on demand (CPU copies)."""

    def __init__(self, model):
        from spd.errors import SPDError
        from spd.placement import is_offloaded

        if is_offloaded(model):
            raise SPDError("spd-plan keeps every block's original and distilled weights in memory and cannot run on "
                           "a model offloaded to the CPU or disk; give it GPUs enough for the model "
                           "(model.device_map=auto with model.max_memory) or a smaller model")
        self.model, self.layers = model, decoder_layers(model)
        self.orig = {i: {k: v.detach().clone() for k, v in l.state_dict().items()} for i, l in enumerate(self.layers)}
        self.b2b, self.refs = {}, {}  # block -> distilled state dict; block -> {"file", "sha256"} (plan.weights)

    def load_distilled(self, distilled_dir: Path) -> None:
        """Distilled block weights from a distill directory (blocks without head permutation)."""
        manifest = read_json(distilled_dir / "manifest.json")
        for i, entry in ((manifest or {}).get("blocks") or {}).items():
            if entry.get("head_perm") is None and (distilled_dir / entry["file"]).is_file() and "sha256" in entry:
                self.b2b[int(i)] = load_file(str(distilled_dir / entry["file"]))
                self.refs[int(i)] = {"file": str(distilled_dir / entry["file"]), "sha256": entry["sha256"]}

    def forms(self, i: int) -> list[str]:
        return ["zs", "b2b"] if i in self.b2b else ["zs"]

    def configure_(self, tp: int, choice: dict[int, str]) -> None:
        """Blocks in choice become SPD in the given form; the others are original."""
        remove_spd_(self.model)
        for i, layer in enumerate(self.layers):
            sd = self.b2b[i] if choice.get(i) == "b2b" else self.orig[i]
            layer.load_state_dict(sd)
        set_spd_(self.model, tp, {i: "SB" if f == "b2b" else "ISB" for i, f in choice.items()})


def plan_within_budget(forms: BlockForms, tokens: torch.Tensor, tp: int, budget: float, batch_size: int = 4) -> dict:
    """Greedy measured planning (module doc). budget: allowed relative calibration-perplexity increase."""
    forms.configure_(tp, {})
    base = windows_perplexity(forms.model, tokens, batch_size)
    iso = {}
    for i in tqdm(range(len(forms.layers)), desc="planner: isolated costs"):
        for f in forms.forms(i):
            forms.configure_(tp, {i: f})
            iso[(i, f)] = windows_perplexity(forms.model, tokens, batch_size) - base
    best = {i: min(forms.forms(i), key=lambda f: iso[(i, f)]) for i in range(len(forms.layers))}
    order = sorted(best, key=lambda i: iso[(i, best[i])])
    choice, ppl, trace = {}, base, []
    for i in tqdm(order, desc="planner: greedy"):
        trial = {**choice, i: best[i]}
        forms.configure_(tp, trial)
        p = windows_perplexity(forms.model, tokens, batch_size)
        keep = p - base <= budget * base
        trace.append({"block": i, "form": best[i], "ppl": p, "kept": keep})
        if keep:
            choice, ppl = trial, p
    forms.configure_(tp, {})
    return {"baseline_ppl": base, "ppl": ppl, "choice": {str(i): f for i, f in sorted(choice.items())},
            "spd_blocks": len(choice), "isolated": {f"{i}:{f}": c for (i, f), c in iso.items()}, "trace": trace}


def threshold_rule_within_budget(forms: BlockForms, tokens: torch.Tensor, plan_full: SPDPlan, order: list[int],
                                 budget: float, batch_size: int = 4, base: float | None = None) -> dict:
    """The paper's rule at equal budget: the largest prefix of the ranking order within budget.

    base: the dense calibration perplexity, if already measured."""
    if base is None:
        forms.configure_(plan_full.tp, {})
        base = windows_perplexity(forms.model, tokens, batch_size)
    form = {i: ("zs" if t == "ISB" or i not in forms.b2b else "b2b") for i, t in plan_full.tiers.items()}
    best, trace = {"spd_blocks": 0, "ppl": base, "choice": {}}, []
    for k in tqdm(range(1, len(order) + 1), desc="threshold rule"):
        choice = {i: form[i] for i in order[:k]}
        forms.configure_(plan_full.tp, choice)
        p = windows_perplexity(forms.model, tokens, batch_size)
        trace.append({"k": k, "ppl": p})
        if p - base > budget * base:
            break
        best = {"spd_blocks": k, "ppl": p, "choice": {str(i): f for i, f in sorted(choice.items())}}
    forms.configure_(plan_full.tp, {})
    return {"baseline_ppl": base, **best, "trace": trace}


def choice_plan(choice: dict[str, str], tp: int, num_layers: int, model: str, source: dict,
                refs: dict[int, dict] | None = None) -> SPDPlan:
    """The plan of a planner choice: b2b blocks are SB and name their distilled weights (refs)."""
    refs = refs or {}
    return SPDPlan(tp=tp, num_layers=num_layers, model=model, source=source,
                   tiers={int(i): ("SB" if f == "b2b" else "ISB") for i, f in choice.items()},
                   weights={int(i): refs[int(i)] for i, f in choice.items() if f == "b2b"})


def run_planner(cfg) -> dict:
    """spd-plan: distill every block once (shared), then plan within cfg.planner.budget; compare with the
    threshold rule; writes planner.json, plan.json (the planner's) and plan_threshold.json in cfg.run_dir."""
    from dataclasses import replace

    from spd.artifacts import shared
    from spd.calibration import calibration_tokens
    from spd.distill import distill_blocks_
    from spd.load import load_model
    from spd.report import latency_curve, latency_saving, load_records, target_name
    from spd.run import start_run, write_json_atomic
    from spd.sensitivity import plan_from_ranking
    from spd.study import distill_dir, shared_activations, shared_ranking

    run_dir = start_run(cfg.run_dir, cfg, stage="planner", tp=cfg.parallel.tp)
    model, tokenizer = load_model(cfg.model)
    n, tp = len(decoder_layers(model)), cfg.parallel.tp
    tokens = calibration_tokens(tokenizer, cfg.calib)
    ranking = shared_ranking(model, tokens, cfg)
    forms = BlockForms(model)  # the original weights, before distillation changes them in place
    ddir = distill_dir(replace(cfg, study=replace(cfg.study, strategy="b2b")), model)
    with shared(ddir, "distilled blocks"):
        distill_blocks_(model, SPDPlan(tp=tp, num_layers=n, tiers={i: "SB" for i in range(n)}), tokens, ddir,
                        cfg.distill, head_grouping=False, activations=lambda: shared_activations(model, tokens, cfg))
    forms.load_distilled(ddir)
    budget = cfg.planner.budget
    ours = plan_within_budget(forms, tokens, tp, budget, cfg.calib.batch_size)
    full = plan_from_ranking(ranking, cfg.spd, cfg.model.name, fraction=1.0)
    paper = threshold_rule_within_budget(forms, tokens, full, ranking["order"], budget, cfg.calib.batch_size,
                                         base=ours["baseline_ppl"])
    records = load_records(cfg.report.bench)
    savings = {}
    for t in cfg.report.targets:
        if curve := latency_curve(records, t):
            savings[target_name(t)] = {"planner": latency_saving(curve, ours["spd_blocks"] / n),
                                       "threshold_rule": latency_saving(curve, paper["spd_blocks"] / n)}
    out = {"schema": SCHEMA, "model": cfg.model.name, "tp": tp, "num_layers": n, "budget_rel": budget,
           "planner": ours, "threshold_rule": paper, "latency_saving": savings}
    write_json_atomic(run_dir / "planner.json", out)
    choice_plan(ours["choice"], tp, n, cfg.model.name, {"planner": "budget", "budget_rel": budget},
                forms.refs).save(run_dir / "plan.json")
    choice_plan(paper["choice"], tp, n, cfg.model.name, {"planner": "threshold_rule", "budget_rel": budget},
                forms.refs).save(run_dir / "plan_threshold.json")
    print(f"budget {budget:.1%}: planner {ours['spd_blocks']}/{n} SPD blocks (ppl {ours['ppl']:.3f}), "
          f"threshold rule {paper['spd_blocks']}/{n} (ppl {paper['ppl']:.3f}); baseline {ours['baseline_ppl']:.3f}")
    return out
