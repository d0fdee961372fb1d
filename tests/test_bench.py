"""spd-bench: the CPU smoke run (2 gloo ranks, tiny model) end to end, the child environment, the table."""

import json
import subprocess
import sys

import pytest

from overlap.bench import check_impl, check_variants, percentile
from overlap.bench_table import read_records, tables
from overlap.cli import NO_MULTICAST, child_env
from spd.errors import ParallelConfigError, SPDError
from spd.run import PROJECT_ROOT

SMOKE_TIMEOUT_S = 240  # torchrun + 2 ranks importing torch on 2 shared CPU cores; the run itself takes seconds
FIELDS = {"schema", "model", "tp", "phase", "tokens", "batch", "context", "variant", "interconnect", "median_ms",
          "p20_ms", "p80_ms", "iters", "device", "torch", "commit", "time"}


def test_cpu_smoke_run_writes_one_record_per_measurement(tmp_path):
    out, run_dir = tmp_path / "bench.jsonl", tmp_path / "run"
    cmd = [sys.executable, "-m", "overlap.cli", "model=tiny", "bench=smoke", "parallel.tp=2",
           f"bench.out={out}", f"hydra.run.dir={run_dir}", "bench.variants=[base,spd50,iso,spd50+iso,nocomm,hf_tp]",
           "bench.timeout_s=60", "bench.iso_ctas=[null,4]", "bench.fuse=true"]
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "hf_tp skipped" in done.stdout
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    # prefill 32 tokens x (base, spd50, nocomm, 2 ISO settings x (iso, spd50+iso)) + decode 2 batches x 3
    assert len(recs) == 3 + 2 * 2 + 2 * 3
    for rec in recs:
        assert FIELDS <= set(rec), FIELDS - set(rec)
        assert rec["schema"] == "spd.bench/1" and rec["tp"] == 2 and rec["model"] == "tiny"
        assert rec["impl"] == "nccl"  # the default collective implementation
        assert rec["fused"] is False  # bench.fuse applies on GPUs only
        assert rec["virtual_tp"] is False  # two real ranks, not one shard alone
        assert rec.get("prefill_graphs", False) is False  # eager prefill (captured ones need a GPU)
        assert rec["p20_ms"] <= rec["median_ms"] <= rec["p80_ms"]
    assert {r["variant"]: r["spd_blocks"] for r in recs} == {"base": 0, "spd50": 2, "iso": 0, "spd50+iso": 2,
                                                              "nocomm": 0}
    assert {(r["phase"], r["variant"], r["iso_chunks"]) for r in recs if "iso" in r["variant"]} == {
        ("prefill", "iso", 2), ("prefill", "spd50+iso", 2)}  # decode has no ISO
    assert sorted((r["variant"], str(r["iso_ctas"])) for r in recs if "iso" in r["variant"]) == [
        ("iso", "4"), ("iso", "None"), ("spd50+iso", "4"), ("spd50+iso", "None")]
    assert sorted({(r["phase"], r["tokens"], r["batch"]) for r in recs}) == [
        ("decode", 1, 1), ("decode", 1, 2), ("prefill", 32, 1)]
    for name in ("config.yaml", "meta.json", "job.json"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "job.json").read_text())["out"] == str(out)


def test_dry_run_writes_a_portable_job_and_launches_nothing(tmp_path):
    cmd = [sys.executable, "-m", "overlap.cli", "parallel.tp=4", "parallel=nop2p", f"hydra.run.dir={tmp_path}",
           "bench.dry_run=true"]
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    job = json.loads((tmp_path / "job.json").read_text())
    assert (job["tp"], job["interconnect"], job["model"]["name"]) == (4, "nop2p", "llama2_70b")
    assert job["model"]["num_layers"] == 80
    assert job["out"] == "docs/benchmarks/spd_bench.jsonl"  # relative: resolved where the job runs
    assert "--nproc-per-node=4 -m overlap.bench --job" in done.stdout
    assert job["impl"] == "nccl"
    assert job["fuse"] is True and job["iso_ctas"] == [None]  # the fast elementwise path unless bench.fuse=false
    assert job["prefill_graphs"] is False  # eager prefill unless bench.prefill_graphs=true


