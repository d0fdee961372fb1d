"""What an SPD accuracy study costs for a big model on this machine: docs/benchmarks/scale.jsonl (spd.scale/1).

    python scripts/scale_bench.py --models llama2_7b llama2_13b --tp 4
    python scripts/scale_bench.py --models llama2_70b --tp 4 8 --max-memory 0=100GiB cpu=100GiB

Random weights of each shape (bf16, placed by spd.placement: model.device_map=auto within --max-memory),
the paper's calibration (128 windows x 2048 tokens of SimpleBooks-92 in the borrowed stories260K tokenizer).
Each stage runs the code the study runs, on part of the work where the whole would not fit a GPU session,
and the record says what was measured and how the whole is estimated from it:

  capture    the dense model's hidden states at the blocks measured below (= one full forward, no LM head)
  rank_step  spd.sensitivity.suffix_perplexity after switching blocks i..L-1 (backward sweep), for k = 1, 2, 4
             blocks; seconds = a + b k fitted, whole ranking = capture + baseline + L a + b L(L+1)/2
  head_grouping  spd.heads.group_heads_ on one block (all windows)
  distill    spd.distill.distill_blocks_ of one block for --epochs epochs (whole: x 10 epochs / epochs)
With --windows below --estimate-windows (128), ranking and distillation estimates scale linearly to 128.
  perplexity spd.perplexity.document_perplexity on --ppl-docs WikiText-2 documents (whole: x tokens ratio)
  lm_eval    spd.evaluate.evaluate on the offline suite at two limits (whole: fixed + per-document cost, fitted)
  export     spd.export.export_ (skipped, with the reason, when the disk cannot hold the checkpoint)

Every record carries seconds, peak GPU memory (torch's allocator peak in the stage), the process's peak
resident memory so far, disk written, the FLOPs of the measured work, the floor (FLOPs over the bf16
matmul rate measured in this run) and the fraction reached, plus command, commit, device and versions.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spd.activations import capture_hidden_states  # noqa: E402
from spd.block import decoder_layers, offloaded_modules, remove_spd_, set_spd_  # noqa: E402
from spd.calibration import calibration_tokens, read_texts  # noqa: E402
from spd.config import CalibConfig, DistillConfig, EvalConfig  # noqa: E402
from spd.cost import block_flops_per_token, block_weights  # noqa: E402
from spd.load import load_model, model_config_by_name  # noqa: E402
from spd.perplexity import calibration_inputs, document_perplexity, prefix_token  # noqa: E402
from spd.placement import placement_table, writable  # noqa: E402
from spd.plan import SPDPlan  # noqa: E402
from spd.run import meta  # noqa: E402
from spd.sensitivity import suffix_perplexity  # noqa: E402

SCHEMA = "spd.scale/1"
OFFLINE_DOCS = 10042 + 1172 + 2376 + 5153 + 1838  # documents of the offline suite (hellaswag, arc x2, lambada, piqa)


class Kept:
    """An activation store that distillation may not release or clean up (shared by the stages)."""

    def __init__(self, store):
        self.store = store

    def get(self, i):
        return self.store.get(i)

    def block_kwargs(self, *a, **k):
        return self.store.block_kwargs(*a, **k)

    def release(self, i):
        pass

    def cleanup(self):
        pass


def gib(n: float) -> float:
    return round(n / 2**30, 3)


def offloaded_blocks(model, L: int) -> set[int]:
    """Blocks whose weights live on the CPU or disk (loaded onto the GPU for each forward)."""
    return {j for j, block in enumerate(decoder_layers(model)[:L]) if offloaded_modules(block)}


class Recorder:
    def __init__(self, out: Path, common: dict, rate_tflops: float):
        self.out, self.common, self.rate = out, common, rate_tflops

    def stage(self, name: str, fn, flops: float = 0.0, disk: Path | None = None, **fields):
        torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        seconds = time.perf_counter() - t0
        flops = flops(result) if callable(flops) else flops
        floor = flops / (self.rate * 1e12) if flops else None
        rec = {"schema": SCHEMA, **self.common, "stage": name, "seconds": round(seconds, 3),
               "peak_gpu_gib": gib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0.0,
               "peak_cpu_gib": gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
               "disk_gib": gib(sum(p.stat().st_size for p in disk.rglob("*") if p.is_file())) if disk else 0.0,
               "flops": flops, "floor_s": floor and round(floor, 3),
               "floor_frac": floor and round(floor / seconds, 4), **fields}
        if callable(rec.get("estimate_s")):
            rec["estimate_s"] = rec["estimate_s"](seconds, result)
        with self.out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps({k: rec[k] for k in ("model", "tp", "stage", "seconds", "peak_gpu_gib", "floor_frac")
                          if k in rec} | {"estimate_s": rec.get("estimate_s")}), flush=True)
        return result, seconds


def bench_model(name: str, tps: list[int], args, rates: dict, command: str) -> None:
    from spd.distill import distill_blocks_
    from spd.evaluate import evaluate
    from spd.export import export_
    from spd.heads import group_heads_

    cfg = replace(model_config_by_name(name), dtype="bfloat16", device_map=args.device_map,
                  max_memory=dict(kv.split("=", 1) for kv in args.max_memory) or None)
    calib = CalibConfig(num_samples=args.windows, seq_len=args.seq_len, batch_size=args.batch_size)
    common = {"model": name, "calibration": {"windows": calib.num_samples, "seq_len": calib.seq_len,
                                             "data": calib.data}, "command": command, "rates": rates,
              **meta(stage="scale")}
    rec = Recorder(Path(args.out), common | {"tp": None}, rates["matmul_tflops"])
    (model, tok), _ = rec.stage("load", lambda: load_model(cfg))
    print(placement_table(model), flush=True)
    common["placement"] = placement_table(model)
    config, L = model.config, len(decoder_layers(model))
    tokens = calibration_tokens(tok, calib)
    inputs = calibration_inputs(tokens, prefix_token(config=config))
    n_tok = tokens.numel()
    blk = block_flops_per_token(config, calib.seq_len) * n_tok  # one block over the calibration set
    head = 2 * config.hidden_size * config.vocab_size * n_tok
    ks = [1, 2, 4]
    j = L - 4  # the block head grouping and distillation run on
    rec.common = common | {"tp": None}
    store, cap_s = rec.stage("capture", lambda: Kept(capture_hidden_states(model, inputs, [j, L - 2, L - 1],
                                                                           calib.batch_size, progress=False)),
                             flops=L * blk, layers=L, measured="full forward to block L-1 (no LM head)")
    for tp in tps:
        rec.common = common | {"tp": tp}
        step_s = {}
        for k in ks:
            i = L - k
            set_spd_(model, tp, {b: "ISB" for b in range(i, L)})
            _, step_s[k] = rec.stage("rank_step", lambda: suffix_perplexity(model, store, i, tokens, calib.batch_size),
                                     flops=k * blk + head, blocks=k)
            remove_spd_(model)
        xs, ys = torch.tensor(ks, dtype=torch.float64), torch.tensor([step_s[k] for k in ks], dtype=torch.float64)
        b = float(((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum())
        a = float(ys.mean() - b * xs.mean())
        # per-block seconds by placement: the steps measure the last blocks (b), the capture all L of them
        off = offloaded_blocks(model, L)
        last_off = (L - 1) in off
        n_same = len(off) if last_off else L - len(off)
        b_other = (cap_s - n_same * b) / max(1, L - n_same) if 0 < len(off) < L else b
        per = [b if ((j in off) == last_off) else b_other for j in range(L)]
        f = args.estimate_windows / args.windows  # work grows with the windows: estimates are for the paper's 128
        steps = sum(a + sum(per[i:]) for i in range(L))  # backward sweep: step i runs blocks i..L-1 and the head
        whole = f * (2 * cap_s + a + steps)  # capture + baseline forward + L steps
        full_fwd = f * (L + 1) * (cap_s + a)  # the reference path: a full forward per step and for the baseline
        with (Path(args.out)).open("a") as f:
            f.write(json.dumps({"schema": SCHEMA, **rec.common, "stage": "ranking", "seconds": None,
                                "estimate_s": round(whole, 1), "estimate_full_forwards_s": round(full_fwd, 1),
                                "fit": {"head_s": a, "block_s_last": b, "block_s_other": b_other,
                                        "offloaded_blocks": len(off)}, "flops": (L + L * (L + 1) / 2) * blk + (L + 1) * head,
                                "floor_s": round(((L + L * (L + 1) / 2) * blk + (L + 1) * head) / (rates["matmul_tflops"] * 1e12), 1),
                                "estimate_windows": args.estimate_windows,
                                "measured": "estimate from capture and rank_step records of this run"}) + "\n")
        print(f"{name} R={tp}: ranking estimate {whole:.0f} s (full forwards {full_fwd:.0f} s)", flush=True)

        layer = decoder_layers(model)[j]
        X = store.get(j)
        with writable(layer):
            saved = {k: v.detach().to("cpu", copy=True) for k, v in layer.state_dict().items()}
        p0 = model.get_input_embeddings().weight

        def hg():
            with writable(layer):
                dev = next(layer.parameters()).device
                group_heads_(layer, X, store.block_kwargs(dev, p0.dtype)["position_embeddings"], tp, calib.batch_size)
                layer.load_state_dict(saved)  # the measurement leaves the model as it was

        rec.stage("head_grouping", hg, flops=blk, block=j)
        dcfg = DistillConfig(epochs=args.epochs, batch_size=calib.batch_size)
        with tempfile.TemporaryDirectory(dir=args.work) as d:
            plan = SPDPlan(tp=tp, num_layers=L, tiers={j: "SB"})
            rec.stage("distill", lambda: distill_blocks_(model, plan, tokens, d, dcfg, head_grouping=False,
                                                         progress=False, activations=lambda: store),
                      flops=3 * args.epochs * blk + 2 * blk, block=j, epochs=args.epochs,
                      estimate_s=lambda s, _: round(s * 10 / args.epochs * args.estimate_windows / args.windows, 1),
                      estimate_windows=args.estimate_windows, disk=Path(d))
        remove_spd_(model)  # block j back to its weights before the measurements
        with writable(layer):
            layer.load_state_dict(saved)
        model.config.spd_weights = model.config.spd_plan = None

    rec.common = common | {"tp": None}
    docs = read_texts("wikitext2_test.jsonl", "page")
    all_tokens = sum(len(tok(t, add_special_tokens=False).input_ids) for t in docs)
    part = docs[: args.ppl_docs]
    ppl, _ = rec.stage("perplexity", lambda: document_perplexity(model, tok, part, 2048, calib.batch_size,
                                                                 "wikitext", progress=False),
                       flops=lambda r: (r["cost"]["tflop_per_s"] or 0) * r["cost"]["seconds"] * 1e12,
                       estimate_s=lambda s, r: round(s * all_tokens / r["tokens"], 1))
    eval_s = {}
    for limit in args.eval_limit:  # two limits: seconds = fixed + per-document, fitted
        with tempfile.TemporaryDirectory(dir=args.work) as d:
            ecfg = EvalConfig(limit=limit, batch_size=8)
            _, eval_s[limit] = rec.stage("lm_eval", lambda: evaluate(model, tok, ecfg, Path(d)), limit=limit)
    (l0, s0), (l1, s1) = sorted(eval_s.items())[0], sorted(eval_s.items())[-1]
    per_doc = (s1 - s0) / (5 * (l1 - l0)) if l1 > l0 else s1 / (5 * l1)
    with Path(args.out).open("a") as f:
        f.write(json.dumps({"schema": SCHEMA, **rec.common, "stage": "lm_eval_full", "seconds": None,
                            "estimate_s": round(s0 + per_doc * (OFFLINE_DOCS - 5 * l0), 1),
                            "measured": f"estimate from the lm_eval records at limits {sorted(eval_s)}: fixed cost + "
                                        f"{per_doc:.4f} s per document x {OFFLINE_DOCS} documents"}) + "\n")
    need = block_weights(config) * L * 2 + 2 * 2 * config.hidden_size * config.vocab_size
    free = shutil.disk_usage(args.work).free
    if need > 0.9 * free:
        with Path(args.out).open("a") as f:
            f.write(json.dumps({"schema": SCHEMA, **rec.common, "stage": "export", "seconds": None,
                                "skipped": f"the bf16 checkpoint needs {gib(need)} GiB, the disk has {gib(free)} GiB "
                                           "free: export to a larger disk (the stage streams offloaded weights)"}) + "\n")
    else:
        with tempfile.TemporaryDirectory(dir=args.work) as d:
            dense = SPDPlan(tp=tps[0], num_layers=L)
            rec.stage("export", lambda: export_(model, tok, dense, Path(d) / "model"), disk=Path(d))
    del model, store
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def table(path: Path) -> str:
    """Markdown tables of a scale.jsonl: per model and R the measured stages and the estimated whole stages,
    then what a sweep costs (module doc of docs/benchmarks/scale.md)."""
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by = {}
    for r in recs:
        by.setdefault((r["model"], r["tp"], r["stage"]), []).append(r)
    models = list(dict.fromkeys(r["model"] for r in recs))
    fmt = lambda x: "-" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.1f}")  # noqa: E731
    out = ["| model | R | ranking (cached inputs) s | ranking (full forwards) s | HG 1 block s | B2B 1 block, 10 ep. s "
           "| perplexity s | lm-eval full suite s | export s | peak GPU GiB | peak CPU GiB | disk GiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    sweep = ["| model | R | blocks | one job, 100% SPD b2b_hg, 1 GPU h | sweep 5 fractions x 3 strategies, 1 GPU h "
             "| same sweep, 8 GPUs h |", "|---|---|---|---|---|---|"]
    for m in models:
        one = lambda stage, tp=None: (by.get((m, tp, stage)) or [{}])[-1]  # noqa: E731
        tps = sorted({r["tp"] for r in recs if r["model"] == m and r["tp"] is not None})
        L = one("capture").get("layers") or model_config_by_name(m).num_layers
        for tp in tps:
            rk, hg, d = one("ranking", tp), one("head_grouping", tp), one("distill", tp)
            ppl, ev, ex = one("perplexity"), one("lm_eval_full"), one("export")
            peak_gpu = max(r.get("peak_gpu_gib") or 0 for r in recs if r["model"] == m)
            peak_cpu = max(r.get("peak_cpu_gib") or 0 for r in recs if r["model"] == m)
            out.append(f"| {m} | {tp} | {fmt(rk.get('estimate_s'))} | {fmt(rk.get('estimate_full_forwards_s'))} | "
                       f"{fmt(hg.get('seconds'))} | {fmt(d.get('estimate_s'))} | {fmt(ppl.get('estimate_s'))} | "
                       f"{fmt(ev.get('estimate_s'))} | {fmt(ex.get('seconds')) if ex.get('seconds') else 'does not fit'} | "
                       f"{peak_gpu:.0f} | {peak_cpu:.0f} | {fmt(ex.get('disk_gib'))} |")
            if None in (rk.get("estimate_s"), d.get("estimate_s"), ppl.get("estimate_s"), ev.get("estimate_s")):
                continue
            n = L
            evals = ppl["estimate_s"] + ev["estimate_s"]
            job = rk["estimate_s"] + n * d["estimate_s"] + evals
            full = rk["estimate_s"] + 2 * n * d["estimate_s"] + 15 * evals  # b2b and b2b_hg blocks, 15 evaluations
            eight = rk["estimate_s"] + (2 * n * d["estimate_s"] + 15 * evals) / 8
            sweep.append(f"| {m} | {tp} | {n} | {job / 3600:.1f} | {full / 3600:.1f} | {eight / 3600:.1f} |")
    return "\n".join(out + [""] + sweep)


def main(argv=None) -> None:
    from overlap.floors import measure_rates

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["llama2_7b"])
    p.add_argument("--tp", nargs="+", type=int, default=[4])
    p.add_argument("--windows", type=int, default=128)
    p.add_argument("--estimate-windows", type=int, default=128, help="estimates are for this many windows")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--ppl-docs", type=int, default=2)
    p.add_argument("--eval-limit", nargs=2, type=int, default=[8, 32])
    p.add_argument("--device-map", default="auto")
    p.add_argument("--max-memory", nargs="*", default=[])
    p.add_argument("--work", default=tempfile.gettempdir())
    p.add_argument("--out", default="docs/benchmarks/scale.jsonl")
    p.add_argument("--table", type=Path, help="print the Markdown tables of a scale.jsonl and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.table))
        return
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rates = measure_rates(dev)
    print(f"measured: bf16 matmul {rates['matmul_tflops']:.0f} TFLOP/s, copy {rates['copy_tbps']:.2f} TB/s", flush=True)
    command = "python scripts/scale_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for name in args.models:
        bench_model(name, args.tp, args, rates, command)


if __name__ == "__main__":
    main()
