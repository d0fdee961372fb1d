"""Run directories: every stage is file in, file out.

A run directory holds the resolved config (config.yaml), meta.json (git commit, package versions,
device, TP size, time) and the stage's versioned JSON outputs. Outputs are written atomically (to a
temporary file, then renamed), so an interrupted run never leaves a partial file that looks like a
result; a stage is complete when its output file exists and parses.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import asdict, is_dataclass
from importlib import metadata
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = ("torch", "transformers", "lm_eval", "hydra-core", "triton", "datasets", "safetensors")


def user_mode(mode: int = 0o666) -> int:
    """`mode` under the process umask: what open() would give a new file (mkstemp/mkdtemp give 0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write data to path whole or not at all (a temporary file renamed), with the user's normal permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, user_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj) -> Path:
    return write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | Path):
    """The parsed JSON file, or None when it is missing or unreadable (an incomplete stage)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def git_commit() -> str:
    """HEAD of the project checkout (+"-dirty"), or $SPD_COMMIT on a copy without .git (a GPU box)."""
    if os.environ.get("SPD_COMMIT"):
        return os.environ["SPD_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        commit = out.stdout.strip() if out.returncode == 0 else ""
        if not commit:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def meta(**extra) -> dict:
    """Provenance of a result: commit, versions, device, time, plus the caller's fields (tp, stage...)."""
    return {
        "commit": git_commit(),
        "versions": versions(),
        "device": device_name(),
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


def start_run(run_dir: str | Path, config, **extra) -> Path:
    """Create run_dir and write its resolved config (config.yaml) and meta.json."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_dataclass(config):
        config = OmegaConf.structured(config)
    if not isinstance(config, dict):
        config = OmegaConf.to_container(config, resolve=True)
    write_bytes_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(config).encode())
    write_json_atomic(run_dir / "meta.json", meta(**extra))
    return run_dir


def to_plain(obj):
    """A dataclass or DictConfig as plain dicts and lists (for JSON)."""
    if is_dataclass(obj):
        return asdict(obj)
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:
        pass
    return obj
