"""scripts/decode_microbench.py's CPU-testable parts (the measurements themselves need a GPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "decode_microbench.py"


def load_script():
    spec = importlib.util.spec_from_file_location("decode_microbench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Kernel:
    def __init__(self, regs, spills):
        self.n_regs, self.n_spills = regs, spills


class _Jit:  # a Triton JITFunction's device caches, in the tuple layouts of recent versions
    def __init__(self, caches):
        self.device_caches = caches


def test_compiled_resources_reads_registers_and_spills_of_each_compiled_variant():
    mb = load_script()
    launched = {"a": _Kernel(255, 24), "b": _Kernel(183, 0), "c": _Kernel(None, None)}  # c: compiled, not launched
    assert mb.compiled_resources(_Jit({0: (launched, {}, "target", None, None)})) == {"a": (255, 24), "b": (183, 0)}
    assert mb.compiled_resources(_Jit({0: (launched, "target", None, None)})) == {"a": (255, 24), "b": (183, 0)}
    assert mb.compiled_resources(object()) == {}  # the CPU interpreter's function: nothing compiled


def test_attention_grid_covers_every_chunking_at_both_warp_counts():
    mb = load_script()
    per_sm = {p for p, w, b in mb.ATTENTION_GRID if w == 4 and b == 64}
    assert per_sm == {p for p, w, b in mb.ATTENTION_GRID if w == 8} == {0.5, 1, 2, 4, 8}
    assert {b for _, _, b in mb.ATTENTION_GRID} == {32, 64, 128}
