"""Console entry points: thin Hydra wrappers around library functions that take dataclasses."""

from __future__ import annotations

import functools
import sys

import hydra

from spd.config import CONF_DIR, as_dataclass
from spd.errors import SPDError


def hydra_app(config_name: str):
    """Turn fn(cfg_dataclass) into a console entry point composing conf/<config_name>.yaml.

    Errors a user can cause (SPDError) print one clear line and exit with status 2, without a traceback.
    """

    def deco(fn):
        @functools.wraps(fn)
        def main():
            @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
            def run(cfg):
                try:
                    return fn(as_dataclass(cfg))
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
