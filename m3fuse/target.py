"""Find the vLLM installation to work on, without importing vllm (it needs torch and a GPU).

With --python, the answer is read off the disk when the interpreter is a plain venv whose one
site-packages holds vllm/ (the common case: an image's venv); every other layout (a system
Python, include-system-site-packages, an editable install, PYTHONPATH, a .pth naming vllm)
asks the interpreter itself. Both give the same answer (tests/test_target.py checks it).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import safeio
from .errors import EnvironmentProblem

HEADERS_MAX = 1 << 20  # a METADATA's headers, a pyvenv.cfg, a .pth file: far smaller in practice


def read_pth(path: Path) -> str:
    """A .pth (or similar small text file) of the target environment: a regular file only,
    bounded (a FIFO planted there must not block m3fuse)."""
    return safeio.read_regular(path, HEADERS_MAX).decode("utf-8", "replace")

# Runs inside the target interpreter. find_spec on a top-level package locates it without
# executing its __init__; the dist-info next to it gives the version cheaply.
_QUERY = r"""
import importlib.util, json, sys
spec = importlib.util.find_spec("vllm")
locs = list(spec.submodule_search_locations or []) if spec else []
version = None
if spec is not None:
    # importlib.metadata only finds the dist-info folder; its METADATA is read as m3fuse.safeio
    # reads (a regular file, no link followed, never blocking, bounded).
    try:
        import importlib.metadata as md, os, stat
        p = os.path.join(str(md.distribution("vllm")._path), "METADATA")
        if stat.S_ISREG(os.lstat(p).st_mode):
            fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as f:
                head = f.read(1 << 20).decode("utf-8", "replace") if stat.S_ISREG(os.fstat(fd).st_mode) else ""
            for line in head.splitlines():
                if not line.strip():
                    break
                if line.lower().startswith("version:"):
                    version = line.split(":", 1)[1].strip()
                    break
    except Exception:
        version = None
print(json.dumps({"executable": sys.executable, "version_info": list(sys.version_info[:3]),
                  "locations": locs, "version": version}))
