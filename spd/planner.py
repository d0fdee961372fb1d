"""Latency-aware planning: the most SPD blocks, each with its best repair, within a perplexity budget.

Beyond the paper's hand-set thresholds. Every SPD block removes one all-reduce of the same size, so the
latency saving grows with the number of SPD blocks k (spd-bench measures the curve); maximising the
saving under a budget is maximising k. Each block i has three candidate forms, each a repaired block
whose perplexity is measured: zero-shot SPD (zs), SPD with block-to-block distilled weights (b2b) and
head grouping + B2B (b2b_hg: the best of the HG candidates after B2B, spd.distill), both trained once per
block on the original model's hidden states (distill.inputs=dense whatever the config says: a block's
weights must not depend on the other blocks) and shared with the study's b2b / b2b_hg jobs. With c_i(s)
the isolated calibration perplexity increase of block i in form s, the planner sorts blocks by
min_s c_i(s), adds them greedily in their best form, measures the calibration perplexity of the whole
plan after each addition and keeps the block only when the measured increase stays within
budget * baseline (interactions are measured, not assumed additive). The paper's rule at equal budget,
for comparison: blocks in the backward ranking's order, zs for ISB, b2b for SB and b2b_hg for ESB
(thresholds as in spd.sensitivity), the largest prefix whose measured increase is within budget.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from spd.block import decoder_layers, remove_spd_, set_spd_
from spd.perplexity import windows_perplexity
from spd.plan import SPDPlan
from spd.run import read_json
from spd.surgery import mark_carried_

SCHEMA = "spd.planner/1"


FORMS = ("zs", "b2b", "b2b_hg")
TIER_OF = {"zs": "ISB", "b2b": "SB", "b2b_hg": "ESB"}


class BlockForms:
    """Original and repaired weights of every block, swapped in on demand (CPU copies)."""

    def __init__(self, model):
        from spd.errors import SPDError
        from spd.placement import is_offloaded

        if is_offloaded(model):
            raise SPDError("spd-plan keeps every block's original and distilled weights in memory and cannot run on "
                           "a model offloaded to the CPU or disk; give it GPUs enough for the model "
                           "(model.device_map=auto with model.max_memory) or a smaller model")
        self.model, self.layers = model, decoder_layers(model)
        self.orig = {i: {k: v.detach().clone() for k, v in l.state_dict().items()} for i, l in enumerate(self.layers)}
        self.repaired: dict[str, dict[int, dict]] = {f: {} for f in FORMS[1:]}  # form -> block -> state dict
        self.refs: dict[str, dict[int, dict]] = {f: {} for f in FORMS[1:]}  # form -> block -> plan.weights entry
        self.perms: dict[int, list[int]] = {}  # block -> head_perm of its b2b_hg form

    @property
    def b2b(self) -> dict[int, dict]:
        return self.repaired["b2b"]

    def load_distilled(self, distilled_dir: Path, form: str = "b2b") -> None:
        """Repaired block weights of one form from a distill directory's manifest."""
        manifest = read_json(distilled_dir / "manifest.json")
        for key, entry in ((manifest or {}).get("blocks") or {}).items():
            if (distilled_dir / entry["file"]).is_file() and "sha256" in entry:
                if bool(entry.get("hg")) != (form == "b2b_hg"):  # the other form of the block (spd.distill.entry_key)
                    continue
                i = int(key.split("_")[0])
                self.repaired[form][i] = load_file(str(distilled_dir / entry["file"]))
                self.refs[form][i] = {"file": str(distilled_dir / entry["file"]), "sha256": entry["sha256"]}
                if form == "b2b_hg" and entry.get("head_perm") is not None:
                    self.perms[i] = entry["head_perm"]

    def forms(self, i: int) -> list[str]:
        return ["zs"] + [f for f in FORMS[1:] if i in self.repaired[f]]

    def configure_(self, tp: int, choice: dict[int, str]) -> None:
        """Blocks in choice become SPD in the given form; the others are original."""
        remove_spd_(self.model)
        for i, layer in enumerate(self.layers):
            f = choice.get(i, "zs")
            layer.load_state_dict(self.orig[i] if f == "zs" else self.repaired[f][i])
        set_spd_(self.model, tp, {i: TIER_OF[f] for i, f in choice.items()})


