"""Markdown tables from spd-bench records (JSON lines, schema spd.bench/1); tables come from files only.

One table per (model, device, dtype, phase, impl, fused kernels, commit, virtual R), so a table holds
one setup of one code version; a row per (R, interconnect, size), where size is the prefill length or
the decode batch and context; a column per variant with "median (p20-p80)" in ms (ISO variants timed
with a capped NCCL group or an SM carve-out are labelled e.g. "iso c8 s16": at most 8 NCCL thread
blocks, 16 SMs left free by cuBLAS; a cell marked "h" may be the host's time: its host_frac is 0.9 or more; one
marked "u" is unsteady: its p20-p80 spread is 20% of the median or more),
then two derived columns: what SPD on every block saves against
base, and the communication share of base, (base - nocomm) / base. Where the records carry floors
(overlap/floors.py, measured in the same run) the table adds the row's floor in ms (m: memory-bound,
bytes over the measured copy rate; c: compute-bound, FLOPs over the measured matmul rate) and the fraction
of it reached (floor / median) by the reference variant (base, else nocomm) and by hf_compile, and, where
an hf_compile record of the same setup exists, the speed-up hf_compile / reference. When a measurement
was repeated, the last record wins, and the text says how many cells had repeats. A commit is shortened to
12 characters when it is a hash; a label such as "abc123+decode_attention@def456" (what a run on a GPU box
with a file swapped in records as SPD_COMMIT) is shown whole.

    python scripts/bench_table.py docs/benchmarks/spd_bench.jsonl [more.jsonl] [-o table.md]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SCHEMA = "spd.bench/1"
ORDER = ["base", "iso", "spd25", "spd50", "spd75", "spd100", "spd100+iso", "nocomm", "hf_tp", "hf_compile"]
PEERS = ("hf_tp", "hf_compile")
HOST_BOUND_FRAC = 0.9  # host_frac from which a cell is marked (and spd-bench warns): its time may be the host's
UNSTEADY_SPREAD = 0.2  # (p80 - p20) / median from which a cell is marked (and spd-bench warns): the timed runs
# disagree. The records so far: at most 12% for every setup but R = 8's eager prefill of 2048 tokens (25-38% in 6 of
# its 13 eager records), whose launch path is about as long as its GPU time (host_frac 0.95-1.03)


def read_records(paths) -> list[dict]:
    """Every spd.bench/1 record of the files, in file order (other lines are skipped)."""
    out = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("schema") == SCHEMA:
                out.append(rec)
    return out


def _variant_key(label: str):
    v, _, settings = label.partition(" ")
    return (*_order(v), settings)


def _order(v: str):
    if v in ORDER:
        return (ORDER.index(v), 0)
    m = re.match(r"spd(\d+)(\+iso)?$", v)  # other SPD shares (with or without ISO) sit before spd100
    return (ORDER.index("spd100") - 0.5, int(m.group(1)), bool(m.group(2))) if m else (len(ORDER), v)


def _label(rec: dict) -> str:
    """The column of a record: its variant, with the ISO settings it was timed with (if not the defaults)."""
    extra = [f"{k}{rec[f]}" for k, f in (("c", "iso_ctas"), ("s", "iso_sm_carveout")) if rec.get(f) is not None]
    return " ".join([rec["variant"], *extra])


def _kernels(rec: dict) -> str:
    """The kernels between the weight GEMMs: eager, fused (compiled) elementwise, and the Triton decode pass."""
    if not rec.get("fused"):
        return "unfused elementwise"
    triton = rec.get("decode_kernel") and rec["phase"] == "decode"  # prefill never runs it
    graphs = rec.get("prefill_graphs") and rec["phase"] == "prefill"
    decode = rec["phase"] == "decode"
    # the kernel switches, named as bench.* names them (what swiglu_gemv fuses differs by commit:
    # docs/benchmarks/pdl.md); all but fuse_residual are decode's only. Records carry them since they exist (a
    # record without one: off); qkv_in_attention and fuse_residual only old records (the switches are removed),
    # kept apart by them.
    switches = [("norm_gemv", " + norm-GEMV", decode), ("triton_gemv", " + Triton GEMV", decode),
                ("swiglu_gemv", " + swiglu_gemv", decode), ("pdl", " + PDL", decode),
                ("stream_gemv", " + stream GEMV", decode),
                ("qkv_in_attention", " + qkv in attention", decode), ("fuse_residual", " + residual in norm", True)]
    return ("fused elementwise" + (" + Triton decode attention" if triton else "")
            + "".join(text for key, text, applies in switches if applies and rec.get(key))
            + (" + prefill CUDA graph" if graphs else ""))


def _size(rec: dict) -> tuple:
    if rec["phase"] == "prefill":
        return (rec["tokens"],)
    return (rec["batch"], rec["context"])


def _size_label(phase: str, size: tuple) -> str:
    return f"{size[0]} tokens" if phase == "prefill" else f"batch {size[0]}, ctx {size[1]}"


def host_bound(rec: dict | None) -> bool:
    """Whether the record's time may be the host's launch path: host_frac at HOST_BOUND_FRAC or more."""
    return rec is not None and rec.get("host_frac", 0) >= HOST_BOUND_FRAC


def spread(rec: dict) -> float:
    """(p80 - p20) / median of the record's timed runs (0 for a zero median)."""
    return (rec["p80_ms"] - rec["p20_ms"]) / rec["median_ms"] if rec["median_ms"] else 0.0


def unsteady(rec: dict | None) -> bool:
    """Whether the record's timed runs disagree: a spread of UNSTEADY_SPREAD or more."""
    return rec is not None and spread(rec) >= UNSTEADY_SPREAD


