"""scripts/kernel_kinds.py: kernels labelled by the GEMM that launched them, graph replays by place, work once."""

import dataclasses
import importlib.util

import pytest

from overlap.floors import ShardShape
from overlap.model import ModelArgs
from spd.run import PROJECT_ROOT

spec = importlib.util.spec_from_file_location("kernel_kinds", PROJECT_ROOT / "scripts" / "kernel_kinds.py")
kk = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kk)

SHAPE = ShardShape(dataclasses.replace(ModelArgs.from_model_config(kk.LLAMA2_70B), n_layers=1), 4)


def _kernel(name, ts, dur, eid, grid=(1, 1, 1)):
    return dict(name=name, ph="X", cat="kernel", ts=ts, dur=dur, args={"External id": eid, "grid": list(grid)})


def _op(name, eid, dims):
    return dict(name=name, ph="X", cat="cpu_op", args={"External id": eid, "Input Dims": dims})


def test_gemms_are_named_by_weight_shape_and_a_split_k_reduce_adds_no_work():
    ops = {1: _op("aten::mm", 1, [[1, 8192], [8192, 2560]]), 2: _op("aten::mm", 2, [[1, 2048], [2048, 8192]]),
           3: _op("aten::linear", 3, [[1, 1, 7168], [8192, 7168], []])}
    kernels = [_kernel("gemv_splitk", 0, 12, 1), _kernel("splitKreduce_kernel", 12, 2, 1), _kernel("gemv", 20, 10, 2),
               _kernel("gemv", 40, 29, 3), _kernel("triton_red_fused_rms_norm_0", 70, 3, 9),
               _kernel("split_kernel", 80, 5, 10), _kernel("merge_kernel", 90, 3, 11)]
    labelled, _ = kk.label_eager(kernels, ops, kk.gemm_names(SHAPE))
    assert [lab for _, lab, _ in labelled] == [
        "gemm: wqkv", "gemm: wqkv", "gemm: wo", "gemm: w2", "fused elementwise (compiled: norms, RoPE, SwiGLU, adds)",
        "attention: Triton split (RoPE, cache write, attention)", "attention: Triton merge"]
    s = kk.summarize(labelled, 1, 1, "decode", SHAPE, 1, 1, 2048, dict(copy_tbps=4.0, matmul_tflops=800.0))
    rows = {r["kind"]: r for r in s["rows"]}
    wqkv = rows["gemm: wqkv"]
    assert wqkv["launches_per_step"] == 2 and wqkv["us_per_step"] == 14
    assert wqkv["bytes_per_step"] == (8192 * 2560 + 8192 + 2560) * 2  # once, not once per kernel
    assert wqkv["tbps"] == pytest.approx(wqkv["bytes_per_step"] / 14e-6 / 1e12, rel=1e-3)
    kv = 2 * 2049 * 2 * 128 * 2  # K and V, 2049 positions, 2 KV heads, head dim 128, bf16
    assert rows["attention: Triton split (RoPE, cache write, attention)"]["bytes_per_step"] == kv
    assert s["busy_us_per_step"] == 64 and s["span_us_per_step"] == 93  # 14 + 10 + 29 + 3 + 5 + 3 busy; 0..93


def test_graph_replays_take_the_label_of_the_eager_kernel_at_the_same_place():
    # wo and w2 launch the same cuBLAS kernel with the same grid: a signature cannot tell them apart
    ops = {1: _op("aten::mm", 1, [[1, 2048], [2048, 8192]]), 2: _op("aten::mm", 2, [[1, 7168], [7168, 8192]])}
    eager = [_kernel("gemv", 0, 10, 1), _kernel("gemv", 20, 29, 2)]
    labelled, _ = kk.label_eager(eager, ops, kk.gemm_names(SHAPE))
    graph = [_kernel("gemv", 100, 10, 0), _kernel("gemv", 111, 29, 0)]
    assert [lab for _, lab, _ in kk.positional(labelled, graph)] == ["gemm: wo", "gemm: w2"]
    assert kk.positional(labelled, graph[:1]) is None  # another sequence: no positional labels


