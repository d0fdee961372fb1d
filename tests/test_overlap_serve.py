"""overlap.serve: lm-eval through the TP runtime under torchrun equals the single-process SPD emulation.

Two parts. (1) RuntimeLogits on 2 spawned gloo ranks: full-sequence logits equal the emulation (batch
larger than the runtime's max_batch included), and a rank-dependent call shape raises LockstepError on
both ranks instead of hanging. (2) The real entry: `torchrun --nproc-per-node 2 -m overlap.serve` on
stories260K with an SPD plan, two offline tasks, limit 10: rank 0 alone writes the run directory, rank
1 gets no results from lm-eval, and the metrics equal spd.evaluate.evaluate on apply_plan_(model, plan).
"""

import copy
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from overlap.launch import spawn_ranks
from overlap.model import Transformer
from overlap.runtime import Runtime
from overlap.serve import LockstepError, RuntimeLogits, model_source, parse_args
from overlap.tp import shard_
from spd.plan import SPDPlan
from spd.run import PROJECT_ROOT

TP_FP32_ATOL = 1e-4  # fp32; gloo sums the R partials in another order than the emulation's stack().sum(0)
METRIC_RTOL = 1e-4  # perplexity = exp(-mean log-likelihood); each log-likelihood agrees to about 1e-5
RANKS_TIMEOUT_S = 120  # the spawned group, imports included (2 ranks share 2 CPU cores)
TORCHRUN_TIMEOUT_S = 150  # the whole torchrun job: imports, loading, lm-eval, two tasks of 10 documents
TASKS = ["spd_tinystories_cloze", "spd_arc_easy"]
PLAN = SPDPlan(tp=2, num_layers=5, tiers={1: "ISB", 3: "ISB", 4: "ISB"}, model="stories260k")


def logits_worker(ctx, full: Transformer, plan: SPDPlan, ids: torch.Tensor):
    model = shard_(full, ctx, plan)
    scorer = RuntimeLogits(Runtime(model, ctx, max_batch=2, max_seq=ids.shape[1]))
    out = {"logits": scorer.logits(ids)}  # B = 3 > max_batch: two prefills
    try:
        scorer.logits(ids[:, : ids.shape[1] - ctx.rank])  # rank 1 one token shorter
    except LockstepError as e:
        out["error"] = str(e)
    out["after"] = scorer.logits(ids[:2])  # the group is still usable
    return out


def test_runtime_logits_equal_emulation_and_lockstep_is_checked(tmp_path, stories260k):
    from spd.surgery import apply_plan_

    hf = stories260k[0]
    ids = torch.randint(3, 512, (3, 20), generator=torch.Generator().manual_seed(0))
    results = spawn_ranks(logits_worker, 2, tmp_path, args=(Transformer.from_hf(hf), PLAN, ids),
                          timeout_s=RANKS_TIMEOUT_S)
    with torch.no_grad():
        ref = apply_plan_(copy.deepcopy(hf), PLAN)(ids).logits
        assert (ref - hf(ids).logits).abs().max() > 100 * TP_FP32_ATOL  # the plan is visible in the logits
    for r, res in enumerate(results):
        assert (res["logits"] - ref).abs().max() <= TP_FP32_ATOL, f"rank {r}"
        assert (res["after"] - ref[:2]).abs().max() <= TP_FP32_ATOL, f"rank {r}"
        assert f"rank {r}: forward call 1" in res["error"] and "range from [1, 3, 19] to [1, 3, 20]" in res["error"]


def test_job_file_gives_the_arguments_and_flags_override_it(tmp_path):
    from spd.config import ModelConfig

    job = {"model": {"name": "m", "source": "llama2c", "path": "a.bin", "tokenizer": "t.bin"},
           "tasks": TASKS, "limit": 10, "out": "runs/x", "batch_size": 4}
    (tmp_path / "job.json").write_text(json.dumps(job))
    args = parse_args(["--job", str(tmp_path / "job.json"), "--batch-size", "2"])
    assert (args.tasks, args.limit, args.out) == (",".join(TASKS), 10, "runs/x")
    assert (args.batch_size, args.max_length) == (2, 2048)  # the flag wins; unset keys keep their defaults
    assert model_source(args.model) == ModelConfig(name="m", source="llama2c", path="a.bin", tokenizer="t.bin")
    assert model_source(str(tmp_path)) == tmp_path
    (tmp_path / "bad.json").write_text(json.dumps({"modle": "x"}))
    with pytest.raises(SystemExit):
        parse_args(["--job", str(tmp_path / "bad.json")])
    with pytest.raises(SystemExit):
        parse_args(["--model", "stories260k"])  # no --tasks, no --out


