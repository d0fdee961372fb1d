"""What a study needs for each model shape, by arithmetic from the shape (not a measurement).

    python scripts/study_cost.py [--models llama2_7b,llama2_13b,llama2_70b] [--calib 16x512,128x2048]

Per model: parameters; the weights in fp32 and bf16 (the emulated SPD model holds the whole model on one
device today); the teacher activations a ranking and distillation cache (every block boundary of the
calibration windows, in the model's dtype: kept in memory up to distill.spill_gb, else on disk); and the
forward work of a ranking from cached block inputs (L(L+1)/2 block forwards, spd.sensitivity), in PFLOP, and
the time that work cannot beat at a given matmul rate. Prints a Markdown table.
"""

from __future__ import annotations

import argparse

from spd.load import load_config, model_config_by_name
from spd.cost import block_flops_per_token, block_weights

GB = 1e9


def row(name: str, n: int, seq: int) -> dict:
    cfg = model_config_by_name(name)
    c = load_config(cfg)
    L, D, V = c.num_hidden_layers, c.hidden_size, c.vocab_size
    params = L * block_weights(c) + V * D * (1 if c.tie_word_embeddings else 2) + (2 * L + 1) * D
    states = (L + 1) * n * seq * D * 2  # bf16 hidden states at every block boundary
    flops = (L + L * (L + 1) / 2) * n * seq * block_flops_per_token(c, seq)  # baseline + cached-input sweep
    return {"model": name, "calib": f"{n}x{seq}", "params_b": params / 1e9, "fp32_gb": 4 * params / GB,
            "bf16_gb": 2 * params / GB, "states_gb": states / GB, "rank_pflop": flops / 1e15}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2_135m,llama2_7b,llama2_13b,llama2_70b")
    ap.add_argument("--calib", default="16x512,128x2048")
    ap.add_argument("--tflops", type=float, default=795.0,
                    help="matmul rate for the time floor (795: bf16 on one H200, measured by spd-bench's floors)")
    a = ap.parse_args()
    print("| model | calibration | parameters | weights fp32 / bf16 | cached states (bf16) | ranking work "
          f"| ranking floor at {a.tflops:.0f} TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for name in a.models.split(","):
        for spec in a.calib.split(","):
            n, seq = (int(x) for x in spec.split("x"))
            r = row(name, n, seq)
            floor = r["rank_pflop"] * 1e15 / (a.tflops * 1e12)
            print(f"| {r['model']} | {r['calib']} | {r['params_b']:.2f} B | {r['fp32_gb']:.1f} / {r['bf16_gb']:.1f} GB "
                  f"| {r['states_gb']:.1f} GB | {r['rank_pflop']:.2f} PFLOP | {floor / 60:.1f} min |")


if __name__ == "__main__":
    main()