def test_dry_run_passes_extra_impl_into_the_job(tmp_path):
    cmd = [sys.executable, "-m", "overlap.cli", "parallel.tp=4", f"hydra.run.dir={tmp_path}", "bench.impl=triton",
           "bench.variants=[base,spd100,nocomm]", "bench.dry_run=true"]
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "job.json").read_text())["impl"] == "triton"


def test_iso_settings_and_their_validation():
    from overlap.bench import iso_settings
    from overlap.cli import _int_list

    assert iso_settings({}) == [(None, None)]
    assert iso_settings({"iso_ctas": [None, 4], "iso_sm_carveout": [8]}) == [(None, 8), (4, 8)]
    assert _int_list(None, "iso_ctas") == [None] and _int_list(4, "iso_ctas") == [4]
    assert _int_list(["null", "2", 8], "iso_ctas") == [None, 2, 8]
    with pytest.raises(SPDError, match="bench.iso_ctas must be an int or a list of ints"):
        _int_list(["four"], "iso_ctas")


def test_impl_is_validated():
    assert check_impl("nccl", ["base", "iso", "spd50+iso"]) == "nccl"
    assert check_impl("symm_mem", ["base", "spd100", "nocomm"]) == "symm_mem"
    with pytest.raises(SPDError, match="valid: nccl, symm_mem, triton"):
        check_impl("mpi", ["base"])
    assert check_impl("triton", ["base", "iso", "spd50+iso"]) == "triton"  # ISO composes with fused impls


