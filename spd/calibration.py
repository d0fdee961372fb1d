"""Calibration windows: num_samples random windows of seq_len tokens from a JSON-lines text file.

As in GPTQ and the SPD paper (128 x 2048 tokens of WikiText-2 train): the documents are joined with blank
lines, tokenised once without special tokens, and windows start at seeded random offsets. WikiText-2 train
is not available offline, so the default source is SimpleBooks-92 valid, which no evaluation task reads.

Size by device (`calib=auto`, the default): a null num_samples or seq_len is filled when the run starts,
before any setting is hashed or config.yaml is written, from AUTO_SIZES by the device the model runs on
(model.device; `auto` is CUDA when available): CUDA gets the paper's 128 x 2048, a CPU 16 x 512. So the
resolved numbers are what every artifact records and keys on, and a CPU and a GPU run never share one.
When the windows hold more token positions than the text has tokens (SimpleBooks-92 valid is about
241,000 SmolLM2 tokens, 128 x 2048 = 262,144), random windows overlap: the log and the recorded
calibration spec (window_coverage) say how many distinct text tokens they cover.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from spd.config import CalibConfig, assets_dir
from spd.errors import SPDError


def data_path(name: str) -> Path:
    """A data file: absolute, relative to the working directory, or in the assets' data/ folder."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    q = assets_dir() / "data" / name
    if q.is_file():
        return q
    raise SPDError(f"data file {name!r} not found (looked in the working directory and {q.parent})")


def read_texts(path: str | Path, field: str = "text") -> list[str]:
    texts = []
    with open(data_path(str(path))) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if field not in row:
                    raise SPDError(f"{path} line {n} has no field {field!r} (fields: {', '.join(row)})")
                texts.append(row[field])
    return texts


AUTO_SIZES = {"cuda": (128, 2048), "cpu": (16, 512)}  # (num_samples, seq_len) for calib=auto, by device


def auto_device(device: str) -> str:
    """The AUTO_SIZES row for a model.device setting: cuda for a CUDA device (auto: when one is available)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if str(device).startswith("cuda") else "cpu"


def resolve_calib(cfg: CalibConfig, device: str) -> CalibConfig:
    """cfg with a null num_samples / seq_len filled from AUTO_SIZES for the model.device setting."""
    if cfg.num_samples is not None and cfg.seq_len is not None:
        return cfg
    kind = auto_device(device)
    n, length = AUTO_SIZES[kind]
    out = replace(cfg, num_samples=n if cfg.num_samples is None else cfg.num_samples,
                  seq_len=length if cfg.seq_len is None else cfg.seq_len)
    print(f"calib=auto on {kind}: {out.num_samples} windows x {out.seq_len} tokens of {cfg.data}")
    return out


def resolve_auto_(cfg):
    """Fill calib=auto's sizes of a RunApp in place (idempotent); returns cfg."""
    if getattr(cfg, "calib", None) is not None:
        cfg.calib = resolve_calib(cfg.calib, cfg.model.device)
    return cfg


def window_coverage(text_tokens: int, starts: list[int], seq_len: int) -> dict:
    """How many distinct text tokens the windows [s, s + seq_len) cover, and a plain note when they overlap."""
    covered = torch.zeros(text_tokens, dtype=torch.bool)
    for s in starts:
        covered[s:s + seq_len] = True
    out = {"text_tokens": text_tokens, "positions": len(starts) * seq_len, "distinct": int(covered.sum())}
    if out["positions"] > text_tokens:
        out["note"] = (f"{len(starts)} x {seq_len} = {out['positions']:,} window positions from a text of "
                       f"{text_tokens:,} tokens: windows overlap and cover {out['distinct']:,} distinct tokens "
                       f"({out['distinct'] / text_tokens:.0%} of the text)")
    return out


def calibration_windows(tokenizer, cfg: CalibConfig) -> tuple[torch.Tensor, dict]:
    """((num_samples, seq_len) token ids of seeded random windows of the calibration text, window_coverage)."""
    if cfg.num_samples is None or cfg.seq_len is None:
        raise SPDError("calib.num_samples / calib.seq_len are null (calib=auto) and were not resolved: call "
                       "spd.calibration.resolve_auto_(cfg) first, or set both")
    stream = tokenizer("\n\n".join(read_texts(cfg.data, cfg.field)), add_special_tokens=False,
                       return_tensors="pt").input_ids[0]
    if len(stream) <= cfg.seq_len:
        raise SPDError(f"{cfg.data} has {len(stream)} tokens, fewer than calib.seq_len={cfg.seq_len}")
    g = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, len(stream) - cfg.seq_len, (cfg.num_samples,), generator=g).tolist()
    coverage = window_coverage(len(stream), starts, cfg.seq_len)
    if "note" in coverage:
        print(f"calibration: {coverage['note']}")
    return torch.stack([stream[s:s + cfg.seq_len] for s in starts]), coverage  # (N, L)


def calibration_tokens(tokenizer, cfg: CalibConfig) -> torch.Tensor:
    """(num_samples, seq_len) token ids of seeded random windows of the calibration text."""
    return calibration_windows(tokenizer, cfg)[0]
