"""spd-report: tables and plots made only from run artifacts.

Inputs: study jobs (study.json), rankings (sensitivity.json) and spd-bench records (JSON lines).
Latency saving of a plan with k of L blocks in SPD, for a named target (model shape, R, interconnect,
phase and size): the bench measures base (no SPD) and spd25..spd100; t(k/L) is interpolated linearly
between the measured fractions and saving = 1 - t(k/L) / t(0). Accuracy is the mean of each task's acc
over the tasks a job ran (lm-eval's acc; perplexity tasks excluded).
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np

from spd.run import read_json, write_bytes_atomic

SPD_VARIANTS = {"base": 0.0, "spd25": 0.25, "spd50": 0.5, "spd75": 0.75, "spd100": 1.0}


def load_records(patterns: list[str]) -> list[dict]:
    rows = []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            with open(path) as f:
                rows += [json.loads(line) for line in f if line.strip().startswith("{")]
    return [r for r in rows if r.get("schema") == "spd.bench/1"]


def _match(r: dict, target: dict) -> bool:
    return all(r.get(k) == v for k, v in target.items())


def setup_of(r: dict) -> tuple:
    """What a bench record was measured with: code version, device, collective impl, fused kernels, compile,
    the Triton decode attention and norm-GEMV kernels, and whether one rank's shard ran alone (virtual_tp)."""
    return (r.get("commit"), r.get("device"), r.get("impl", "nccl"), bool(r.get("fused")), bool(r.get("compile")),
            bool(r.get("decode_kernel")), bool(r.get("norm_gemv")), bool(r.get("virtual_tp")))


def newest_by_setup(records: list[dict], keep) -> dict[tuple, dict[str, dict]]:
    """{setup: {variant: newest record}} of the records keep() accepts, setups ordered oldest to newest
    (by their last record in file order)."""
    out: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if keep(r):
            setup = setup_of(r)
            out.setdefault(setup, {})[r["variant"]] = r
            out[setup] = out.pop(setup)  # move to the end: the most recently measured setup is last
    return out


def latency_curve(records: list[dict], target: dict) -> dict[float, float] | None:
    """{SPD fraction: median ms} for a target from one setup (setup_of), or None when no setup measured base.

    The newest setup that measured base wins, newest record per variant: mixing setups would interpolate
    between, say, an eager spd50 and a fused base of another commit.
    """
    setups = newest_by_setup(records, lambda r: _match(r, target) and r.get("variant") in SPD_VARIANTS)
    for recs in reversed(setups.values()):
        if "base" in recs:
            return {SPD_VARIANTS[v]: r["median_ms"] for v, r in recs.items()}
    return None


def latency_saving(curve: dict[float, float], fraction: float) -> float:
    xs = sorted(curve)
    return 1.0 - float(np.interp(fraction, xs, [curve[x] for x in xs])) / curve[0.0]


def target_name(t: dict) -> str:
    size = f"S={t['tokens']}" if "tokens" in t else f"B={t.get('batch')}"
    return f"{t['model']} R={t['tp']} {t['interconnect']} {t['phase']} {size}"


GROUPS = ("spd_offline",)  # lm-eval groups: their acc is already the mean over their tasks


def mean_accuracy(ev: dict) -> tuple[float | None, dict[str, float]]:
    """(mean acc, per-task acc): a group's own acc where the job ran one, else the mean over tasks."""
    tasks = ev.get("tasks", {})
    accs = {t: m["acc"]["value"] for t, m in tasks.items() if "acc" in m and t not in GROUPS}
    group = next((tasks[g]["acc"]["value"] for g in GROUPS if "acc" in tasks.get(g, {})), None)
    if group is not None:
        return group, accs
    return (float(np.mean(list(accs.values()))) if accs else None), accs


def with_trained(study: dict, path: Path) -> dict:
    """The job summary plus `distill_trained`: how many blocks the job distilled itself (its distill.json
    beside study.json), 0 when every block came from the sweep's shared folder."""
    distill = read_json(path.parent / "distill.json") or {}
    return {**study, "distill_trained": len(distill.get("trained", []))}


def docs_per_task(ev: dict) -> str:
    """How many documents per task the job was evaluated on: `all`, the limit, or `-` (not evaluated)."""
    if not ev.get("tasks"):
        return "-"
    limit = ev.get("limit")
    return "all" if limit is None else f"{limit:g}"


