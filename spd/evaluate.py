"""Evaluation stage: lm-eval's simple_evaluate, in-process, on an SPDLM; results go into the run directory.

Files written (by the writer only, atomically) beside the run's config.yaml and meta.json:
  results.json  lm-eval's results dict as it returns it (no per-sample logs)
  summary.json  {"schema": "spd.eval/1", "tasks": {task: {metric: {"value": v, "stderr": s}}}, ...}
Tasks are looked up in cfg.include_path (default: spd/tasks, the offline suite); names found there run
offline. Other names (lm-eval's standard hellaswag, piqa, ...) make the TaskManager index lm-eval's
built-in tasks as well, and are then read from the Hugging Face hub as lm-eval does.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable, make_table

from spd.config import EvalConfig, RunApp
from spd.errors import SPDError
from spd.lm_eval_model import SPDLM
from spd.run import start_run, write_json_atomic
from spd.tasks import TASKS_DIR
from spd.tasks.offline import DATA_DIR_KEY

SCHEMA = "spd.eval/1"
OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
# Bootstrap draws for the stderr of perplexity-type aggregates (lambada, cloze); mean metrics use the
# closed form. lm-eval's default of 100000 takes minutes per task on a few cores; 1000 draws estimate
# the stderr to a few percent. An EvalConfig.bootstrap_iters field, when present, overrides this.
BOOTSTRAP_ITERS = 1000


def task_manager(cfg: EvalConfig) -> tuple[TaskManager, bool]:
    """lm-eval's TaskManager for cfg.tasks and whether all of them come from the include path (offline).

    lm-eval's built-in tasks (about 15 s to index) are added only when some name is not found there.
    """
    include = str(Path(cfg.include_path).expanduser()) if cfg.include_path else str(TASKS_DIR)
    metadata = {DATA_DIR_KEY: str(Path(cfg.data_dir).expanduser())} if cfg.data_dir else None
    local = TaskManager(include_path=include, include_defaults=False, metadata=metadata)
    if all(name in local.all_tasks for name in cfg.tasks):
        return local, True
    full = TaskManager(include_path=include, include_defaults=True, metadata=metadata)
    unknown = [name for name in cfg.tasks if name not in full.all_tasks]
    if unknown:
        raise SPDError(
            f"unknown task(s) {', '.join(unknown)}; offline tasks in {include}: {', '.join(local.all_tasks)} "
            "(or any lm-eval task name when the hub is reachable)"
        )
    return full, False


def make_lm(lm_or_model: Any, tokenizer: Any, cfg: EvalConfig) -> LM:
    """An SPDLM with cfg's batch size and context length (an SPDLM given is updated, another LM kept)."""
    if isinstance(lm_or_model, SPDLM):
        lm_or_model.batch_size = cfg.batch_size  # simple_evaluate ignores its own batch_size for LM objects
        lm_or_model.max_length = cfg.max_length
        return lm_or_model
    if isinstance(lm_or_model, LM):
        return lm_or_model
    return SPDLM(lm_or_model, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length)


def summarize(results: dict) -> dict:
    """task -> metric -> {"value", "stderr"} from lm-eval's results (filter names dropped: all are "none")."""
    tasks: dict[str, dict[str, dict[str, float | None]]] = {}
    for task, row in results.get("results", {}).items():
        metrics: dict[str, dict[str, float | None]] = {}
        for key, value in row.items():
            name, _, _filter = key.partition(",")
            if not _filter or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = row.get(f"{name}_stderr,{_filter}")
            metrics[name] = {
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            }
        tasks[task] = metrics
    return {
        "schema": SCHEMA,
        "tasks": tasks,
        "n_samples": {t: n.get("effective") for t, n in results.get("n-samples", {}).items()},
        "versions": results.get("versions", {}),
        "limit": results.get("config", {}).get("limit"),
        "groups": sorted(results.get("groups", {})),
    }


def evaluate(
    lm_or_model: Any, tokenizer: Any, cfg: EvalConfig, run_dir: Path, *, is_writer: bool = True
) -> dict | None:
    """Run cfg.tasks through lm-eval on a model (or LM) and write results.json and summary.json.

    lm_or_model: an SPDLM, any lm-eval LM, or a model mapping input_ids (B, S) to logits (B, S, V)
    (see spd.lm_eval_model). Every tensor-parallel rank calls this with the same arguments; only the one
    with is_writer=True writes. Returns lm-eval's results dict, or None where lm-eval returns none
    (processes with LOCAL_RANK != 0).
    """
    tm, offline = task_manager(cfg)
    if offline:
        for var in OFFLINE_ENV:
            os.environ.setdefault(var, "1")
    lm = make_lm(lm_or_model, tokenizer, cfg)
    if isinstance(lm, SPDLM):
        lm.progress = is_writer  # one progress bar per evaluation, not one per rank
    t0 = time.perf_counter()
    results = simple_evaluate(
        model=lm,
        tasks=list(cfg.tasks),
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        task_manager=tm,
        log_samples=False,
        bootstrap_iters=getattr(cfg, "bootstrap_iters", BOOTSTRAP_ITERS),
    )
    if results is None:
        return None
    results = json.loads(json.dumps(results, default=handle_non_serializable))  # plain JSON types
    if is_writer:
        run_dir = Path(run_dir)
        write_json_atomic(run_dir / "results.json", results)
        write_json_atomic(run_dir / "summary.json", {**summarize(results), "cost": eval_cost(lm, time.perf_counter() - t0)})
        print(make_table(results))
    return results


def eval_cost(lm, seconds: float) -> dict:
    """Seconds, tokens forwarded (padding included), tokens/s and TFLOP/s of an evaluation (SPDLM over a
    transformers model; seconds only otherwise)."""
    from spd.cost import model_flops_per_token, throughput

    fwd, config = getattr(lm, "forwarded", None), getattr(getattr(lm, "model", None), "config", None)
    if not fwd or not fwd["rows"] or config is None:
        return {"seconds": seconds}
    tokens = fwd["tokens"]
    return {**throughput(tokens, tokens * model_flops_per_token(config, tokens // fwd["rows"]), seconds),
            "tokens": tokens}


def main(
    cfg: RunApp, prepare: Callable[[Any, RunApp], Any] | None = None, is_writer: bool = True
) -> dict | None:
    """spd-eval: load cfg.model, put cfg.spd.plan on it (spd.surgery.apply_plan_), evaluate into cfg.run_dir.

    prepare(model, cfg), when given, returns what is evaluated instead: the model changed in place, or a
    tensor-parallel runtime with a logits(input_ids) method; it is given the model with the plan's
    weights (head permutations, distilled blocks) and emulated SPD blocks already in place.
    """
    from spd.load import load_model
    from spd.plan import SPDPlan
    from spd.surgery import apply_plan_

    run_dir = Path(cfg.run_dir)
    if is_writer:
        start_run(run_dir, cfg, stage="eval", tp=cfg.parallel.tp)
    model, tokenizer = load_model(cfg.model)
    if cfg.spd.plan:
        apply_plan_(model, SPDPlan.load(cfg.spd.plan))
    if prepare is not None:
        model = prepare(model, cfg)
    return evaluate(model, tokenizer, cfg.eval, run_dir, is_writer=is_writer)
