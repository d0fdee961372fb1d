"""Calibration windows: num_samples random windows of seq_len tokens from a JSON-lines text file.

As in GPTQ and the SPD paper (128 x 2048 tokens of WikiText-2 train): the documents are joined with blank
lines, tokenised once without special tokens, and windows start at seeded random offsets. WikiText-2 train
is not available offline, so the default source is SimpleBooks-92 valid, which no evaluation task reads.
"""

from __future__ import annotations

import json
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


def calibration_tokens(tokenizer, cfg: CalibConfig) -> torch.Tensor:
    """(num_samples, seq_len) token ids of seeded random windows of the calibration text."""
    stream = tokenizer("\n\n".join(read_texts(cfg.data, cfg.field)), add_special_tokens=False,
                       return_tensors="pt").input_ids[0]
    if len(stream) <= cfg.seq_len:
        raise SPDError(f"{cfg.data} has {len(stream)} tokens, fewer than calib.seq_len={cfg.seq_len}")
    g = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, len(stream) - cfg.seq_len, (cfg.num_samples,), generator=g)
    return torch.stack([stream[s:s + cfg.seq_len] for s in starts.tolist()])  # (N, L)