def isolated_costs(forms: BlockForms, tokens: torch.Tensor, tp: int, batch_size: int = 4, done: dict | None = None,
                   after_block=None) -> dict:
    """The dense calibration perplexity and each block's increase alone in each of its forms:
    {"baseline_ppl": p, "isolated": {"i:form": increase}} (what plan_within_budget sorts by).

    done: a partial result of an interrupted call (its measurements are kept, the rest measured);
    after_block(partial): called after each block, to keep what is measured so far."""
    done = done or {}
    forms.configure_(tp, {})
    base = done["baseline_ppl"] if "baseline_ppl" in done else windows_perplexity(forms.model, tokens, batch_size)
    iso = dict(done.get("isolated") or {})
    for i in tqdm(range(len(forms.layers)), desc="planner: isolated costs"):
        todo = [f for f in forms.forms(i) if f"{i}:{f}" not in iso]
        for f in todo:
            forms.configure_(tp, {i: f})
            iso[f"{i}:{f}"] = windows_perplexity(forms.model, tokens, batch_size) - base
        if todo and after_block:
            after_block({"baseline_ppl": base, "isolated": iso})
    forms.configure_(tp, {})
    return {"baseline_ppl": base, "isolated": iso}


def plan_within_budget(forms: BlockForms, tokens: torch.Tensor, tp: int, budget: float, batch_size: int = 4,
                       costs: dict | None = None) -> dict:
    """Greedy measured planning (module doc). budget: allowed relative calibration-perplexity increase;
    costs: isolated_costs(forms, tokens, tp, batch_size) if already measured (the same for every budget)."""
    costs = costs or isolated_costs(forms, tokens, tp, batch_size)
    base = costs["baseline_ppl"]
    iso = costs["isolated"]  # "i:form" -> increase
    best = {i: min(forms.forms(i), key=lambda f: iso[f"{i}:{f}"]) for i in range(len(forms.layers))}
    order = sorted(best, key=lambda i: iso[f"{i}:{best[i]}"])
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
            "spd_blocks": len(choice), "isolated": iso, "trace": trace}


def threshold_rule_within_budget(forms: BlockForms, tokens: torch.Tensor, plan_full: SPDPlan, order: list[int],
                                 budget: float, batch_size: int = 4, base: float | None = None) -> dict:
    """The paper's rule at equal budget: the largest prefix of the ranking order within budget.

    base: the dense calibration perplexity, if already measured."""
    if base is None:
        forms.configure_(plan_full.tp, {})
        base = windows_perplexity(forms.model, tokens, batch_size)
    wanted = {"ISB": ["zs"], "SB": ["b2b", "zs"], "ESB": ["b2b_hg", "b2b", "zs"]}  # paper's form, else the next
    form = {i: next(f for f in wanted[t] if f in forms.forms(i)) for i, t in plan_full.tiers.items()}
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
                forms: BlockForms | None = None) -> SPDPlan:
    """The plan of a planner choice: b2b blocks are SB, b2b_hg blocks ESB, naming their repaired weights."""
    refs = forms.refs if forms else {}
    perms = forms.perms if forms else {}
    return SPDPlan(tp=tp, num_layers=num_layers, model=model, source=source,
                   tiers={int(i): TIER_OF[f] for i, f in choice.items()},
                   weights={int(i): refs[f][int(i)] for i, f in choice.items() if f != "zs"},
                   head_perm={int(i): perms[int(i)] for i, f in choice.items() if f == "b2b_hg" and int(i) in perms})


