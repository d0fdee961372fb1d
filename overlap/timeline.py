"""Compute/communication timelines from torch.profiler chrome traces: which GPU kernels ran when.

    python -m overlap.timeline base.trace.json iso.trace.json -o timeline.png   # + timeline.json

A kernel is an event with ph "X" and cat "kernel" (ts and dur in microseconds, args.stream its CUDA
stream); it is communication when its name contains "nccl" (ncclDevKernel_AllReduce_..., ncclKernel_...)
and compute otherwise. Per trace, with busy(K) the union of K's intervals:

    compute_ms = |busy(compute)|, comm_ms = |busy(comm)|, overlap_ms = |busy(compute) & busy(comm)|
    hidden = overlap_ms / comm_ms     (the share of communication time that compute runs under)
    exposed_comm_ms = comm_ms - overlap_ms, span_ms = last kernel end - first kernel start

The PNG has one panel per trace, a row per (device, stream), compute kernels blue and NCCL kernels
orange, time in ms from the trace's first kernel. Traces without kernels (CPU runs) give zeros.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

COMPUTE, COMM = "#4c72b0", "#dd8452"


def load_kernels(path: str | Path) -> list[dict]:
    """The kernel events of a chrome trace (.json or .json.gz): dicts name, start, end (us), row, comm."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    out = []
    for e in events:
        if e.get("ph") != "X" or e.get("cat") != "kernel" or "dur" not in e:
            continue
        args = e.get("args", {})
        row = (args.get("device", e.get("pid")), args.get("stream", e.get("tid")))
        start = float(e["ts"])
        out.append(dict(name=e["name"], start=start, end=start + float(e["dur"]), row=row,
                        comm="nccl" in e["name"].lower()))
    return sorted(out, key=lambda k: k["start"])


def union(intervals) -> list[tuple[float, float]]:
    """Sorted, merged (start, end) intervals."""
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(xs, ys) -> list[tuple[float, float]]:
    """The intersection of two sorted, merged interval lists."""
    out, i, j = [], 0, 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def summary(kernels: list[dict]) -> dict:
    """Busy, overlapped and exposed times (ms) of compute and communication kernels (module docstring)."""
    comp = union((k["start"], k["end"]) for k in kernels if not k["comm"])
    comm = union((k["start"], k["end"]) for k in kernels if k["comm"])
    both = _length(_intersection(comp, comm))
    span = (max(k["end"] for k in kernels) - kernels[0]["start"]) if kernels else 0.0
    c = _length(comm)
    return dict(kernels=len(kernels), comm_kernels=sum(k["comm"] for k in kernels), span_ms=span / 1e3,
                compute_ms=_length(comp) / 1e3, comm_ms=c / 1e3, overlap_ms=both / 1e3,
                exposed_comm_ms=(c - both) / 1e3, hidden=both / c if c else 0.0)


