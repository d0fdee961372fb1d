"""overlap.kernels.compile_options: every Triton launch in the project passes FP_FUSION."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _launches(tree: ast.AST):
    """Calls of the form kernel[grid](...): how Triton and Gluon kernels are launched."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and isinstance(node.func.value, ast.Name):
            if node.func.value.id.endswith("kernel"):
                yield node


def test_every_triton_launch_asks_for_fp_fusion():
    """Triton 3.10 turns fused multiply-add contraction off by default: a launch without FP_FUSION would change
    its kernel's speed and roundings with the installed Triton."""
    found, missing = 0, []
    for path in sorted([*ROOT.glob("overlap/**/*.py"), *ROOT.glob("spd/**/*.py"), *ROOT.glob("scripts/*.py")]):
        for call in _launches(ast.parse(path.read_text())):
            found += 1
            spread = [k.value for k in call.keywords if k.arg is None]
            if not any(isinstance(v, ast.Name) and v.id == "FP_FUSION" for v in spread):
                missing.append(f"{path.relative_to(ROOT)}:{call.lineno} {call.func.value.id}")
    assert found >= 9, f"found {found} kernel launches: the scan no longer sees them"
    assert not missing, f"launches without **FP_FUSION: {missing}"

