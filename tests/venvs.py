"""Real virtual environments for the tests (python -m venv, real pip)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def make_venv(dest: Path, python: str = sys.executable) -> Path:
    subprocess.run([python, "-m", "venv", str(dest)], check=True)
    return dest / "bin" / "python"


def pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())
