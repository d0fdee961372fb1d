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


def test_attention_grid_sets_the_kernels_constants_and_covers_both_loads_of_the_first_tile():
    from overlap import decode_attention as da

    mb = load_script()
    assert all(hasattr(da, name) for setting in mb.ATTENTION_GRID for name in setting)  # no typo goes unswept
    pipelined = [s for s in mb.ATTENTION_GRID if s["PRELOAD_MAX_TILES"] == 0]
    assert {(s["NUM_WARPS"], s["NUM_STAGES"]) for s in pipelined} >= {(w, n) for w in (4, 8) for n in (2, 3, 4)}
    assert any(s["PRELOAD_MAX_TILES"] > 1000 for s in mb.ATTENTION_GRID)  # every chunk preloads its first tile
    assert {s["BLOCK_N"] for s in mb.ATTENTION_GRID} == {32, 64}