def test_triton_gemv_launches_are_wqkv_then_w13_with_their_reduce_pass():
    """The runtime's triton_gemv (no aten op to read shapes from): wqkv then w13 in every block, each launch's
    split-K reduce kernel with it; the bytes of each weight counted once."""
    kernels = [_kernel("norm_gemv_kernel", 0, 12, 1), _kernel("split_k_reduce_kernel", 12, 1, 2),
               _kernel("split_kernel", 20, 5, 3), _kernel("gemv", 30, 10, 4),
               _kernel("norm_gemv_kernel", 50, 58, 5), _kernel("split_k_reduce_kernel", 108, 1, 6)]
    labelled, _ = kk.label_eager(kernels, {}, kk.gemm_names(SHAPE))
    assert [lab for _, lab, _ in labelled] == ["gemm: wqkv", "gemm: wqkv",
                                              "attention: Triton split (RoPE, cache write, attention)", "gemm: ?",
                                              "gemm: w13", "gemm: w13"]
    s = kk.summarize(labelled, 1, 1, "decode", SHAPE, 1, 1, 2048, dict(copy_tbps=4.0, matmul_tflops=800.0))
    rows = {r["kind"]: r for r in s["rows"]}
    assert rows["gemm: w13"]["bytes_per_step"] == (8192 * 14336 + 8192 + 14336) * 2
    assert rows["gemm: wqkv"]["us_per_step"] == 13


def test_with_pdl_all_four_gemvs_are_triton_and_overlapping_kernels_count_their_exclusive_time():
    """Runtime(pdl=True): wqkv, wo, w13, w2 all through norm_gemv_kernel; a kernel launched early (PDL) that
    waits for the one before it counts only the time after that one's end, so the step's time adds up."""
    kernels = [_kernel("norm_gemv_kernel", 0, 12, 1), _kernel("split_kernel", 10, 6, 2),  # starts 2 us early
               _kernel("norm_gemv_kernel", 15, 10, 3), _kernel("norm_gemv_kernel", 24, 60, 4),
               _kernel("norm_gemv_kernel", 80, 30, 5)]
    labelled, _ = kk.label_eager(kernels, {}, kk.gemm_names(SHAPE), gemvs=kk.TRITON_GEMVS_PDL)
    assert [lab for _, lab, _ in labelled] == ["gemm: wqkv", "attention: Triton split (RoPE, cache write, attention)",
                                              "gemm: wo", "gemm: w13", "gemm: w2"]
    s = kk.summarize(labelled, 1, 1, "decode", SHAPE, 1, 1, 2048, dict(copy_tbps=4.0, matmul_tflops=800.0))
    us = {r["kind"]: r["us_per_step"] for r in s["rows"]}
    assert us == {"gemm: wqkv": 12, "attention: Triton split (RoPE, cache write, attention)": 4, "gemm: wo": 9,
                  "gemm: w13": 59, "gemm: w2": 26}
    assert sum(us.values()) == s["busy_us_per_step"] == 110


def test_stream_gemv_launches_are_labelled_like_the_triton_gemv():
    """Runtime(stream_gemv=True) at batch 1: the four GEMVs launch stream_gemv_kernel (wqkv and wo with their
    split-K reduce), labelled in block order like norm_gemv_kernel's launches."""
    kernels = [_kernel("stream_gemv_kernel", 0, 12, 1), _kernel("split_k_reduce_kernel", 12, 1, 2),
               _kernel("split_kernel", 14, 5, 3), _kernel("stream_gemv_kernel", 20, 10, 4),
               _kernel("stream_gemv_kernel", 31, 55, 5), _kernel("stream_gemv_kernel", 87, 28, 6)]
    labelled, _ = kk.label_eager(kernels, {}, kk.gemm_names(SHAPE), gemvs=kk.TRITON_GEMVS_PDL)
    assert [lab for _, lab, _ in labelled] == ["gemm: wqkv", "gemm: wqkv",
                                              "attention: Triton split (RoPE, cache write, attention)",
                                              "gemm: wo", "gemm: w13", "gemm: w2"]


def test_a_cpu_run_writes_its_provenance_beside_the_tables(tmp_path):
    """One block at R = 8 on the CPU (decode only): kernel_kinds.json says which commit, packages, device and
    command made it, like every other result file, and the tables are written."""
    import json

    from spd.run import git_commit

    kk.main(["--virtual-tp", "8", "--layers", "1", "--tokens", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "kernel_kinds.json").read_text())
    assert result["commit"] == git_commit() and result["versions"]["torch"]
    assert result["command"] == f"python3 scripts/kernel_kinds.py --virtual-tp 8 --layers 1 --tokens --out {tmp_path}"
    assert result["device"].startswith("cpu") and result["virtual_tp"] == 8 and result["layers"] == 1
    md = (tmp_path / "kernel_kinds.md").read_text()
    assert md.startswith("Measured ceilings") and "float32 matmul" in md  # the CPU's rate is an fp32 one
    assert "#### decode, batch 1, position 2048, eager (5 steps, R = 8 shard)" in md