def _cell(rec: dict | None) -> str:
    if rec is None:
        return "-"
    mark = (" h" if host_bound(rec) else "") + (" u" if unsteady(rec) else "")
    return f"{rec['median_ms']:.2f} ({rec['p20_ms']:.2f}-{rec['p80_ms']:.2f}){mark}"


def _pct(a: dict | None, b: dict | None) -> str:
    if a is None or b is None or not a["median_ms"]:
        return "-"
    return f"{100 * (a['median_ms'] - b['median_ms']) / a['median_ms']:.1f}%"


def _frac(rec: dict | None) -> str:
    if rec is None or not rec.get("floor_ms") or not rec["median_ms"]:
        return "-"
    return f"{100 * rec['floor_ms'] / rec['median_ms']:.0f}%"


def _floor(rec: dict | None) -> str:
    if rec is None or not rec.get("floor_ms"):
        return "-"
    return f"{rec['floor_ms']:.2f} {rec.get('floor_bound', '?')[0]}"


def _ratio(peer: dict | None, ours: dict | None) -> str:
    if peer is None or ours is None or not ours["median_ms"]:
        return "-"
    return f"{peer['median_ms'] / ours['median_ms']:.2f}x"


def _commit(commit: str) -> str:
    """A hash shortened to 12 characters; any other label (e.g. "abc123+decode_attention@def456") whole."""
    return commit[:12] if all(c in "0123456789abcdef" for c in commit.lower()) else commit


def tables(records: list[dict]) -> str:
    """The markdown text: one titled table per (model, device, dtype, phase)."""
    latest: dict[tuple, dict] = {}
    repeated = set()
    for rec in records:
        setup = (rec["model"], rec["device"], rec.get("dtype", ""), rec["phase"], rec.get("impl", "nccl"),
                 _kernels(rec), rec["commit"], bool(rec.get("virtual_tp")))
        key = (setup, rec["tp"], rec["interconnect"], _size(rec), _label(rec))
        if key in latest:
            repeated.add(key)
        latest[key] = rec
    groups: dict[tuple, dict] = {}
    for (setup, tp, ic, size, label), rec in latest.items():
        groups.setdefault(setup, {}).setdefault((tp, ic, size), {})[label] = rec
    parts = []
    for setup, rows in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        model, device, dtype, phase, impl, kernels, commit, virtual = setup
        variants = sorted({v for cells in rows.values() for v in cells}, key=_variant_key)
        any_rec = next(iter(next(iter(rows.values())).values()))
        alone = ", one rank's shard alone (virtual R)" if virtual else ""
        parts.append(f"### {model}, {phase}, {dtype}, impl {impl}, {kernels}"
                     f"{alone}, on {device} (torch {any_rec['torch']}, commit {_commit(commit)})\n")
        floors = any(r.get("floor_ms") for cells in rows.values() for r in cells.values())
        ref = "base" if "base" in variants else "nocomm" if "nocomm" in variants else None
        peer = "hf_compile" in variants
        head = ["R", "interconnect", "size", *variants, "SPD100 saves", "comm share"]
        if floors:
            head += ["floor", *([f"{ref} of floor"] if ref else []), *(["hf_compile of floor"] if peer else [])]
        if peer and ref:
            head.append(f"hf_compile / {ref}")
        parts.append("| " + " | ".join(head) + " |")
        parts.append("|" + "---|" * len(head))
        for (tp, ic, size), cells in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
            row = [str(tp), ic, _size_label(phase, size), *(_cell(cells.get(v)) for v in variants),
                   _pct(cells.get("base"), cells.get("spd100")), _pct(cells.get("base"), cells.get("nocomm"))]
            if floors:
                any_floor = next((r for r in cells.values() if r.get("floor_ms")), None)
                row += [_floor(any_floor), *([_frac(cells.get(ref))] if ref else []),
                        *([_frac(cells.get("hf_compile"))] if peer else [])]
            if peer and ref:
                row.append(_ratio(cells.get("hf_compile"), cells.get(ref)))
            parts.append("| " + " | ".join(row) + " |")
        parts.append("")
    parts.append("Milliseconds: median (20th-80th percentile) over the timed iterations, warm-up excluded. "
                 "nocomm skips every all-reduce (wrong numbers, the lower bound).")
    if repeated:
        parts.append(f"{len(repeated)} cell(s) had more than one record of the same setup (a repeated job, or two "
                     "jobs of one call): each shows the last in file order.")
    if any(host_bound(r) for r in latest.values()):
        parts.append(f"h: launching one iteration took the host at least {100 * HOST_BOUND_FRAC:.0f}% of the median "
                     "(host_ms, with the GPU idle), so the time may be the host's launch path rather than the GPU's.")
    if any(unsteady(r) for r in latest.values()):
        parts.append(f"u: unsteady, the 20th-80th percentile spread is at least {100 * UNSTEADY_SPREAD:.0f}% of the "
                     "median (the device's pace changed during the timed runs): repeat the measurement.")
    if any(r.get("floor_ms") for r in latest.values()):
        parts.append("Floor: the larger of bytes / measured copy bandwidth (m) and FLOPs / measured matmul "
                     "throughput (c), both measured in the same run (overlap/floors.py); X of floor = floor / "
                     "median; hf_compile / X = how many times faster X is than transformers' compiled model.")
    return "\n".join(parts) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="markdown tables from spd-bench JSON lines")
    parser.add_argument("files", nargs="+", help="spd-bench output files (bench.out)")
    parser.add_argument("-o", "--out", help="write the tables here instead of printing them")
    a = parser.parse_args(argv)
    records = read_records(a.files)
    if not records:
        raise SystemExit(f"no {SCHEMA} records in {', '.join(a.files)}")
    text = tables(records)
    if a.out:
        Path(a.out).write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
