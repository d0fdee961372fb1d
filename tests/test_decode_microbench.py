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


class _Kernel:  # a compiled Triton kernel: registers, spills, metadata.shared and its PTX
    def __init__(self, regs, spills, smem=None, ptx=""):
        self.n_regs, self.n_spills = regs, spills
        self.metadata = type("Metadata", (), {"shared": smem})()
        self.asm = {"ptx": ptx}


class _Jit:  # a Triton JITFunction's device caches, in the tuple layouts of recent versions
    def __init__(self, caches):
        self.device_caches = caches


def test_compiled_resources_reads_registers_spills_smem_and_cp_async_of_each_compiled_variant():
    mb = load_script()
    launched = {"a": _Kernel(255, 24, 32768, "cp.async.ca x;\ncp.async.commit_group;"), "b": _Kernel(183, 0, 0, "ld.global"),
                "c": _Kernel(None, None)}  # c: compiled, not launched
    want = {"a": dict(regs=255, spills=24, smem=32768, cp_async=2), "b": dict(regs=183, spills=0, smem=0, cp_async=0)}
    assert mb.compiled_resources(_Jit({0: (launched, {}, "target", None, None)})) == want
    assert mb.compiled_resources(_Jit({0: (launched, "target", None, None)})) == want
    assert mb.compiled_resources(object()) == {}  # the CPU interpreter's function: nothing compiled


def test_attention_grid_covers_every_chunking_at_both_warp_counts():
    mb = load_script()
    uncapped = [(p, w, b) for p, w, b, cap in mb.ATTENTION_GRID if cap is None]
    per_sm = {p for p, w, b in uncapped if w == 4 and b == 64}
    assert per_sm == {p for p, w, b in uncapped if w == 8} | {1.9} and {0.5, 1, 2, 4, 8} <= per_sm
    assert {b for _, _, b in uncapped} == {32, 64, 128}
    assert {cap for *_, cap in mb.ATTENTION_GRID} == {None, 128, 168}  # register caps swept at one-wave chunkings
