"""lm-eval through the tensor-parallel runtime: every rank scores the same requests in lock-step.

    logits(input_ids (B, S)) = Runtime.prefill(input_ids[b:b+Bmax], start=0) per slice of max_batch rows
                               -> (B, S, V), replicated on every rank (the lm_head is replicated)

RuntimeLogits is that function as an object; spd.lm_eval_model.SPDLM wraps it. Under torchrun every
rank runs this module with the same arguments and makes the same calls:

    torchrun --standalone --nproc-per-node R -m overlap.serve --model DIR_OR_NAME [--plan plan.json] \
        --tasks spd_arc_easy,spd_tinystories_cloze --limit 100 --batch-size 8 --out runs/eval-tp2
    torchrun --standalone --nproc-per-node R -m overlap.serve --job job.json   # the same keys, from a
                                                                              # launcher (model: a ModelConfig)

Why the ranks stay in lock-step: SPDLM reports rank 0 / world size 1 to lm-eval (it never sets
_rank/_world_size), so lm-eval 0.4.13 does not shard requests by rank and all ranks receive all of
them; SPDLM sorts them deterministically and batches them at a fixed batch size, so forward shapes
depend only on the requests. Each forward first all-reduces its (call number, B, S) and raises on every
rank if they differ (a desynchronised rank would otherwise hang in, or corrupt, the sync points).
Only rank 0 writes (config.yaml, meta.json, plan.json, results.json, summary.json); lm-eval itself
returns results only where LOCAL_RANK is 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from overlap.context import DEFAULT_TIMEOUT_S, TPContext, init_tp, shutdown
from overlap.model import Transformer
from overlap.runtime import Runtime
from spd.errors import SPDError


class LockstepError(SPDError):
    """Ranks made different forward calls (a rank-dependent batch size, request order or length)."""


class RuntimeLogits:
    """Full-sequence logits through a Runtime: a fresh prefill at position 0 for each slice of rows.

    Exposes what SPDLM reads: logits(input_ids), device, and config (for max_position_embeddings).
    """

    def __init__(self, runtime: Runtime, config=None, check_lockstep: bool = True):
        self.runtime, self.ctx, self.config = runtime, runtime.ctx, config
        self.check_lockstep = check_lockstep and runtime.ctx.distributed
        self.calls = 0

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def _lockstep(self, batch: int, seq: int) -> None:
        """Raise LockstepError on every rank unless all ranks make this call with the same shape."""
        mine = torch.tensor([self.calls, batch, seq], dtype=torch.long, device=self.device)  # (3,)
        both = torch.cat([mine, -mine])  # max of both halves gives (max, -min) in one all-reduce
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.ctx.group)  # (6,)
        hi, lo = both[:3].tolist(), (-both[3:]).tolist()
        if hi != lo:
            raise LockstepError(
                f"rank {self.ctx.rank}: forward call {self.calls} has (call, batch, seq) = {mine.tolist()}, "
                f"but across the {self.ctx.world_size} ranks they range from {lo} to {hi}; every rank must "
                "make identical calls in the same order (same requests, a fixed integer batch size)")

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, S) -> logits (B, S, V); S <= the runtime's max_seq, any B (sliced by max_batch)."""
        B, S = input_ids.shape
        if self.check_lockstep:
            self._lockstep(B, S)
        self.calls += 1
        rt = self.runtime
        if S > rt.max_seq:
            raise ValueError(f"a sequence of {S} tokens exceeds the runtime's max_seq {rt.max_seq}; "
                             f"score with max_length <= {rt.max_seq} or build the runtime larger")
        out = []
        for b in range(0, B, rt.max_batch):
            rt.reset()
            out.append(rt.prefill(input_ids[b : b + rt.max_batch].to(self.device)))  # (Bmax, S, V)
        return out[0] if len(out) == 1 else torch.cat(out)  # (B, S, V)


def max_positions(model: Transformer) -> int | None:
    return getattr(getattr(model, "source_config", None), "max_position_embeddings", None)


def runtime_lm(model: Transformer, ctx: TPContext, tokenizer, batch_size: int, max_length: int,
               check_lockstep: bool = True):
    """An SPDLM over a Runtime of model sized for batch_size x max_length (capped at the model's positions)."""
    from spd.lm_eval_model import SPDLM

    cap = max_positions(model)
    length = min(max_length, cap) if cap else max_length
    rt = Runtime(model, ctx, max_batch=batch_size, max_seq=length, cuda_graphs=False)  # prefill only
    scorer = RuntimeLogits(rt, config=getattr(model, "source_config", None), check_lockstep=check_lockstep)
    lm = SPDLM(scorer, tokenizer, batch_size=batch_size, max_length=length)
    if (lm.rank, lm.world_size) != (0, 1):  # lm-eval would give each rank a different share of the requests
        raise LockstepError(f"SPDLM reports rank {lm.rank} of {lm.world_size} to lm-eval; with tensor "
                            "parallelism it must report rank 0 of 1 on every rank, so all get every request")
    return lm


