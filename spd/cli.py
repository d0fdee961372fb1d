"""Console entry points: thin Hydra wrappers around library functions that take dataclasses."""

from __future__ import annotations

import functools
import sys

import hydra
from hydra.core.hydra_config import HydraConfig

from spd.config import CONF_DIR, InfoApp, RunApp, as_dataclass, check_overrides
from spd.errors import SPDError


def hydra_app(config_name: str):
    """Turn fn(cfg_dataclass) into a console entry point composing conf/<config_name>.yaml.

    Errors a user can cause (SPDError) print one clear line and exit with status 2, without a traceback.
    A command's run directory is Hydra's output directory, so hydra.run.dir / hydra.sweep.dir place it.
    """

    def deco(fn):
        @functools.wraps(fn)
        def main():
            try:
                check_overrides(sys.argv[1:], InfoApp if config_name == "info" else RunApp)
            except SPDError as e:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)

            @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
            def run(cfg):
                try:
                    from spd.calibration import resolve_auto_

                    cfg = resolve_auto_(as_dataclass(cfg))  # calib=auto's sizes, before anything is written
                    if hasattr(cfg, "run_dir"):  # outputs go to Hydra's output directory (hydra.run.dir, sweeps)
                        cfg.run_dir = HydraConfig.get().runtime.output_dir
                    return fn(cfg)
                except SPDError as e:
                    print(f"error: {e}", file=sys.stderr)
                    sys.exit(2)

            run()

        return main

    return deco


@hydra_app("info")
def info(cfg) -> None:
    """spd-info: architecture, valid tensor-parallel degrees and a short greedy continuation."""
    from spd.info import describe, check_tp, greedy_text
    from spd.load import load_config, load_model

    config = load_config(cfg.model)
    check_tp(config, cfg.parallel.tp)  # before the (slow) weight load
    if cfg.model.source == "random":
        print(describe(config))
        print("random weights: no tokenizer, no continuation")
        return
    model, tokenizer = load_model(cfg.model)
    print(describe(model.config, model))
    print(f"greedy continuation of {cfg.prompt!r}:")
    print(greedy_text(model, tokenizer, cfg.prompt, cfg.max_new_tokens))


@hydra_app("rank")
def rank(cfg) -> None:
    """spd-rank: block sensitivity ranking, plot and SPD plan."""
    from spd.sensitivity import run_rank

    run_rank(cfg)


@hydra_app("ppl")
def perplexity(cfg) -> None:
    """spd-ppl: rolling perplexity (WikiText-2 test by default), optionally with an SPD plan."""
    from spd.perplexity import run_perplexity

    run_perplexity(cfg)


@hydra_app("distill")
def distill(cfg) -> None:
    """spd-distill: head grouping on ESB blocks, then B2B on SB and ESB blocks of spd.plan; writes the model."""
    from spd.distill import distill_main

    distill_main(cfg)


@hydra_app("export")
def export(cfg) -> None:
    """spd-export: the model with spd.plan applied, as a directory stock transformers loads."""
    from spd.export import export_main

    export_main(cfg)


@hydra_app("eval")
def evaluate(cfg) -> None:
    """spd-eval: lm-eval tasks in-process on the model (with spd.plan applied, if any)."""
    from spd.evaluate import main as eval_main

    eval_main(cfg)


@hydra_app("study")
def study(cfg) -> None:
    """spd-study: the main job (rank, plan, distill, evaluate, export); -m sweeps fraction x strategy."""
    from spd.study import run_study, study_table

    summary = run_study(cfg)
    print(study_table(summary))
    print(f"-> {cfg.run_dir}/study.json")


@hydra_app("plan")
def plan(cfg) -> None:
    """spd-plan: latency-aware planner within a perplexity budget, compared with the threshold rule."""
    from spd.planner import run_planner

    run_planner(cfg)


@hydra_app("report")
def report(cfg) -> None:
    """spd-report: tables and plots from run artifacts only (study jobs, rankings, bench records)."""
    from spd.report import run_report

    run_report(cfg)


def lm_eval() -> None:
    """spd-lm-eval: lm-eval's own command line with `--model spd` registered; --include_path defaults to spd/tasks."""
    from lm_eval.__main__ import cli_evaluate

    import spd.lm_eval_model  # noqa: F401  (registers the model `spd`)
    from spd.tasks import TASKS_DIR

    if len(sys.argv) > 2 and not any(a.startswith("--include_path") for a in sys.argv):
        sys.argv += ["--include_path", str(TASKS_DIR)]
    cli_evaluate()


def main() -> None:
    """`python -m spd.cli APP [overrides]`: the console scripts without installing (e.g. on a GPU box)."""
    apps = {name: obj for name, obj in globals().items() if callable(obj) and getattr(obj, "__wrapped__", None)}
    if len(sys.argv) < 2 or sys.argv[1] not in apps:
        sys.exit(f"usage: python -m spd.cli {{{','.join(sorted(apps))}}} [key=value ...]")
    app = apps[sys.argv.pop(1)]
    sys.argv[0] = f"spd-{app.__name__}"
    app()


if __name__ == "__main__":
    main()