def render(panels: list[tuple[str, list[dict]]], png: str | Path) -> None:
    """One panel per (label, kernels): a row per (device, stream), compute blue, NCCL orange, ms on x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    heights = [max(1, len({k["row"] for k in ks})) for _, ks in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 1.2 + 0.8 * sum(heights)), squeeze=False,
                             gridspec_kw=dict(height_ratios=heights))
    for ax, (label, ks) in zip(axes[:, 0], panels):
        s = summary(ks)
        ax.set_title(f"{label}: span {s['span_ms']:.2f} ms, compute {s['compute_ms']:.2f} ms, comm "
                     f"{s['comm_ms']:.2f} ms, {100 * s['hidden']:.0f}% of comm under compute", fontsize=9, loc="left")
        rows = sorted({k["row"] for k in ks}, key=str)
        t0 = ks[0]["start"] if ks else 0.0
        for y, row in enumerate(rows):
            mine = [k for k in ks if k["row"] == row]
            for comm, color in ((False, COMPUTE), (True, COMM)):
                bars = [((k["start"] - t0) / 1e3, (k["end"] - k["start"]) / 1e3) for k in mine if k["comm"] == comm]
                ax.broken_barh(bars, (y - 0.4, 0.8), facecolors=color, linewidth=0)
        ax.set_yticks(range(len(rows)), [f"dev {d} stream {st}" for d, st in rows], fontsize=8)
        ax.set_ylim(-0.6, max(len(rows), 1) - 0.4)
        if not ks:
            ax.text(0.5, 0.5, "no GPU kernels in this trace", transform=ax.transAxes, ha="center", va="center")
    axes[-1, 0].set_xlabel("ms since the first kernel")
    axes[0, 0].legend(handles=[Patch(color=COMPUTE, label="compute"), Patch(color=COMM, label="NCCL")],
                      loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


KINDS = (  # (kind, substrings of the kernel name), first match wins; names as cuBLAS/cuDNN/NCCL/ATen emit them
    ("nccl", ("nccl",)),
    ("attention", ("flash", "fmha", "sdpa", "attention")),
    ("gemm", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "sm90_xmma")),
)


def kind(name: str) -> str:
    n = name.lower()
    return next((k for k, keys in KINDS if any(key in n for key in keys)), "elementwise")


def breakdown(kernels: list[dict]) -> dict[str, float]:
    """Busy ms per kernel kind (nccl, attention, gemm, elementwise: norms, RoPE, residual adds, copies)."""
    out = {k: 0.0 for k, _ in KINDS} | {"elementwise": 0.0}
    for k in kernels:
        out[kind(k["name"])] += (k["end"] - k["start"]) / 1000
    return out


def top_kernels(kernels: list[dict], n: int = 15) -> list[tuple[str, int, float]]:
    """The n kernel names with the most busy time: (name, launches, total ms), largest first."""
    acc: dict[str, list] = {}
    for k in kernels:
        a = acc.setdefault(k["name"], [0, 0.0])
        a[0] += 1
        a[1] += (k["end"] - k["start"]) / 1000
    return sorted(((name, c, ms) for name, (c, ms) in acc.items()), key=lambda t: -t[2])[:n]


def report(traces: list[tuple[str, Path]], png: str | Path) -> dict:
    """Render traces [(label, path)] into png and write {label: summary} next to it (png with .json)."""
    panels = [(label, load_kernels(path)) for label, path in traces]
    render(panels, png)
    out = {label: summary(ks) for label, ks in panels}
    Path(png).with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    for label, s in out.items():
        print(f"[timeline] {label}: span {s['span_ms']:.2f} ms, comm {s['comm_ms']:.2f} ms, "
              f"exposed {s['exposed_comm_ms']:.2f} ms, hidden {100 * s['hidden']:.0f}%", flush=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="compute/NCCL kernel timeline of torch.profiler chrome traces")
    parser.add_argument("traces", nargs="+", type=Path, help="chrome trace files (.json or .json.gz)")
    parser.add_argument("-o", "--out", type=Path, default=Path("timeline.png"), help="PNG (the summary: .json)")
    parser.add_argument("--breakdown", action="store_true", help="print busy ms per kernel kind instead")
    parser.add_argument("--top", type=int, default=0, help="with --breakdown: also the N costliest kernel names")
    a = parser.parse_args(argv)
    if a.breakdown:
        for p in a.traces:
            ks = load_kernels(p)
            b = breakdown(ks)
            total = sum(b.values()) or 1.0
            s = summary(ks)
            idle = s["span_ms"] - _length(union((k["start"], k["end"]) for k in ks)) / 1e3
            print(f"{p.name}: " + ", ".join(f"{k} {v:.2f} ms ({v / total:.0%})" for k, v in b.items())
                  + f"; {len(ks)} kernels, span {s['span_ms']:.2f} ms, idle {idle:.2f} ms")
            for name, count, ms in top_kernels(ks, a.top):
                print(f"    {name[:110]} x{count} {ms:.3f} ms")
        return
    report([(p.name.split(".")[0], p) for p in a.traces], a.out)


if __name__ == "__main__":
    main()