def shared_isolated_costs(forms: BlockForms, tokens: torch.Tensor, tp: int, batch_size: int, ddir: Path) -> dict:
    """isolated_costs, kept beside the distilled blocks (ddir, keyed by model, R, calibration and distillation
    settings) under a key of the blocks' sha256, the calibration tokens and the batch size: every budget of a
    sweep reuses them, and an interrupted run resumes after the last block it measured."""
    from spd.artifacts import key_of, shared
    from spd.run import write_json_atomic

    settings = {"tp": tp, "batch_size": batch_size, "algo": 1,
                "tokens": hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest(),
                "blocks": {f: {str(i): r["sha256"] for i, r in sorted(refs.items())} for f, refs in forms.refs.items()}}
    path = ddir / f"isolated-{key_of(settings)}.json"
    with shared(path, "isolated block costs"):
        kept = read_json(path)
        kept = kept if kept and kept.get("settings") == settings else {}
        if kept.get("complete"):
            return kept
        if kept:
            print(f"planner: resuming the isolated costs in {path} ({len(kept['isolated'])} measured)")
        costs = isolated_costs(forms, tokens, tp, batch_size, done=kept,
                               after_block=lambda part: write_json_atomic(path, {"settings": settings, **part,
                                                                                 "complete": False}))
        write_json_atomic(path, {"settings": settings, **costs, "complete": True})
    return costs


def run_planner(cfg) -> dict:
    """spd-plan: distill every block once (shared), then plan within cfg.planner.budget; compare with the
    threshold rule; writes planner.json, plan.json (the planner's) and plan_threshold.json in cfg.run_dir."""
    from dataclasses import replace

    from spd.artifacts import shared
    from spd.calibration import calibration_tokens, resolve_auto_
    from spd.distill import distill_blocks_
    from spd.load import load_model
    from spd.report import latency_curve, latency_saving, load_records, target_name
    from spd.run import start_run, write_json_atomic
    from spd.sensitivity import plan_from_ranking
    from spd.study import distill_dir, shared_activations, shared_ranking

    run_dir = start_run(cfg.run_dir, resolve_auto_(cfg), stage="planner", tp=cfg.parallel.tp)
    model, tokenizer = load_model(cfg.model)
    n, tp = len(decoder_layers(model)), cfg.parallel.tp
    tokens = calibration_tokens(tokenizer, cfg.calib)
    ranking = shared_ranking(model, tokens, cfg)
    forms = BlockForms(model)  # the original weights, before distillation changes them in place
    dense = replace(cfg, distill=replace(cfg.distill, inputs="dense"))  # blocks independent of the plan
    ddir = distill_dir(dense, model)  # the study's shared folder: each block with and without HG
    for form, tier in (("b2b", "SB"), ("b2b_hg", "ESB")):  # every block repaired once in each form (shared)
        with shared(ddir, "distilled blocks"):
            distill_blocks_(model, SPDPlan(tp=tp, num_layers=n, tiers={i: tier for i in range(n)}), tokens, ddir,
                            dense.distill, head_grouping=form == "b2b_hg",
                            activations=lambda: shared_activations(model, tokens, cfg))
        remove_spd_(model)
        for i, layer in enumerate(forms.layers):  # back to the original weights for the next form
            layer.load_state_dict(forms.orig[i])
        mark_carried_(model, SPDPlan(tp=tp, num_layers=n))
        forms.load_distilled(ddir, form)
    budget = cfg.planner.budget
    ours = plan_within_budget(forms, tokens, tp, budget, cfg.calib.batch_size,
                              shared_isolated_costs(forms, tokens, tp, cfg.calib.batch_size, ddir))
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
                forms).save(run_dir / "plan.json")
    choice_plan(paper["choice"], tp, n, cfg.model.name, {"planner": "threshold_rule", "budget_rel": budget},
                forms).save(run_dir / "plan_threshold.json")
    print(f"budget {budget:.1%}: planner {ours['spd_blocks']}/{n} SPD blocks (ppl {ours['ppl']:.3f}), "
          f"threshold rule {paper['spd_blocks']}/{n} (ppl {paper['ppl']:.3f}); baseline {ours['baseline_ppl']:.3f}")
    return out
