"""spd.artifacts.atomic_dir: all or nothing, and no temporary of a killed run left behind."""

import os
import subprocess
import sys

import pytest

from spd.artifacts import atomic_dir


def test_atomic_dir_replaces_whole_and_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "eval"
    with atomic_dir(final) as tmp:
        (tmp / "summary.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "partial.json").write_text("{")
            raise RuntimeError("killed mid-way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
    assert sorted(p.name for p in final.iterdir()) == ["summary.json"]  # the old result, untouched


def test_temporaries_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / f".eval.tmp-{dead}-abc"  # a run killed by SIGKILL / timeout: its finally never ran
    older = tmp_path / ".eval.tmp-xyz12"  # the name before process ids were in it
    live = tmp_path / f".eval.tmp-{os.getpid()}-def"  # a run still going (here: this process)
    for d in (stale, older, live):
        d.mkdir()
        (d / "results.json").write_text("{")
    with atomic_dir(tmp_path / "eval") as tmp:
        (tmp / "summary.json").write_text("{}")
    assert not stale.exists() and not older.exists() and live.is_dir()
    assert (tmp_path / "eval" / "summary.json").is_file()
