"""Run a test file as a script in a fresh Python with Triton's CPU interpreter on.

TRITON_INTERPRET=1 must be set before triton is imported, so the cases of the kernel tests run in a
subprocess: the test file itself, given its case name; it prints one JSON object as its last line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(test_file: str, *args, timeout: float = 300) -> dict:
    """The JSON the test file printed last when run as `python test_file args...` with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, test_file, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
