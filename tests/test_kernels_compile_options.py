"""overlap.kernels.compile_options: every Triton launch in the project passes FP_FUSION."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("overlap/**/*.py", "spd/**/*.py", "scripts/*.py")


def _is_jit(decorator: ast.expr) -> bool:
    """@triton.jit, @gluon.jit or @jit, with or without arguments."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
    return name == "jit"


def test_every_triton_launch_asks_for_fp_fusion():
    """Triton 3.10 turns fused multiply-add contraction off by default: a launch without FP_FUSION would change
    its kernel's speed and roundings with the installed Triton. A launch is kernel[grid](...) of a function the
    project decorates with jit."""
    trees = {p: ast.parse(p.read_text()) for pattern in SOURCES for p in sorted(ROOT.glob(pattern))}
    jitted = {node.name for tree in trees.values() for node in ast.walk(tree)
              if isinstance(node, ast.FunctionDef) and any(_is_jit(d) for d in node.decorator_list)}
    found, missing = 0, []
    for path, tree in trees.items():
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Subscript)
                    and isinstance(call.func.value, ast.Name) and call.func.value.id in jitted):
                continue
            found += 1
            spread = [k.value for k in call.keywords if k.arg is None]
            if not any(isinstance(v, ast.Name) and v.id == "FP_FUSION" for v in spread):
                missing.append(f"{path.relative_to(ROOT)}:{call.lineno} {call.func.value.id}")
    assert len(jitted) >= 10 and found >= 9, f"{len(jitted)} jit functions, {found} launches: the scan misses them"
    assert not missing, f"launches without **FP_FUSION: {missing}"