def study_table(studies: list[dict], curves: dict[str, dict]) -> tuple[str, list[dict]]:
    rows = []
    key = lambda s: (s["model"], s["tp"], (s.get("ranking") or {}).get("method", ""), s["fraction"], s["strategy"])  # noqa: E731
    for s in sorted(studies, key=key):
        avg, accs = mean_accuracy(s.get("eval", {}))
        savings = {name: latency_saving(c, s["fraction"]) for name, c in curves.items()}
        rows.append({"model": s["model"], "tp": s["tp"], "fraction": s["fraction"], "strategy": s["strategy"],
                     "ranking": (s.get("ranking") or {}).get("method", "-"),
                     "token_ppl": (s.get("perplexity") or {}).get("token_perplexity"),
                     "spd_blocks": s["spd_blocks"], "avg_acc": avg, "acc": accs,
                     "word_ppl": (s.get("perplexity") or {}).get("word_perplexity"), "saving": savings,
                     "docs": docs_per_task(s.get("eval", {})), "trained": s.get("distill_trained"),
                     "stages": s.get("stages", {}),
                     "distill_minutes": s.get("distill_minutes", 0.0), "kd_minutes": s.get("kd_minutes", 0.0)})
    tasks = sorted({t for r in rows for t in r["acc"]})
    names = list(curves)
    head = ["model", "R", "ranking", "SPD", "strategy", "docs/task", "avg acc", *tasks, "token ppl", "word ppl",
            *[f"saving {n}" for n in names], "distill min", "kd min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v, f="{:.4f}": "-" if v is None else f.format(v)  # noqa: E731
    # distillation minutes of the job; "shared" when it trained no block itself (all from the sweep's folder)
    def distill(r):  # "-": no block to distill (zs, or every SPD block insensitive)
        if r["stages"].get("distill") in ("none", None) and not r["distill_minutes"]:
            return "-"
        return "shared" if r["trained"] == 0 else fmt(r["distill_minutes"], "{:.2f}")
    for r in rows:
        cells = [r["model"], str(r["tp"]), r["ranking"], f"{r['spd_blocks']} ({r['fraction']:.0%})", r["strategy"],
                 r["docs"], fmt(r["avg_acc"]), *[fmt(r["acc"].get(t)) for t in tasks], fmt(r["token_ppl"], "{:.2f}"),
                 fmt(r["word_ppl"], "{:.2f}"),
                 *[fmt(r["saving"][n], "{:.1%}") for n in names], distill(r),
                 fmt(r["kd_minutes"], "{:.2f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), rows


def form_counts(choice: dict[str, str]) -> str:
    """How many blocks a plan takes in each repaired form (zs, b2b, b2b_hg), e.g. `zs 3, b2b_hg 2`."""
    forms = list(choice.values())
    return ", ".join(f"{f} {forms.count(f)}" for f in sorted(set(forms))) or "-"


def planner_table(planners: list[dict], curves: dict[str, dict]) -> str:
    """The latency-aware planner against the threshold rule at equal budget; both measure the repaired
    blocks' calibration perplexity (forms: zs, b2b, b2b_hg)."""
    lines = ["| model | R | budget (ppl +%) | baseline ppl | planner: SPD blocks | planner ppl | planner forms | "
             "threshold rule: SPD blocks | threshold rule ppl | threshold rule forms | saving, planner vs rule |",
             "|" + "---|" * 11]
    for p in sorted(planners, key=lambda p: (p["model"], p["tp"], p["budget_rel"])):
        ours, rule = p["planner"], p["threshold_rule"]
        n = p["num_layers"]
        sav = "; ".join(f"{name}: {latency_saving(c, ours['spd_blocks'] / n):.1%} vs "
                        f"{latency_saving(c, rule['spd_blocks'] / n):.1%}" for name, c in curves.items())
        lines.append(f"| {p['model']} | {p['tp']} | {p['budget_rel']:.0%} | {ours['baseline_ppl']:.3f} | "
                     f"{ours['spd_blocks']}/{p['num_layers']} | {ours['ppl']:.3f} | {form_counts(ours['choice'])} | "
                     f"{rule['spd_blocks']}/{p['num_layers']} | {rule['ppl']:.3f} | {form_counts(rule['choice'])} | "
                     f"{sav or '-'} |")
    return "\n".join(lines)


def baseline_table(summaries: dict[str, dict]) -> str:
    """lm-eval summaries (spd.eval/1) and perplexity.json files of dense runs, one metric a row."""
    lines = ["| run | task | metric | value | stderr |", "|---|---|---|---|---|"]
    for name, s in summaries.items():
        name = "/".join(Path(name).parts[-4:-1])
        if "token_perplexity" in s:
            for metric in ("token_perplexity", "word_perplexity", "bits_per_byte"):
                lines.append(f"| {name} | {Path(s.get('data', '?')).stem} (spd-ppl) | {metric} | {s[metric]:.4f} | - |")
            continue
        for task, metrics in s.get("tasks", {}).items():
            for metric, v in metrics.items():
                err = "-" if v.get("stderr") is None else f"{v['stderr']:.4f}"
                lines.append(f"| {name} | {task} | {metric} | {v['value']:.4f} | {err} |")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_plot(rows: list[dict], curve_name: str, path: Path) -> Path:
    """Accuracy against latency saving for one target; the Pareto front is drawn as a line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [(r["saving"][curve_name], r["avg_acc"], r["strategy"]) for r in rows if r["avg_acc"] is not None]
    for strategy, marker in (("zs", "o"), ("b2b", "s"), ("b2b_hg", "^"), ("b2b_kd", "D"), ("b2b_hg_kd", "v")):
        xs = [p[0] for p in pts if p[2] == strategy]
        ax.scatter([100 * x for x in xs], [p[1] for p in pts if p[2] == strategy], marker=marker, label=strategy)
    front, best = [], -1.0
    for x, y, _ in sorted(pts, key=lambda p: (-p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    if front:
        ax.plot([100 * x for x, _ in front], [y for _, y in front], "k--", lw=1, label="Pareto front")
    ax.set_xlabel(f"latency saving, % ({curve_name})")
    ax.set_ylabel("mean accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def breakdown_plot(records: list[dict], path: Path) -> Path | None:
    """Compute (nocomm) and communication (base - nocomm; spd100 - nocomm) per measured setting."""
    groups = {}  # per measured setting: the newest setup (setup_of) that timed all three variants
    for r in records:
        if r.get("variant") in ("base", "spd100", "nocomm"):
            size = r.get("tokens") if r["phase"] == "prefill" else r.get("batch")
            key = (r["model"], r["tp"], r["interconnect"], r["phase"], size)
            groups.setdefault(key, []).append(r)
    complete = {}
    for key, recs in groups.items():
        for setup in reversed(newest_by_setup(recs, lambda r: True).values()):
            if len(setup) == 3:
                complete[key] = {v: r["median_ms"] for v, r in setup.items()}
                break
    groups = dict(sorted(complete.items(), key=lambda kv: str(kv[0])))
    if not groups:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups)), 4))
    labels = [f"{m}\nR={tp} {ic}\n{ph} {sz}" for (m, tp, ic, ph, sz) in groups]
    x = np.arange(len(groups))
    comp = np.array([v["nocomm"] for v in groups.values()])
    base = np.array([v["base"] for v in groups.values()])
    spd = np.array([v["spd100"] for v in groups.values()])
    ax.bar(x - 0.2, comp / base, 0.4, label="compute (nocomm)", color="tab:gray")
    ax.bar(x - 0.2, (base - comp) / base, 0.4, bottom=comp / base, label="communication, base", color="tab:red")
    ax.bar(x + 0.2, comp / base, 0.4, color="tab:gray")
    ax.bar(x + 0.2, (spd - comp) / base, 0.4, bottom=comp / base, label="communication, SPD 100%", color="tab:orange")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("time / base time (left: base, right: SPD 100%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_report(cfg) -> Path:
    """Write report.md, report.json and plots into cfg.report.out_dir from artifacts only."""
    from spd.sensitivity import plot_sensitivity

    rc = cfg.report
    out = Path(rc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    studies = [with_trained(s, Path(f)) for p in rc.studies for f in sorted(glob.glob(p)) if (s := read_json(f))]
    records = load_records(rc.bench)
    curves = {target_name(t): c for t in rc.targets if (c := latency_curve(records, t))}
    table, rows = study_table(studies, curves)
    md = ["# SPD study report", "", "Generated by `spd-report` from run artifacts only.", ""]
    baselines = {f: s for p in rc.baselines for f in sorted(glob.glob(p)) if (s := read_json(f))}
    if baselines:
        md += ["## Dense baselines", "", baseline_table(baselines), ""]
    md += ["## Accuracy, perplexity and latency saving", "", table, ""]
    planners = [p for pat in rc.planners for f in sorted(glob.glob(pat)) if (p := read_json(f))]
    if planners:
        md += ["## Latency-aware planner against the threshold rule (equal budget)", "", planner_table(planners, curves), ""]
    for name in curves:
        p = pareto_plot(rows, name, out / f"pareto_{name.replace(' ', '_').replace('=', '')}.png")
        md += [f"![Pareto {name}]({p.name})", ""]
    for f in sorted({f for p in rc.rankings for f in glob.glob(p)}):
        if r := read_json(f):
            name = f"sensitivity_{r.get('model', 'model')}_tp{r['tp']}_{r['method']}.png"
            plot_sensitivity(r, out / name)
            md += [f"![sensitivity]({name})", ""]
    if p := breakdown_plot(records, out / "breakdown.png"):
        md += ["## Compute and communication", "", f"![breakdown]({p.name})", ""]
    if not curves:
        md += ["No bench records match the latency targets: latency savings are not shown.", ""]
    write_bytes_atomic(out / "report.md", "\n".join(md).encode())
    write_bytes_atomic(out / "report.json", json.dumps({"rows": rows, "targets": list(curves)}, indent=1).encode())
    print(f"report: {out / 'report.md'} ({len(rows)} study jobs, {len(records)} bench records)")
    return out / "report.md"