"""


_WHO = 'import json, sys; print(json.dumps({"executable": sys.executable}))'


@dataclass(frozen=True)
class VllmTarget:
    root: Path  # the directory that contains the `vllm/` package
    version: str | None  # from the vllm dist-info, when there is one
    python: str | None  # the interpreter it belongs to, when known
    dist_info: Path | None


def dist_info(root: Path, dist: str = "vllm") -> tuple[Path | None, str | None]:
    """The dist-info folder of `dist` in the site-packages directory `root` and the version its
    METADATA names (as pip wrote it): the first folder that names one, else (first folder or
    None, None). Reads headers only; no import, no importlib.metadata."""
    prefix = dist.replace("-", "_").lower() + "-"
    try:
        found = sorted(p for p in root.iterdir() if p.name.lower().startswith(prefix) and p.name.endswith(".dist-info"))
    except OSError:
        return None, None
    for d in found:
        try:
            # The headers come first; a FIFO or device planted as METADATA is never read.
            head = safeio.read_head(d / "METADATA", HEADERS_MAX).decode("utf-8", "replace")
        except (OSError, safeio.Unsafe):
            continue
        for line in head.splitlines():
            if line.startswith("Version:"):
                return d, line.split(":", 1)[1].strip()
            if not line.strip():
                break
    return (found[0] if found else None), None


def from_root(root: Path, *, python: str | None = None, version: str | None = None) -> VllmTarget:
    root = Path(root)
    if not (root / "vllm").is_dir():
        raise EnvironmentProblem(
            headline="there is no 'vllm' package directory here", details=[("folder", str(root))],
            hint="give --vllm-root the folder holding vllm/, e.g. '.venv/lib/python3.12/site-packages'")
    info, meta_version = dist_info(root)
    return VllmTarget(root, meta_version or version, python, info)


def resolve_python(python: str) -> str:
    """--python as the user meant it: a relative path against the caller's directory, a bare
    name through PATH (the child runs in "/", so neither may be left to it)."""
    if os.sep in python:
        return os.path.abspath(python)
    import shutil

    return shutil.which(python) or python


def venv_site(exe: str) -> Path | None:
    """The one site-packages a plain venv's interpreter imports from, when the disk says so
    unambiguously; None for anything else (then the interpreter must be asked)."""
    if os.environ.get("PYTHONPATH") or os.environ.get("PYTHONHOME") or not os.access(exe, os.X_OK):
        return None
    here = Path(exe).parent
    root = next((d for d in (here, here.parent) if (d / "pyvenv.cfg").is_file()), None)
    if root is None:
        return None
    try:
        cfg = safeio.read_regular(root / "pyvenv.cfg", HEADERS_MAX).decode("utf-8", "replace")
    except (OSError, safeio.Unsafe):
        return None
    for line in cfg.splitlines():
        key, _, value = line.partition("=")
        if key.strip().lower() == "include-system-site-packages" and value.strip().lower() == "true":
            return None  # the base's site-packages (and the user site) come into play
    sites = [d for d in (root / "lib").glob("python3*/site-packages") if d.is_dir()]
    return sites[0] if len(sites) == 1 else None


def _from_disk(exe: str) -> VllmTarget | None:
    site = venv_site(exe)
    if site is None or not (site / "vllm" / "__init__.py").is_file():
        return None
    if len(list(site.glob("vllm-*.dist-info"))) > 1:
        return None  # importlib.metadata's choice among several is not ours to guess
    for pth in site.glob("*.pth"):
        try:
            if "vllm" in read_pth(pth).lower():
                return None  # an editable install or a path hook: only the interpreter knows
        except (OSError, safeio.Unsafe):
            return None
    return from_root(site, python=exe)


def query_interpreter(python: str, code: str, *, what: str, args: list[str] | None = None,
                      timeout: float = 120) -> dict:
    """Run `code` in another interpreter and parse the one JSON object it prints last.

    Every question m3fuse asks a target interpreter (where is vllm, which wheel tags, which
    packages are installed) goes through here, so all of them resolve --python the same way
    and fail with the same words."""
    # The child runs in "/" (so no vllm/ or other package folder in the caller's directory can
    # shadow an installed one); a relative path or a bare command name must be resolved
    # against the caller first.
    python = resolve_python(python)
    import json  # here, not at the top: the default target (this interpreter) needs neither
    import subprocess

    hint = f"pass a working Python interpreter with --python (e.g. /opt/venv/bin/python) to {what}"

    def failed(headline: str, *rows: tuple[str, str]) -> EnvironmentProblem:
        return EnvironmentProblem(headline=headline, details=[("python", python), *rows], hint=hint)

    try:
        proc = subprocess.run([python, "-c", code, *(args or [])], capture_output=True, text=True,
                              timeout=timeout, cwd="/",
                              env={k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"})
    except FileNotFoundError as exc:
        raise failed("the target Python does not exist (no such file)") from exc
    except PermissionError as exc:
        raise failed("the target Python is not executable", ("error", str(exc.strerror))) from exc
    except OSError as exc:
        raise failed("the target Python cannot be run", ("error", str(exc.strerror or exc))) from exc
    except subprocess.TimeoutExpired as exc:
        raise failed(f"the target Python did not answer within {timeout:g} s when asked to {what}") from exc
    line = proc.stdout.strip().splitlines()[-1:] if proc.returncode == 0 else []
    try:
        data = json.loads(line[0]) if line else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        detail = (proc.stderr or proc.stdout).strip()[-1500:]
        raise EnvironmentProblem(
            headline=f"the target Python, asked to {what}, exited {proc.returncode} without the expected answer",
            details=[("python", python), ("output", detail or "no output")],
            hint=f"it must be a working Python >= 3.8 with pip installed; {hint}")
    return data


def locate(*, python: str | None = None, vllm_root: Path | None = None, ask: bool = False) -> VllmTarget:
    """The vLLM to work on. ask=True always asks the interpreter (tests compare both ways)."""
    if vllm_root is not None:
        if python is not None:
            # The wheels go into that interpreter even when the tree is named directly, so it
            # must be a working Python before anything is written to the tree.
            info = query_interpreter(python, _WHO, what="identify itself")
            python = info.get("executable") or python
        return from_root(vllm_root, python=python)
    if python is not None:
        found = None if ask else _from_disk(resolve_python(python))
        if found is not None:
            return found
        info = query_interpreter(python, _QUERY, what="locate vllm")
        exe = info.get("executable") or python
    else:
        info = _query_here()
        exe = sys.executable
    locations = info.get("locations") or []
    if not locations:
        raise EnvironmentProblem(
            headline="vLLM is not installed for the target Python: `import vllm` would fail there",
            details=[("python", exe)],
            hint="install vLLM there, or point m3fuse at vLLM's Python (--python P) or tree (--vllm-root DIR)")
    pkg_dir = Path(locations[0])
    return from_root(pkg_dir.parent, python=exe, version=info.get("version"))


def _query_here() -> dict:
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return {"locations": locations, "version": None}
