"""Where the time goes per kernel kind: one rank's shard (virtual R) on one GPU, decode step and prefill.

    python scripts/kernel_kinds.py --virtual-tp 4 --layers 8 --out DIR [--context 2048] [--tokens 2048 8192]

Builds rank 0's shard of the LLaMA-2-70B shape (cut to --layers blocks; nocomm, fused elementwise kernels,
Triton decode attention: what spd-bench virtual_tp=R times), measures the device's copy bandwidth and matmul
rate (overlap/floors.py), then traces with torch.profiler

    decode   5 CUDA-graph replays of a batch-1 step at position --context (the timed path), and the same 5
             steps eager with record_shapes (for attribution only)
    prefill  one eager prefill of each --tokens length, record_shapes

and labels every kernel: a GEMM by the weight shape of the aten::mm that launched it (wqkv, wo, w13, w2,
lm_head; a split-K reduce kernel counts with its GEMM), the Triton decode attention's split and merge
kernels, flash attention, the compiled elementwise kernels (RMSNorm, add + RMSNorm, RoPE, SwiGLU) and the
rest by name (with --pdl, spd-bench's default on sm_90+, wo and w2 are Triton GEMVs too; with --swiglu-gemv,
the default, SwiGLU of 2 to 16 decode rows runs in w13's GEMV). Graph-replayed
kernels carry no operator, so they take the label of the eager kernel at the same place in the step (the same
kernel sequence; else the one with the same name, grid and block). Per label: launches and microseconds per
step and per block (a kernel's exclusive time: the step's advance while it ran, since with PDL a
kernel starts early and waits inside for the one before), the bytes it must
move (GEMM: weight + activations; decode attention: the K/V cache read) and FLOPs, and the achieved
TB/s and TFLOP/s against the measured ceilings. Writes DIR/kernel_kinds.json, DIR/kernel_kinds.md and the
traces (gzip); prints the markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without installing the project

import torch  # noqa: E402

LLAMA2_70B = dict(name="llama2_70b", vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80,
                  num_heads=64, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0)
STEPS = 5
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def load(path: Path) -> tuple[list[dict], dict[int, dict]]:
    """(kernel events, cpu ops by External id) of a chrome trace."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    kernels, ops = [], {}
    for e in events:
        if e.get("ph") != "X":
            continue
        if e.get("cat") == "kernel":
            kernels.append(e)
        elif e.get("cat") == "cpu_op" and "External id" in e.get("args", {}):
            ops[e["args"]["External id"]] = e
    kernels.sort(key=lambda e: e["ts"])
    return kernels, ops


def gemm_names(shape) -> dict[tuple[int, int], str]:
    """(K, N) of each weight GEMM of the shard -> its name."""
    a, Dh = shape.args, shape.args.head_dim
    return {(a.dim, (shape.q_heads + 2 * shape.kv_heads) * Dh): "wqkv", (shape.q_heads * Dh, a.dim): "wo",
            (a.dim, 2 * shape.ffn): "w13", (shape.ffn, a.dim): "w2", (a.dim, a.vocab_size): "lm_head"}


def _sig(e: dict) -> tuple:
    args = e.get("args", {})
    return (e["name"], tuple(args.get("grid", ())), tuple(args.get("block", ())))