JOB_KEYS = ("model", "plan", "tasks", "limit", "num_fewshot", "batch_size", "max_length", "bootstrap_iters",
            "dtype", "backend", "timeout", "out")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, or --job job.json holding the same keys (model may be a ModelConfig dict; tasks a list)."""
    p = argparse.ArgumentParser(prog="python -m overlap.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--job", help="a JSON file with any of the keys below (flags given as well override it)")
    p.add_argument("--model", help="an spd-export or HF directory, or a conf/model name (e.g. stories260k)")
    p.add_argument("--plan", help="plan.json (default: an export's own plan; other checkpoints: dense)")
    p.add_argument("--tasks", help="comma-separated lm-eval task names (spd/tasks first)")
    p.add_argument("--limit", type=float, help="documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--bootstrap-iters", type=int, default=1000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"])
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="process-group timeout, s")
    p.add_argument("--out", help="the run directory rank 0 writes")
    args = p.parse_args(argv)
    if args.job:
        job = json.loads(Path(args.job).read_text())
        if unknown := sorted(set(job) - set(JOB_KEYS)):
            p.error(f"{args.job} has unknown keys {unknown}; valid: {', '.join(JOB_KEYS)}")
        if isinstance(job.get("tasks"), list):
            job["tasks"] = ",".join(job["tasks"])
        p.set_defaults(**job)
        args = p.parse_args(argv)
    if missing := [k for k in ("model", "tasks", "out") if not getattr(args, k)]:
        p.error(f"give --{', --'.join(missing)} (or put them in --job)")
    return args


def model_source(model):
    """A ModelConfig dict as a ModelConfig, an existing directory as itself, else conf/model/<model>.yaml."""
    from spd.config import ModelConfig

    if isinstance(model, dict):
        return ModelConfig(**model)
    if Path(model).expanduser().is_dir():
        return Path(model).expanduser()
    from spd.load import model_config_by_name

    return model_config_by_name(model)


def serve(args: argparse.Namespace, ctx: TPContext) -> dict | None:
    """Load, shard, evaluate on this rank; rank 0 writes args.out. Returns lm-eval's results (or None)."""
    from spd.config import EvalConfig
    from spd.evaluate import evaluate
    from spd.plan import SPDPlan
    from spd.run import start_run

    from overlap.checkpoint import load_runtime_model

    source = model_source(args.model)
    plan = SPDPlan.load(args.plan) if args.plan else None
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    cfg = EvalConfig(tasks=[t for t in args.tasks.split(",") if t], limit=limit, batch_size=args.batch_size,
                     num_fewshot=args.num_fewshot, max_length=args.max_length, bootstrap_iters=args.bootstrap_iters)
    model, tokenizer, plan = load_runtime_model(source, ctx, args.dtype, plan)
    if tokenizer is None:
        raise SPDError(f"{source} has no tokenizer; lm-eval needs one (use a checkpoint with tokenizer files)")
    lm = runtime_lm(model, ctx, tokenizer, cfg.batch_size, cfg.max_length)
    out = Path(args.out)
    if ctx.is_main:
        source_cfg = dataclasses.asdict(source) if dataclasses.is_dataclass(source) else {"path": str(source)}
        start_run(out, {"model": source_cfg, "plan": args.plan, "eval": dataclasses.asdict(cfg),
                        "parallel": {"tp": ctx.world_size, "backend": ctx.backend}, "dtype": args.dtype},
                  stage="eval", tp=ctx.world_size, runtime="overlap")
        if plan is not None:
            plan.save(out / "plan.json")
    results = evaluate(lm, tokenizer, cfg, out, is_writer=ctx.is_main)
    ctx.barrier()  # no rank leaves (and tears the group down) while another still scores
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = init_tp(args.backend, args.timeout)
    try:
        results = serve(args, ctx)
        what = f"wrote {args.out}" if ctx.is_main else "wrote nothing"
        got = "a results dict" if results is not None else "no results dict"
        print(f"[spd-serve] rank {ctx.rank}/{ctx.world_size}: {what}; lm-eval returned {got}", flush=True)
    finally:
        shutdown(ctx)


if __name__ == "__main__":
    main(sys.argv[1:])
