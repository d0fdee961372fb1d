"""overlap.kernel_bench on CPU: the LLaMA-2-70B case list, the statistics and table, and the --check
machinery (inputs, references, error reduction, records) run with the nccl impl over 2 gloo ranks."""

import json

import pytest

from overlap import kernel_bench as kb
from overlap.launch import spawn_ranks


def test_llama70b_shapes_at_tp4_are_the_briefs():
    layers = kb.llama70b_layers(4)
    assert layers == {"o": ("row", 2048, 8192), "down": ("row", 7168, 8192),
                      "qkv": ("col", 8192, 2560), "gate_up": ("col", 8192, 14336)}


def test_cases_cover_every_op_layer_and_size():
    cases = kb.make_cases(kb.llama70b_layers(4), kb.PREFILL_M, kb.DECODE_M)
    ops = {(c.op, c.layer) for c in cases}
    assert ops == {("matmul_all_reduce", "o"), ("matmul_all_reduce", "down"), ("matmul_reduce_scatter", "o"),
                   ("matmul_reduce_scatter", "down"), ("all_gather_matmul", "qkv"),
                   ("all_gather_matmul", "gate_up")}
    assert sorted(c.m for c in cases if c.decode) == [1, 1, 16, 16]
    assert all(c.op == "matmul_all_reduce" for c in cases if c.decode)
    assert len(cases) == 2 * (2 + 4 + 4) + 2 * 4
    only_rs = kb.make_cases(kb.llama70b_layers(4), (128,), (1,), ops=("matmul_reduce_scatter",))
    assert [(c.op, c.layer) for c in only_rs] == [("matmul_reduce_scatter", "o"), ("matmul_reduce_scatter", "down")]


def test_stats_are_quantiles():
    st = kb._stats([float(v) for v in range(1, 11)])
    assert st["median_ms"] == pytest.approx(5.5) and st["p20_ms"] == pytest.approx(2.8)
    assert st["p80_ms"] == pytest.approx(8.2)


def test_table_prints_one_line_per_case(capsys):
    base = {"op": "matmul_reduce_scatter", "layer": "down", "m": 4096, "gemm_ms": 0.6}
    recs = [{**base, "impl": "nccl", "median_ms": 0.9, "overlap_efficiency": 0.0, "path": "nccl"},
            {**base, "impl": "triton", "median_ms": 0.65, "overlap_efficiency": 5 / 6, "path": "pipeline"}]
    kb.print_table(recs)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 2 and "eff_triton" in lines[0]
    assert "0.83" in lines[1] and "pipeline" in lines[1]


def _check_on_rank(ctx, out_path):
    from overlap.kernels import get_impl

    layers = kb.llama70b_layers(ctx.world_size, dim=64, ffn=128, kv_dim=16)
    cases = kb.make_cases(layers, (8,), (1, 3))
    return kb.run_checks(ctx, {"nccl": get_impl("nccl", ctx)}, cases, out_path, graphs=False)


def test_check_mode_runs_on_gloo_and_writes_records(tmp_path):
    out = tmp_path / "check.jsonl"
    records = spawn_ranks(_check_on_rank, 2, tmp_path / "w", args=(out,), timeout_s=180)[0]
    assert records and all(r["ok"] for r in records)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(records) and lines[0]["schema"] == kb.CHECK_SCHEMA
    assert {r["extras"] for r in lines} == {False, True} and {r["call"] for r in lines} == {0, 1}


def test_help_runs_without_a_gpu():
    with pytest.raises(SystemExit) as e:
        kb.main(["--help"])
    assert e.value.code == 0