def run_torchrun(args: list[str], env: dict, timeout_s: float) -> subprocess.CompletedProcess:
    """torchrun in its own session, so a hang kills the launcher and every rank it started."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout_s} s (a hang?); output:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


@pytest.fixture(scope="module")
def torchrun_eval(tmp_path_factory, assets_dir, stories260k):
    """(the torchrun job's output and run directory, the single-process emulation's summary)."""
    from spd.config import EvalConfig
    from spd.evaluate import evaluate
    from spd.surgery import apply_plan_

    tmp = tmp_path_factory.mktemp("serve")
    plan_file = PLAN.save(tmp / "plan.json")
    env = {**os.environ, "SPD_ASSETS": str(assets_dir), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)}
    done = run_torchrun(["-m", "overlap.serve", "--model", "stories260k", "--plan", str(plan_file),
                         "--tasks", ",".join(TASKS), "--limit", "10", "--batch-size", "4", "--max-length", "512",
                         "--backend", "gloo", "--timeout", "60", "--out", str(tmp / "tp2")],
                        env, TORCHRUN_TIMEOUT_S)
    model, tokenizer = stories260k
    emulated = apply_plan_(copy.deepcopy(model), PLAN)
    cfg = EvalConfig(tasks=TASKS, limit=10, batch_size=4, max_length=512)
    evaluate(emulated, tokenizer, cfg, tmp / "emulated")
    evaluate(copy.deepcopy(model), tokenizer, cfg, tmp / "dense")
    read = lambda name: json.loads((tmp / name / "summary.json").read_text())  # noqa: E731
    return dict(done=done, run=tmp / "tp2", ref=read("emulated"), dense=read("dense"))


def test_torchrun_job_succeeds_and_only_rank_0_writes(torchrun_eval):
    done, run = torchrun_eval["done"], torchrun_eval["run"]
    assert done.returncode == 0, done.stdout[-6000:]
    assert "rank 0/2: wrote" in done.stdout and "lm-eval returned a results dict" in done.stdout
    assert "rank 1/2: wrote nothing; lm-eval returned no results dict" in done.stdout  # LOCAL_RANK 1
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "meta.json", "plan.json", "results.json",
                                                     "summary.json"]
    assert SPDPlan.load(run / "plan.json") == PLAN
    assert json.loads((run / "meta.json").read_text())["tp"] == 2


def test_torchrun_metrics_equal_single_process_emulation(torchrun_eval):
    got = json.loads((torchrun_eval["run"] / "summary.json").read_text())
    ref = torchrun_eval["ref"]
    assert got["n_samples"] == ref["n_samples"] == {t: 10 for t in TASKS}
    assert set(got["tasks"]) == set(TASKS)
    for task, metrics in ref["tasks"].items():
        assert set(got["tasks"][task]) == set(metrics)
        for name, m in metrics.items():
            value = got["tasks"][task][name]["value"]
            if name.startswith("acc"):
                assert value == m["value"], f"{task} {name}"
            else:
                assert value == pytest.approx(m["value"], rel=METRIC_RTOL), f"{task} {name}"


def test_the_plan_changes_the_metrics(torchrun_eval):
    """Guards the parity test against vacuity: a job that ignored the plan would score the dense model."""
    ppl = lambda s: s["tasks"]["spd_tinystories_cloze"]["perplexity"]["value"]  # noqa: E731
    assert abs(ppl(torchrun_eval["ref"]) / ppl(torchrun_eval["dense"]) - 1) > 100 * METRIC_RTOL