def by_name(name: str) -> str:
    n = name.lower()
    if "split_kernel" in n:
        return "attention: Triton split (RoPE, cache write, attention)"
    if "merge_kernel" in n:
        return "attention: Triton merge"
    if any(k in n for k in ("flash", "fmha", "sdpa", "attention")):
        return "attention: flash (SDPA)"
    if n.startswith("triton_"):
        return "fused elementwise (compiled: norms, RoPE, SwiGLU, adds)"
    if any(k in n for k in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitk")):
        return "gemm: ?"
    if "embedding" in n or "index" in n:
        return "embedding"
    if "copy" in n or "memcpy" in n or "fill" in n:
        return "copies / fills"
    return "other elementwise"


TRITON_GEMVS = ("wqkv", "w13")  # what the runtime's triton_gemv runs through norm_gemv_kernel, in block order
TRITON_GEMVS_PDL = ("wqkv", "wo", "w13", "w2")  # with pdl: every GEMV of a block (gemv_down: wo and w2)


def label_eager(kernels: list[dict], ops: dict[int, dict], names: dict, rows: int = 1,
                gemvs: tuple = TRITON_GEMVS) -> tuple[list[tuple[dict, str, tuple]], dict]:
    """[(kernel, label, (M, K, N) or None)], and {signature: (label, mkn)} for the graph trace. The Triton GEMV
    (overlap.kernels.norm_gemv, no aten op to read shapes from) runs `gemvs` in every block in that order (wqkv
    then w13; with pdl all four): its launches are labelled so, with `rows` decode rows, its split-K reduce
    kernel with it."""
    out, sigs, seen = [], {}, set()
    by_weight = {v: kn for kn, v in names.items()}
    triton_gemvs = 0
    for k in kernels:
        eid = k.get("args", {}).get("External id")
        op = ops.get(eid)
        label, mkn = by_name(k["name"]), None
        if k["name"].startswith(("norm_gemv_kernel", "stream_gemv_kernel")):  # stream_gemv: batch 1 with it
            name = gemvs[triton_gemvs % len(gemvs)]
            triton_gemvs += 1
            label, mkn = f"gemm: {name}", (rows, *by_weight[name])
        elif k["name"].startswith("split_k_reduce_kernel"):  # the reduce pass of the launch before it
            label = out[-1][1] if out else label
        if op is not None and op["name"] in GEMM_OPS and eid in seen:  # a split-K reduce: its GEMM's, no work
            out.append((k, out[-1][1] if out else label, None))
            continue
        seen.add(eid)
        if op is not None and op["name"] in GEMM_OPS:
            dims = [d for d in op["args"].get("Input Dims", []) if isinstance(d, list) and len(d) >= 2]
            if len(dims) >= 2:
                x, w = (dims[0], dims[1]) if op["name"] in ("aten::linear", "aten::matmul") else dims[-2:]
                M = 1
                for d in x[:-1]:
                    M *= d
                K = x[-1]
                N = w[0] if op["name"] == "aten::linear" else w[-1]  # linear's weight is (N, K)
                name = names.get((K, N))
                label, mkn = (f"gemm: {name}", (M, K, N)) if name else (f"gemm: other {M}x{K}x{N}", (M, K, N))
        out.append((k, label, mkn))
        sigs.setdefault(_sig(k), (label, mkn))
    return out, sigs


def positional(eager: list[tuple[dict, str, tuple]], graph: list[dict]) -> list | None:
    """Graph-replayed kernels labelled by their place in the step: a replay runs the eager step's kernels in
    the same order (the same names); None when the sequences differ (then signatures are used)."""
    if len(eager) != len(graph) or any(e[0]["name"] != g["name"] for e, g in zip(eager, graph)):
        return None
    return [(g, label, mkn) for (_, label, mkn), g in zip(eager, graph)]


def work(label: str, mkn, phase: str, shape, batch: int, tokens: int, context: int, nbytes_el: int = 2):
    """(bytes, FLOPs) one launch of a kernel of this label must do; (None, None) where not counted."""
    a, Dh = shape.args, shape.args.head_dim
    if label.startswith("gemm"):  # the work once per GEMM: its split-K reduce kernel adds none
        if not mkn:
            return 0.0, 0.0
        M, K, N = mkn
        return (K * N + M * K + M * N) * nbytes_el, 2.0 * M * K * N
    if label.startswith("attention: Triton split") and phase == "decode":
        keys = context + 1
        return 2 * batch * keys * shape.kv_heads * Dh * nbytes_el, 4.0 * batch * shape.q_heads * Dh * keys
    if label.startswith("attention: flash") and phase == "prefill":
        return None, 2.0 * shape.q_heads * Dh * tokens * tokens  # causal QK^T + PV
    return None, None


def summarize(labelled: list[tuple[dict, str, tuple]], steps: int, blocks: int, phase: str, shape, batch: int,
              tokens: int, context: int, rates: dict) -> dict:
    acc = defaultdict(lambda: dict(launches=0, us=0.0, bytes=0.0, flops=0.0, bytes_counted=True, flops_counted=True))
    excl = _exclusive(k for k, _, _ in labelled)
    for k, label, mkn in labelled:
        a = acc[label]
        a["launches"] += 1
        a["us"] += excl[id(k)]
        nb, fl = work(label, mkn, phase, shape, batch, tokens, context)
        if nb is None:
            a["bytes_counted"] = False
        else:
            a["bytes"] += nb
        if fl is None:
            a["flops_counted"] = False
        else:
            a["flops"] += fl
    ks = [k for k, _, _ in labelled]
    busy = sum(excl.values())  # the union of the kernels' intervals: the GPU's busy time
    span = (max(k["ts"] + k["dur"] for k in ks) - min(k["ts"] for k in ks)) if ks else 0.0
    rows = []
    for label, a in sorted(acc.items(), key=lambda kv: -kv[1]["us"]):
        us = a["us"] / steps
        row = dict(kind=label, launches_per_step=a["launches"] / steps, us_per_step=round(us, 2),
                   us_per_block=round(us / blocks, 3) if label != "gemm: lm_head" else None,
                   share=round(a["us"] / busy, 4) if busy else None)
        if a["bytes_counted"] and a["bytes"]:
            row["bytes_per_step"] = a["bytes"] / steps
            row["tbps"] = round(a["bytes"] / a["us"] / 1e6, 3)
            row["of_copy_bw"] = round(row["tbps"] / rates["copy_tbps"], 3)
        if a["flops_counted"] and a["flops"]:
            row["flops_per_step"] = a["flops"] / steps
            row["tflops"] = round(a["flops"] / a["us"] / 1e6, 1)
            row["of_matmul"] = round(row["tflops"] / rates["matmul_tflops"], 3)
        rows.append(row)
    return dict(phase=phase, batch=batch, tokens=tokens, context=context, steps=steps, blocks=blocks,
                kernels_per_step=len(ks) / steps, busy_us_per_step=round(busy / steps, 1),
                span_us_per_step=round(span / steps, 1), idle_us_per_step=round((span - busy) / steps, 1),
                rows=rows)


def _exclusive(ks) -> dict[int, float]:
    """{id(kernel): microseconds}: each kernel's end less the later of its start and every earlier-started
    kernel's end (0 if it ends before them): the time the step advanced while it ran. Equal to its duration
    when kernels do not overlap; with programmatic dependent launch a kernel starts early and waits inside
    (griddepcontrol.wait), and that wait is the previous kernel's time, not its own."""
    out, end = {}, -1e30
    for k in sorted(ks, key=lambda e: e["ts"]):
        a, b = float(k["ts"]), float(k["ts"]) + float(k["dur"])
        out[id(k)] = max(0.0, b - max(a, end))
        end = max(end, b)
    return out


def markdown(s: dict, title: str) -> str:
    out = [f"#### {title}", "",
           f"{s['kernels_per_step']:.0f} kernels a step; busy {s['busy_us_per_step']:.1f} us, span "
           f"{s['span_us_per_step']:.1f} us, idle between kernels {s['idle_us_per_step']:.1f} us a step "
           f"({s['blocks']} blocks).", "",
           "| kernel kind | launches a step | us a step | us a block | share of busy | bytes a step | TB/s "
           "| of copy bw | FLOPs a step | TFLOP/s | of matmul |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        def f(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else "-"
        out.append(f"| {r['kind']} | {r['launches_per_step']:g} | {r['us_per_step']:.1f} | {f('us_per_block', '.2f')} "
                   f"| {f('share', '.1%')} | {f('bytes_per_step', '.3g')} | {f('tbps', '.2f')} | {f('of_copy_bw', '.0%')} "
                   f"| {f('flops_per_step', '.3g')} | {f('tflops', '.1f')} | {f('of_matmul', '.0%')} |")
    return "\n".join(out) + "\n"


def analyse(out: Path, rates: dict, shape, layers: int, batch: int, context: int, tokens: list[int],
            pdl: bool = False) -> tuple[dict, str]:
    """Label and summarise the traces in out (decode_eager, decode_graph, prefill_<S>; .json or .json.gz)."""
    def find(stem):
        for suffix in (".trace.json", ".trace.json.gz"):
            if (out / (stem + suffix)).exists():
                return load(out / (stem + suffix))
        return None

    names, summaries = gemm_names(shape), {}
    dtype = rates.get("matmul_dtype", "bfloat16")
    md = [f"Measured ceilings: copy {rates['copy_tbps']:.2f} TB/s (read + write), {dtype} matmul "
          f"{rates['matmul_tflops']:.0f} TFLOP/s ({rates['matmul_n']}^3).", ""]
    eager = sigs = None
    for kind in ("eager", "graph"):
        tr = find(f"decode_{kind}")
        if tr is None:
            continue
        kernels, ops = tr
        if kind == "eager":
            labelled, sigs = label_eager(kernels, ops, names, batch, TRITON_GEMVS_PDL if pdl else TRITON_GEMVS)
            eager = labelled
        else:
            labelled = (eager and positional(eager, kernels)) or [
                (k, *(sigs or {}).get(_sig(k), (by_name(k["name"]), None))) for k in kernels]
        s = summarize(labelled, STEPS, layers, "decode", shape, batch, 1, context, rates)
        summaries[f"decode_{kind}"] = s
        md.append(markdown(s, f"decode, batch {batch}, position {context}, {kind} ({STEPS} steps, R = {shape.tp} shard)"))
    for S in tokens:
        tr = find(f"prefill_{S}")
        if tr is None:
            continue
        labelled, _ = label_eager(*tr, names)
        s = summarize(labelled, 1, layers, "prefill", shape, 1, S, 0, rates)
        summaries[f"prefill_{S}"] = s
        md.append(markdown(s, f"prefill of {S} tokens (eager, R = {shape.tp} shard)"))
    return summaries, "\n".join(md)


def main(argv=None) -> None:
    from torch.profiler import ProfilerActivity, profile

    from overlap.context import TPContext
    from overlap.floors import ShardShape, measure_rates
    from overlap.model import ModelArgs
    from overlap.runtime import Runtime
    from overlap.tp import build_sharded, set_nocomm_
    from spd.run import meta

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--virtual-tp", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--tokens", type=int, nargs="*", default=[2048])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True,
                   help="decode with programmatic dependent launch (spd-bench's default on sm_90+; --no-pdl: without)")
    p.add_argument("--stream-gemv", action=argparse.BooleanOptionalAction, default=True,
                   help="with pdl, batch-1 GEMVs through overlap.kernels.stream_gemv (spd-bench's default)")
    p.add_argument("--swiglu-gemv", action=argparse.BooleanOptionalAction, default=True,
                   help="decode rows' SwiGLU in the epilogue of w13's Triton GEMV (spd-bench's default since fcc40a1)")
    p.add_argument("--reanalyse", action="store_true",
                   help="only label and summarise the traces already in --out (rates from its kernel_kinds.json)")
    a = p.parse_args(argv)
    if a.reanalyse:
        prev = json.loads((a.out / "kernel_kinds.json").read_text())
        args = dataclasses.replace(ModelArgs.from_model_config(LLAMA2_70B), n_layers=prev["layers"])
        summaries, text = analyse(a.out, prev["rates"], ShardShape(args, prev["virtual_tp"]), prev["layers"],
                                  a.batch, a.context, a.tokens, prev.get("pdl", False))
        (a.out / "kernel_kinds.json").write_text(json.dumps(dict(prev, summaries=summaries), indent=1) + "\n")
        (a.out / "kernel_kinds.md").write_text(text)
        print(text)
        return
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    pdl = a.pdl and cuda and torch.cuda.get_device_capability(dev)[0] >= 9
    args = dataclasses.replace(ModelArgs.from_model_config(LLAMA2_70B), n_layers=a.layers)
    shape = ShardShape(args, a.virtual_tp)
    names = gemm_names(shape)
    a.out.mkdir(parents=True, exist_ok=True)
    rates = measure_rates(dev)
    print(f"[kinds] copy {rates['copy_tbps']:.3f} TB/s, matmul {rates['matmul_tflops']:.1f} TFLOP/s", flush=True)
    ctx = TPContext(rank=0, world_size=a.virtual_tp, device=dev)
    model = build_sharded(args, ctx, dtype=torch.bfloat16)
    set_nocomm_(model, True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    gen = torch.Generator().manual_seed(0)
    stream = pdl and a.stream_gemv
    swiglu = cuda and a.swiglu_gemv
    command = "python3 scripts/kernel_kinds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = dict(meta(command=command),
                  rates=rates, virtual_tp=a.virtual_tp, layers=a.layers, pdl=pdl, stream_gemv=stream,
                  swiglu_gemv=swiglu, batch=a.batch,
                  summaries={})  # meta: commit, versions, device, host, time
    def trace(fn, path: Path, shapes: bool):
        with profile(activities=acts, record_shapes=shapes) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
        prof.export_chrome_trace(str(path))

    # decode: eager (attribution) then graphs (timing)
    pos = a.context
    tok = torch.randint(0, args.vocab_size, (a.batch, 1), generator=gen).to(dev)
    for graphs in ([False, True] if cuda else [False]):
        rt = Runtime(model, ctx, a.batch, -(-(pos + 1) // 64) * 64, cuda_graphs=graphs, fuse=cuda, decode_kernel=cuda,
                     triton_gemv=cuda, swiglu_gemv=swiglu, pdl=pdl, stream_gemv=stream)  # spd-bench's default

        def steps(rt=rt):
            for _ in range(STEPS):
                rt.pos = pos
                rt.decode_one(tok)

        steps()
        steps()
        trace(steps, a.out / f"decode_{'graph' if graphs else 'eager'}.trace.json", not graphs)
        rt.invalidate()
        del rt
    for S in a.tokens:
        rt = Runtime(model, ctx, 1, -(-S // 64) * 64, cuda_graphs=False, fuse=cuda)
        ids = torch.randint(0, args.vocab_size, (1, S), generator=gen).to(dev)
        rt.prefill(ids, last_only=True)
        trace(lambda: rt.prefill(ids, last_only=True), a.out / f"prefill_{S}.trace.json", True)
        del rt
    result["summaries"], text = analyse(a.out, rates, shape, a.layers, a.batch, pos, a.tokens, pdl)
    print(text, flush=True)
    (a.out / "kernel_kinds.json").write_text(json.dumps(result, indent=1) + "\n")
    (a.out / "kernel_kinds.md").write_text(text)
    for t in a.out.glob("*.trace.json"):
        with open(t, "rb") as src, gzip.open(str(t) + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        t.unlink()


if __name__ == "__main__":
    main()