def test_child_env_keeps_multicast_off_and_sets_p2p(monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")  # even a caller's opposite setting is overridden
    monkeypatch.setenv("NCCL_P2P_DISABLE", "1")
    nvlink, nop2p = child_env("nvlink"), child_env("nop2p")
    for env in (nvlink, nop2p):
        assert all(env[k] == v for k, v in NO_MULTICAST.items())
        assert str(PROJECT_ROOT) in env["PYTHONPATH"]
    assert "NCCL_P2P_DISABLE" not in nvlink and nop2p["NCCL_P2P_DISABLE"] == "1"
    with pytest.raises(ParallelConfigError, match="valid: nvlink, nop2p"):
        child_env("pcie")


def test_variants_are_validated():
    assert check_variants(["base", "spd0", "spd37", "spd100", "nocomm", "hf_tp", "hf_compile", "iso", "spd0+iso",
                           "spd100+iso"])
    for bad in ("spd101", "spd", "fast", "nocomm+iso", "hf_tp+iso", "base+iso", "spd101+iso", "iso+iso", "spd50iso"):
        with pytest.raises(SPDError, match=r"valid: base, nocomm, hf_tp, hf_compile, spd0..spd100 .*, iso, spd0\+iso"):
            check_variants([bad])


def test_percentile_interpolates():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert (percentile(xs, 50), percentile(xs, 20), percentile(xs, 80)) == (3.0, 1.8, 4.2)
    assert percentile([7.0], 20) == 7.0


def _rec(variant, median, phase="decode", **kw):
    base = dict(schema="spd.bench/1", model="llama2_70b", device="4x H200", dtype="bfloat16", torch="2.11",
                commit="abc", tp=4, interconnect="nvlink", phase=phase, tokens=1, batch=1, context=2048,
                variant=variant, median_ms=median, p20_ms=median - 0.1, p80_ms=median + 0.1)
    return base | kw


def test_table_from_records(tmp_path):
    path = tmp_path / "b.jsonl"
    recs = [_rec("base", 20.0), _rec("spd100", 14.0), _rec("nocomm", 12.6), _rec("base", 14.85),  # rerun wins
            _rec("spd50", 14.4), _rec("base", 144.5, phase="prefill", tokens=2048, context=0)]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\nnot json\n{\"schema\": \"other\"}\n")
    records = read_records([path])
    assert len(records) == len(recs)
    text = tables(records)
    assert "| R | interconnect | size | base | spd50 | spd100 | nocomm | SPD100 saves | comm share |" in text
    assert "| 4 | nvlink | batch 1, ctx 2048 | 14.85 (14.75-14.95) | 14.40 (14.30-14.50) | 14.00 (13.90-14.10) " \
           "| 12.60 (12.50-12.70) | 5.7% | 15.2% |" in text
    assert "### llama2_70b, prefill, bfloat16, impl nccl, unfused elementwise, on 4x H200" in text
    assert "| 2048 tokens | 144.50" in text
    # another setup (fused kernels) gets its own table; ISO settings their own columns
    more = [dict(_rec("base", 140.0, phase="prefill", tokens=2048, context=0), fused=True),
            dict(_rec("iso", 139.0, phase="prefill", tokens=2048, context=0), fused=True, iso_ctas=8, iso_sm_carveout=None),
            dict(_rec("iso", 141.0, phase="prefill", tokens=2048, context=0), fused=True, iso_ctas=None)]
    text = tables(read_records([path]) + more)
    assert "### llama2_70b, prefill, bfloat16, impl nccl, fused elementwise" in text
    assert "| R | interconnect | size | base | iso | iso c8 | SPD100 saves | comm share |" in text


def test_virtual_tp_times_one_rank_shard_alone_with_its_hf_compile_peer_and_floors(tmp_path):
    """bench.virtual_tp=2 on one process: rank 0's shard of a 2-way split, nocomm, recorded as tp 2; in the
    same run transformers' model of the same shard (hf_compile; on CPU its decode step goes through Dynamo's
    full-graph capture with the eager backend) and the floors measured once, stated on every record."""
    out = tmp_path / "v.jsonl"
    cmd = [sys.executable, "-m", "overlap.cli", "model=tiny", "bench=smoke", "parallel.tp=1", "bench.virtual_tp=2",
           "bench.variants=[nocomm,hf_compile]", f"bench.out={out}", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 6 and all(r["tp"] == 2 and r["virtual_tp"] is True for r in recs)
    assert sorted((r["variant"], r["phase"], r["batch"]) for r in recs) == [
        ("hf_compile", "decode", 1), ("hf_compile", "decode", 2), ("hf_compile", "prefill", 1),
        ("nocomm", "decode", 1), ("nocomm", "decode", 2), ("nocomm", "prefill", 1)]
    for r in recs:
        assert r["copy_tbps"] > 0 and r["matmul_tflops"] > 0 and r["copy_bytes"] > 0  # measured in this run
        assert r["matmul_sustained_tflops"] > 0 and r["floor_flop_burst_ms"] > 0
        assert r["floor_ms"] == max(r["floor_mem_ms"], r["floor_flop_ms"])
        assert r["floor_frac"] == pytest.approx(r["floor_ms"] / r["median_ms"], rel=1e-3)
        assert r["floor_mem_ms"] == pytest.approx(r["floor_bytes"] / (r["copy_tbps"] * 1e9), rel=1e-3)
    assert len({(r["copy_tbps"], r["matmul_tflops"]) for r in recs}) == 1  # once a job
    peer = [r for r in recs if r["variant"] == "hf_compile"]
    assert all(r["peer"].startswith("transformers ") for r in peer)
    assert {(r["phase"], r["compile"]) for r in peer} == {("prefill", False), ("decode", True)}
    # the same shard shape, so the same floor as nocomm's record of the same size
    floor = {(r["phase"], r["batch"], r["variant"]): r["floor_ms"] for r in recs}
    assert all(floor[(p, b, "nocomm")] == floor[(p, b, "hf_compile")] for p, b, _ in floor)
    text = tables(recs)
    assert "one rank's shard alone (virtual R)" in text
    assert "| nocomm | hf_compile | SPD100 saves | comm share | floor | nocomm of floor | hf_compile of floor " \
           "| hf_compile / nocomm |" in text


def bench_config(*overrides):
    """spd-bench's resolved config for the tiny model's smoke settings plus overrides (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir

    from spd.config import CONF_DIR, as_dataclass

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return as_dataclass(compose("bench", overrides=["model=tiny", "bench=smoke", *overrides]))


VIRTUAL = ("parallel.tp=1", "bench.virtual_tp=2", "bench.variants=[nocomm]")


@pytest.mark.parametrize("bad", [["parallel.tp=2"], ["bench.variants=[base,nocomm]"], ["bench.variants=[nocomm,hf_tp]"],
                                 ["bench.impl=triton"]])
def test_virtual_tp_refuses_what_it_cannot_measure(bad):
    from overlap.cli import bench_job

    with pytest.raises(SPDError, match=r"virtual_tp=2 .* it needs parallel.tp=1, bench.variants=\[nocomm\]"):
        bench_job(bench_config(*VIRTUAL, *bad))


def test_a_refused_job_exits_non_zero_and_writes_no_job_file(tmp_path):
    """The command line's side of the refusals above (one of them, through the real CLI)."""
    cmd = [sys.executable, "-m", "overlap.cli", "model=tiny", "bench=smoke", *VIRTUAL, f"hydra.run.dir={tmp_path}",
           "bench.dry_run=true", "bench.impl=triton"]
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert done.returncode != 0
    assert "virtual_tp=2" in done.stderr + done.stdout and "bench.variants=[nocomm]" in done.stderr + done.stdout
    assert "torch.distributed.run" not in done.stdout and not (tmp_path / "job.json").exists()


def test_table_says_which_cells_had_repeats_and_keeps_commit_labels_whole():
    label = "0ed9b92+decode_attention@4fcbc7e"  # SPD_COMMIT of a run with one file swapped in
    text = tables([_rec("nocomm", 10.55, commit="0ed9b92"), _rec("nocomm", 10.54, commit="0ed9b92"),
                   _rec("nocomm", 10.47, commit=label), _rec("base", 12.0, commit="a" * 40)])
    assert f"commit {label})" in text and f"commit {'a' * 12})" in text
    assert "| 10.54 (10.44-10.64) |" in text and "10.55" not in text  # the last record of the cell
    assert "1 cell(s) had more than one record" in text
    assert "more than one record" not in tables([_rec("nocomm", 10.55)])


def test_table_labels_the_triton_decode_attention_on_decode_rows_only():
    dec = dict(_rec("nocomm", 11.0), fused=True, decode_kernel=True)
    pre = dict(_rec("nocomm", 117.0, phase="prefill", tokens=2048, context=0), fused=True, decode_kernel=True)
    text = tables([dec, pre, dict(_rec("nocomm", 11.8), fused=True, decode_kernel=False)])
    assert "decode, bfloat16, impl nccl, fused elementwise + Triton decode attention, on" in text
    assert "prefill, bfloat16, impl nccl, fused elementwise, on" in text
    assert "decode, bfloat16, impl nccl, fused elementwise, on" in text  # the A/B reference: its own table


def test_table_keeps_each_decode_kernel_switch_in_its_own_table():
    """Records of one commit that differ only in triton_gemv / swiglu_gemv / pdl (an A/B in one call) must not
    land in one table, where one would hide the other."""
    base = dict(_rec("nocomm", 10.9), fused=True, decode_kernel=True, triton_gemv=True, pdl=False)
    text = tables([base, dict(base, median_ms=10.3, pdl=True), dict(base, median_ms=10.95, swiglu_gemv=True),
                   dict(base, median_ms=10.46, pdl=True, qkv_in_attention=True),  # an old record's switch (removed)
                   dict(base, median_ms=9.67, pdl=True, stream_gemv=True),
                   dict(_rec("nocomm", 116.8, phase="prefill", tokens=2048, context=0), fused=True, pdl=True),
                   dict(_rec("nocomm", 115.8, phase="prefill", tokens=2048, context=0), fused=True,
                        fuse_residual=True)])  # an old record's switch (removed)
    assert "fused elementwise + Triton decode attention + Triton GEMV, on" in text
    assert "fused elementwise + Triton decode attention + Triton GEMV + PDL, on" in text
    assert "fused elementwise + Triton decode attention + Triton GEMV + swiglu_gemv, on" in text
    assert "fused elementwise + Triton decode attention + Triton GEMV + PDL + qkv in attention, on" in text
    assert "fused elementwise + Triton decode attention + Triton GEMV + PDL + stream GEMV, on" in text
    assert "prefill, bfloat16, impl nccl, fused elementwise, on" in text  # pdl is decode's: prefill runs without
    assert "prefill, bfloat16, impl nccl, fused elementwise + residual in norm, on" in text  # fuse_residual: both
    assert all(text.count(ms) == 1 for ms in ("10.30", "10.90", "10.95", "10.46", "9.67")), text


@pytest.mark.parametrize("degree", [["parallel.tp=3"], ["bench.virtual_tp=3", "bench.variants=[nocomm]"]])
def test_a_degree_the_shape_cannot_take_fails_before_launching(degree):
    from overlap.cli import bench_job

    with pytest.raises(ParallelConfigError, match="valid degrees: 1, 2, 4, 8"):  # tiny: 8 heads, 4 KV heads
        bench_job(bench_config(*degree))  # the job is built (and refused) before anything launches


def test_floor_arithmetic_against_a_hand_count():
    """Weight bytes and FLOPs of one rank's shard, counted by hand on the tiny shape and the LLaMA-2-70B one."""
    from overlap.floors import ShardShape, floor_fields
    from overlap.model import ModelArgs

    tiny = ModelArgs(vocab_size=512, dim=64, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=172)  # conf/model/tiny
    s = ShardShape(tiny, 2)  # rank 0 of 2: 4 query heads, 2 KV heads, 86 FFN rows, head dim 8
    # wqkv (4 + 2 + 2) x 8 x 64 + wo 64 x 32 + w13 2 x 86 x 64 + w2 64 x 86
    assert s.block_gemm_params() == 4096 + 2048 + 11008 + 5504 == 22656
    assert s.weight_params() == 4 * (22656 + 2 * 64) + 64 + 512 * 64 == 123968  # + norms, final norm, lm_head
    # decode, batch 2 at position 64 (65 cached positions), float32
    nbytes, flops = s.work("decode", 1, 2, 64, 4)
    kv = 2 * 4 * 2 * 65 * 2 * 8  # K and V, 4 blocks, batch 2, 65 positions, 2 KV heads, head dim 8
    assert nbytes == 4 * (123968 + kv) == 562432
    assert flops == 2 * 2 * 22656 * 4 + 4 * 4 * 2 * 4 * 8 * 65 + 2 * 2 * 512 * 64 == 560128
    # prefill of 32 tokens: GEMMs, causal attention (half of 32 x 32 pairs), the last token's lm_head
    nbytes, flops = s.work("prefill", 32, 1, 0, 4)
    assert nbytes == 4 * (123968 + 2 * 4 * 32 * 2 * 8)
    assert flops == 2 * 32 * 22656 * 4 + 4 * 4 * 4 * 8 * 32 * 32 / 2 + 2 * 512 * 64
    # degree 8 > 4 KV heads: one replicated KV head, uneven FFN rows (172 = 4 x 22 + 4 x 21: rank 0 has 22)
    s8 = ShardShape(tiny, 8)
    assert (s8.q_heads, s8.kv_heads, s8.ffn) == (1, 1, 22)
    # LLaMA-2-70B, R = 4: 34.75 GB of bf16 a rank (the figure of issue 16); R = 8: one KV head a rank
    big = ModelArgs(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672)
    assert ShardShape(big, 4).weight_params() * 2 == 34_752_446_464
    assert ShardShape(big, 8).kv_heads == 1 and ShardShape(big, 8).ffn == 3584
    rates = dict(copy_tbps=4.0, matmul_tflops=800.0, matmul_sustained_tflops=650.0)
    f = floor_fields(ShardShape(big, 4), rates, "decode", 1, 1, 2048, 2, median_ms=11.0)
    assert f["floor_bound"] == "memory" and f["floor_ms"] == pytest.approx(f["floor_bytes"] / 4e9, rel=1e-5)
    assert f["floor_frac"] == pytest.approx(f["floor_ms"] / 11.0, rel=1e-3)
    f = floor_fields(ShardShape(big, 4), rates, "prefill", 2048, 1, 0, 2, median_ms=115.0)
    # a prefill's compute floor is at the rate the device sustains (a timed loop runs over a second)
    assert f["floor_bound"] == "compute" and f["floor_ms"] == pytest.approx(f["floor_flops"] / 650e9, rel=1e-5)
    assert f["floor_flop_burst_ms"] == pytest.approx(f["floor_flops"] / 800e9, rel=1e-5)


def test_hf_compile_model_has_the_shard_shape():
    """transformers' model of rank 0's shard holds exactly the weights the floor counts (+ its embedding),
    as many as our own sharded model."""
    import torch

    from overlap.context import TPContext
    from overlap.floors import ShardShape
    from overlap.hf_compile import build
    from overlap.model import ModelArgs
    from overlap.tp import build_sharded

    args = ModelArgs(vocab_size=512, dim=64, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=172)
    for tp in (2, 8):
        hf = build(args, tp, torch.device("cpu"), torch.float32)
        ours = build_sharded(args, TPContext(rank=0, world_size=tp, device=torch.device("cpu")), torch.float32)
        n_hf = sum(p.numel() for p in hf.parameters())
        n_ours = sum(p.numel() for p in ours.parameters())
        assert n_hf == n_ours == ShardShape(args, tp).weight_params() + args.vocab_size * args.dim
        layer = hf.model.layers[0]
        assert layer.self_attn.q_proj.weight.shape == (ShardShape(args, tp).q_heads * 8, 64)
        assert layer.mlp.gate_proj.weight.shape == (ShardShape(args, tp).ffn, 64)


def test_table_states_floor_fraction_and_the_hf_compile_ratio():
    def rec(variant, median, **kw):
        return _rec(variant, median, virtual_tp=True, floor_ms=8.0, floor_bound="memory", **kw)

    text = tables([rec("nocomm", 10.0), rec("hf_compile", 18.0), rec("nocomm", 11.0, batch=16)])
    assert "| R | interconnect | size | nocomm | hf_compile | SPD100 saves | comm share | floor | nocomm of floor " \
           "| hf_compile of floor | hf_compile / nocomm |" in text
    assert "| 10.00 (9.90-10.10) | 18.00 (17.90-18.10) | - | - | 8.00 m | 80% | 44% | 1.80x |" in text
    assert "| batch 16, ctx 2048 | 11.00 (10.90-11.10) | - | - | - | 8.00 m | 73% | - | - |" in text
    assert "Floor: the larger of bytes / measured copy bandwidth" in text
    old = tables([_rec("base", 14.0)])  # records without floors: the old columns only
    assert "floor" not in old.split("\n")[2]


def _cpu_recorder(tmp_path, iters: int):
    """spd-bench's Recorder of a tiny model's job on the CPU (rank 0 of 1), writing tmp_path/r.jsonl."""
    from types import SimpleNamespace

    import torch

    from overlap.bench import Recorder

    model = dict(name="tiny", hidden_size=64, intermediate_size=172, num_layers=4, num_heads=8, num_kv_heads=4,
                 vocab_size=512, dtype="float32")
    job = dict(model=model, bench=dict(warmup=1, iters=iters, variants=["nocomm"]), interconnect="nvlink",
               out=str(tmp_path / "r.jsonl"))
    return Recorder(job, SimpleNamespace(is_main=True, world_size=1, device=torch.device("cpu")))


def test_a_record_states_the_hosts_launch_time_and_warns_where_it_nears_the_measured_time(tmp_path, capsys):
    """host_ms (one iteration launched with the device idle) and host_frac go into the record; at 90% of the
    median or more the run says the time may be the host's; CPU timings carry neither."""
    import torch

    from overlap.floors import Timed, host_launch_ms

    record = _cpu_recorder(tmp_path, iters=3)
    size = dict(phase="prefill", tokens=32, batch=1, context=0, variant="nocomm")
    record(Timed([10.0, 10.0, 10.0], host_ms=2.5), **size)
    record(Timed([10.0, 10.0, 10.0], host_ms=9.5), **size)
    record([10.0, 10.0, 10.0], **size)  # a plain list (CPU): no host fields
    recs = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r.get("host_ms"), r.get("host_frac")) for r in recs] == [(2.5, 0.25), (9.5, 0.95), (None, None)]
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "9.500 ms, 95%" in warnings[0] and "host" in warnings[0]
    assert host_launch_ms(lambda: None, torch.device("cpu")) is None  # on a CPU the host is the device
    assert Timed([1.0, 2.0]) == [1.0, 2.0] and Timed([1.0]).host_ms is None


