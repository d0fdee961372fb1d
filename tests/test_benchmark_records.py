"""The recorded benchmark results in docs/benchmarks/*.jsonl: each line a JSON object, each commit it names one of
this repository's commits (a label such as `e580945+preload=4` names the commit a variant was made from), and
each floor consistent with the record's own numbers (overlap.floors: floor = the larger of the memory and compute
floors, floor_frac = floor / median), so a hand-edited or mislabelled record fails here; and the README's one-GPU
table quotes records of the commit it names."""

from __future__ import annotations

import functools
import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "docs" / "benchmarks").glob("*.jsonl"))
LABEL = re.compile(r"([0-9a-f]{7,40})(\+\S+)?")  # a commit, optionally + what the variant changed


@functools.cache
def _records() -> list[tuple[str, int, dict]]:
    out = []
    for f in FILES:
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if line.strip():
                r = json.loads(line)
                assert isinstance(r, dict), f"{f.name}:{i} is not a JSON object"
                out.append((f.name, i, r))
    return out


def test_there_are_records():
    assert FILES and len(_records()) > 100


def test_every_commit_a_record_names_is_in_this_repository():
    if not (ROOT / ".git").exists():
        pytest.skip("no .git: a source copy without history")
    named = {}
    for name, i, r in _records():
        if "commit" in r:
            m = LABEL.fullmatch(r["commit"])
            assert m, f"{name}:{i}: commit {r['commit']!r} is neither a hash nor hash+variant"
            named.setdefault(m.group(1), f"{name}:{i}")
    missing = [f"{c} ({where})" for c, where in named.items()
               if subprocess.run(["git", "cat-file", "-e", f"{c}^{{commit}}"], cwd=ROOT,
                                 capture_output=True).returncode != 0]
    if missing and subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True,
                                  text=True).stdout.strip() == "true":
        pytest.skip("a shallow clone: older commits are not here")
    assert not missing, f"records name commits this repository does not have: {missing}"


def test_every_floor_agrees_with_its_record():
    checked = 0
    for name, i, r in _records():
        if "floor_ms" not in r or not r.get("median_ms"):
            continue
        bound = max(r.get("floor_mem_ms") or 0, r.get("floor_flop_ms") or 0)
        assert r["floor_ms"] == pytest.approx(bound, rel=1e-3), f"{name}:{i}: floor_ms is not the larger floor"
        assert r["floor_bound"] == ("memory" if r["floor_mem_ms"] >= r["floor_flop_ms"] else "compute"), f"{name}:{i}"
        assert r["floor_frac"] == pytest.approx(r["floor_ms"] / r["median_ms"], abs=6e-4), f"{name}:{i}: floor_frac"
        checked += 1
    assert checked > 100


def test_the_readmes_one_gpu_table_comes_from_records():
    """Every number of the README's one-GPU table (ours / transformers / floor, each row at the commit it names)
    is the median (or floor) of a record of that commit, R, phase and size in decode_single_gpu.jsonl, rounded as
    shown: a stale or mistyped cell fails here."""
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| R = (\d+): ours / transformers / floor \(([0-9a-f]{7,40})\) \|(.+)\|$", readme, re.M)
    assert len(rows) == 2, "the README's one-GPU table (R = 4 and R = 8 rows) is not where this test looks"
    sizes = [("decode", 1, 1), ("decode", 16, 1), ("prefill", 1, 2048), ("prefill", 1, 8192)]
    recs = [r for name, _, r in _records() if name == "decode_single_gpu.jsonl" and r.get("virtual_tp")]
    checked = 0
    for tp, commit, cells in rows:
        cells = [c.strip() for c in cells.split("|")]
        assert len(cells) == len(sizes), cells
        for (phase, batch, tokens), cell in zip(sizes, cells):
            shown = cell.split(" / ")
            assert len(shown) == 3, cell

            def found(variant, key, text):
                digits = len(text.partition(".")[2])
                return any(round(r[key], digits) == float(text) for r in recs
                           if r["commit"].startswith(commit) and r["tp"] == int(tp) and r["phase"] == phase
                           and r["batch"] == batch and r["tokens"] == tokens and r["variant"] == variant
                           and key in r)

            assert found("nocomm", "median_ms", shown[0]), (tp, phase, batch, tokens, "ours", shown[0])
            assert found("hf_compile", "median_ms", shown[1]), (tp, phase, batch, tokens, "hf_compile", shown[1])
            assert found("nocomm", "floor_ms", shown[2]), (tp, phase, batch, tokens, "floor", shown[2])
            checked += 3
    assert checked == 24
