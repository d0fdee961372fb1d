"""overlap/timeline.py on synthetic chrome traces, and the benchmark's --profile path on 2 gloo ranks."""

import gzip
import json

import pytest

from overlap.bench import run_profile
from overlap.launch import spawn_ranks
from overlap.timeline import breakdown, load_kernels, main, render, report, summary, union

RANKS_TIMEOUT_S = 150  # 2 spawned ranks on 2 shared CPU cores, imports included


def kernel(name, ts_us, dur_us, stream, device=0):
    return {"ph": "X", "cat": "kernel", "name": name, "pid": device, "tid": stream, "ts": ts_us, "dur": dur_us,
            "args": {"device": device, "stream": stream}}


def synthetic_trace():
    """Compute on stream 7 in [0, 10) and [12, 20) ms; NCCL on stream 30 in [5, 15) ms: 8 of its 10 ms hidden."""
    return {"traceEvents": [
        kernel("ampere_bf16_s16816gemm_bf16_256x128", 0, 6000, 7),
        kernel("flash_fwd_kernel", 6000, 4000, 7),  # adjacent to the GEMM: one busy interval [0, 10)
        kernel("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 5000, 10000, 30),
        kernel("elementwise_kernel", 12000, 8000, 7),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": 0, "dur": 50000},  # not a kernel
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 1, "pid": 0, "tid": 7},  # an instant, no duration
    ]}


def test_union_merges_overlapping_and_touching_intervals():
    assert union([(5, 7), (0, 2), (1, 3), (3, 4), (10, 11)]) == [(0, 4), (5, 7), (10, 11)]
    assert union([]) == []


@pytest.mark.parametrize("gz", [False, True], ids=["json", "json.gz"])
def test_summary_of_a_synthetic_trace(tmp_path, gz):
    path = tmp_path / ("t.json.gz" if gz else "t.json")
    text = json.dumps(synthetic_trace())
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    ks = load_kernels(path)
    assert [k["comm"] for k in ks] == [False, True, False, False]
    assert {k["row"] for k in ks} == {(0, 7), (0, 30)}
    s = summary(ks)
    assert s["kernels"] == 4 and s["comm_kernels"] == 1
    assert s["span_ms"] == pytest.approx(20.0)
    assert s["compute_ms"] == pytest.approx(18.0)
    assert s["comm_ms"] == pytest.approx(10.0)
    assert s["overlap_ms"] == pytest.approx(8.0)  # [5, 10) and [12, 15)
    assert s["exposed_comm_ms"] == pytest.approx(2.0)
    assert s["hidden"] == pytest.approx(0.8)


def test_breakdown_by_kernel_kind():
    ks = [dict(name=n, start=0.0, end=1000.0 * (i + 1)) for i, n in enumerate(
        ["nvjet_sm90_tst_320x128", "ncclDevKernel_AllReduce_Sum_bf16", "cudnn_sm90_flash_fprop", "roll_cuda_kernel"])]
    assert breakdown(ks) == {"nccl": 2.0, "attention": 3.0, "gemm": 1.0, "elementwise": 4.0}


def test_render_and_report_write_png_and_summary(tmp_path):
    path = tmp_path / "iso.trace.json"
    path.write_text(json.dumps(synthetic_trace()))
    empty = tmp_path / "cpu.trace.json"
    empty.write_text(json.dumps({"traceEvents": []}))  # a CPU run: no kernels
    png = tmp_path / "timeline.png"
    out = report([("iso", path), ("cpu", empty)], png)
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(png.with_suffix(".json").read_text()) == out
    assert out["cpu"]["comm_ms"] == 0.0 and out["cpu"]["hidden"] == 0.0
    render([("only", load_kernels(path))], tmp_path / "one.png")
    main([str(path), "-o", str(tmp_path / "cli.png")])
    assert (tmp_path / "cli.png").is_file() and "iso" in json.loads((tmp_path / "cli.json").read_text())


def profile_worker(ctx, job, out_dir, phase="prefill"):
    traces = run_profile(job, ctx, out_dir, layers=2, phase=phase)
    if ctx.is_main:
        report(traces, out_dir / "timeline.png")
    return [v for v, _ in traces]


def test_bench_profile_mode_writes_a_trace_per_variant(tmp_path):
    job = dict(model=dict(name="tiny", dtype="float32", hidden_size=64, intermediate_size=172, num_layers=4,
                          num_heads=8, num_kv_heads=4, vocab_size=512),
               bench=dict(tokens=[16, 32], variants=["base", "iso", "spd100+iso", "nocomm", "hf_tp"], warmup=1,
                          iso_chunks=2))
    out = tmp_path / "prof"
    results = spawn_ranks(profile_worker, 2, tmp_path / "ranks", args=(job, out), timeout_s=RANKS_TIMEOUT_S)
    assert results[0] == ["base", "iso", "spd100+iso", "nocomm"] and results[1] == []
    for name in ("base", "iso", "spd100-iso", "nocomm"):  # '+' is not a portable file-name character
        assert (out / f"{name}.trace.json").is_file(), name
    assert (out / "timeline.png").is_file()
    assert set(json.loads((out / "timeline.json").read_text())) == {"base", "iso", "spd100+iso", "nocomm"}


def test_bench_profile_mode_traces_decode_steps(tmp_path):
    job = dict(model=dict(name="tiny", dtype="float32", hidden_size=64, intermediate_size=172, num_layers=4,
                          num_heads=8, num_kv_heads=4, vocab_size=512),
               bench=dict(tokens=[16], context=24, variants=["base", "iso", "spd100", "nocomm"], warmup=1),
               cuda_graphs=True)  # ignored on CPU: eager steps, one trace per variant (ISO has no decode)
    out = tmp_path / "prof"
    results = spawn_ranks(profile_worker, 2, tmp_path / "ranks", args=(job, out, "decode"), timeout_s=RANKS_TIMEOUT_S)
    assert results[0] == ["base", "spd100", "nocomm"] and results[1] == []
    assert all((out / f"{v}.trace.json").is_file() for v in results[0])


def test_top_kernels_and_idle_time(tmp_path, capsys):
    from overlap.timeline import top_kernels

    ks = [dict(name=n, start=s, end=e, row=(0, 7), comm=False) for n, s, e in
          [("gemv2T_kernel", 0.0, 10.0), ("gemv2T_kernel", 20.0, 40.0), ("triton_poi_fused_add", 40.0, 45.0)]]
    assert top_kernels(ks, 1) == [("gemv2T_kernel", 2, 0.03)]
    assert breakdown(ks)["gemm"] == pytest.approx(0.03)  # cuBLAS GEMV is GEMM work
    path = tmp_path / "d.trace.json"
    path.write_text(json.dumps({"traceEvents": [dict(ph="X", cat="kernel", name=k["name"], ts=k["start"],
                                                     dur=k["end"] - k["start"], args={}) for k in ks]}))
    main(["--breakdown", "--top", "2", str(path)])
    out = capsys.readouterr().out
    assert "idle 0.01 ms" in out and "gemv2T_kernel x2 0.030 ms" in out