def test_an_unsteady_record_is_flagged_where_it_is_made_and_where_it_is_tabled(tmp_path, capsys):
    """Timed runs whose p20-p80 spread is 20% of the median or more (R = 8's eager prefill 2048 measured
    105.87 ms, p20 87.52, p80 114.06, on 033a7ad) make spd-bench warn and the table mark the cell "u"; a 19%
    spread or a steady one does neither."""
    record = _cpu_recorder(tmp_path, iters=5)
    size = dict(phase="prefill", tokens=32, batch=1, context=0, variant="nocomm")
    record([87.0, 87.6, 105.9, 114.0, 114.1], **size)  # p20 87.48, median 105.9, p80 114.02: 25%
    record([10.0, 10.0, 10.0, 10.0, 10.0], **size)
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "p20 87.480 ms, p80 114.020, a spread of 25%" in warnings[0]
    recs = [_rec("nocomm", 105.87, phase="prefill", tokens=2048, context=0, p20_ms=87.52, p80_ms=114.06),
            _rec("nocomm", 62.4, phase="prefill", tokens=8192, context=0, p20_ms=56.0, p80_ms=67.8),  # 18.9%
            _rec("base", 70.0, phase="prefill", tokens=8192, context=0)]
    text = tables(recs)
    assert "105.87 (87.52-114.06) u |" in text and "62.40 (56.00-67.80) |" in text
    assert "u: unsteady, the 20th-80th percentile spread is at least 20%" in text
    assert "u: unsteady" not in tables(recs[1:])


def test_table_marks_the_cells_whose_time_may_be_the_hosts():
    """A record with host_frac >= 0.9 shows "h" and the table says what it means; below, or without the field
    (older records, CPU runs), nothing."""
    recs = [_rec("base", 136.1, phase="prefill", tokens=2048, context=0, host_ms=130.0, host_frac=0.955),
            _rec("nocomm", 62.1, phase="prefill", tokens=8192, context=0, host_ms=40.0, host_frac=0.644),
            _rec("spd100", 60.0, phase="prefill", tokens=2048, context=0)]
    text = tables(recs)
    assert "136.10 (136.00-136.20) h |" in text and "62.10 (62.00-62.20) |" in text
    assert "60.00 (59.90-60.10) |" in text and "h: launching one iteration took the host at least 90%" in text
    assert "h: launching" not in tables(recs[1:])
