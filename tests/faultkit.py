"""Shared helpers for the crash, concurrency and hostile-input suites (issue 6).

Sizing: ``M3FUSE_STRESS=full`` (``make stress``) runs the full sweeps; unset, each sweep runs a
bounded sample so ``make test`` stays inside CI's budget. Figures of every sweep are appended
to ``$M3FUSE_RELIABILITY_LOG`` (default: ``<pytest tmp>/reliability.jsonl``) and printed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import realvllm
import samplesets

REPO = Path(__file__).resolve().parent.parent
FULL = os.environ.get("M3FUSE_STRESS", "").lower() == "full"
TMP_MARK = ".m3fuse-tmp-"
SAMPLE_TARGETS = (realvllm.HELPER, realvllm.MODEL, realvllm.MTP)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record(kind: str, **figures) -> None:
    """Print one sweep's figures and append them to the reliability log."""
    line = {"suite": kind, "full": FULL, **figures}
    print(f"\n[reliability] {json.dumps(line)}")
    log = os.environ.get("M3FUSE_RELIABILITY_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps(line) + "\n")


# --- patch sets ------------------------------------------------------------------------------

def shipped_set(version: str) -> Path | None:
    """The real fusion set shipped for `version`, if the repo has one."""
    d = REPO / "patches" / f"vllm-{version}"
    return d if (d / "manifest.toml").is_file() else None


def pins(set_folder: Path) -> dict[str, tuple[str, str]]:
    """target path -> (pristine sha256, patched sha256), read from the manifest as data."""
    from m3fuse.tomlread import loads

    data = loads((set_folder / "manifest.toml").read_text())
    return {f["path"]: (f["pristine-sha256"], f["patched-sha256"]) for f in data["files"]}


def isolated_sets(dest: Path, version: str, kind: str) -> tuple[Path, Path]:
    """A --patches folder holding exactly one set: the shipped one ("shipped") or a sample set on
    three real files ("sample"). Returns (patches dir, set folder)."""
    patches = dest / f"patches-{kind}-{version}"
    if kind == "shipped":
        src = shipped_set(version)
        assert src is not None, f"no shipped set for {version}"
        shutil.copytree(src, patches / src.name)
        return patches, patches / src.name
    samplesets.sample_set(patches, version, targets=SAMPLE_TARGETS)
    return patches, patches / f"sample-{version}"


# --- tree invariants -------------------------------------------------------------------------

def temp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if TMP_MARK in p.name)


def file_states(root: Path, pinned: dict[str, tuple[str, str]]) -> dict[str, str]:
    """Each target's state by its hash alone: pristine / patched / BAD:<sha>."""
    out = {}
    for rel, (pristine, patched) in pinned.items():
        digest = sha((root / rel).read_bytes())
        out[rel] = "pristine" if digest == pristine else "patched" if digest == patched else f"BAD:{digest}"
    return out


def overall(states: dict[str, str]) -> str:
    kinds = set(states.values())
    return kinds.pop() if len(kinds) == 1 else "partial"


def plant_bytecode(root: Path, targets) -> dict[Path, str]:
    """Compile every target into the two kinds of bytecode Python trusts without recompiling
    from a changed source: an unchecked hash-based pyc, and a timestamp pyc under another
    interpreter tag (its mtime/size key matches the current file). Returns pyc -> sha of the
    source text it was compiled from."""
    import py_compile

    planted = {}
    for rel in targets:
        src = root / rel
        cache = src.parent / "__pycache__"
        cache.mkdir(exist_ok=True)
        text_sha = sha(src.read_bytes())
        pyc = Path(py_compile.compile(str(src), invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
                                      doraise=True))
        planted[pyc] = text_sha
        ts = cache / f"{src.stem}.cpython-3x.pyc"
        py_compile.compile(str(src), cfile=str(ts), invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP,
                           doraise=True)
        planted[ts] = text_sha
    return planted


def bytecode_lies(root: Path, targets, planted: dict[Path, str]) -> list[str]:
    """Bytecode that an interpreter would run although it was compiled from other text than the
    source now on disk (judged independently of m3fuse's own checker)."""
    bad = []
    for rel in targets:
        src = root / rel
        data = src.read_bytes()
        st = src.stat()
        for pyc in sorted((src.parent / "__pycache__").glob(f"{src.stem}.*.pyc")):
            header = pyc.read_bytes()[:16]
            flags = struct.unpack("<I", header[4:8])[0]
            from_sha = planted.get(pyc)
            if flags & 1:
                trusted = not (flags & 2) and header[:4] == importlib.util.MAGIC_NUMBER
                if trusted and header[8:16] != importlib.util.source_hash(data):
                    bad.append(f"{pyc}: unchecked hash pyc of other text")
            else:
                mtime, size = struct.unpack("<II", header[8:16])
                keyed = mtime == (int(st.st_mtime) & 0xFFFFFFFF) and size == (st.st_size & 0xFFFFFFFF)
                if keyed and from_sha is not None and from_sha != sha(data):
                    bad.append(f"{pyc}: timestamp pyc whose key matches but was compiled from other text")
    return bad


# --- running the CLI -------------------------------------------------------------------------

def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "m3fuse", *args]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("M3FUSE_TEST_")}
    env.update(extra)
    return env


def run(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_cmd(*args), capture_output=True, text=True, env=cli_env(**env), timeout=timeout)


def verify_json(root: Path, patches: Path, expect: str = "patched") -> tuple[int, dict]:
    r = run("verify", "--no-wheels", "--json", "--expect", expect, "--vllm-root", str(root), "--patches", str(patches))
    return r.returncode, json.loads(r.stdout)


# --- environment faults ----------------------------------------------------------------------

def _ok(cmd: list[str]) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only(root: Path, method: str) -> Iterator[dict]:
    """Make `root` read-only for the CLI run inside the block. Yields extra kwargs for
    subprocess.run (the setuid method drops privileges in the child). Raises
    NotImplementedError when this sandbox cannot do `method`."""
    if method == "ro-bind-mount":
        if not _ok(["mount", "--bind", str(root), str(root)]):
            raise NotImplementedError("mount --bind is not permitted here")
        try:
            if not _ok(["mount", "-o", "remount,ro,bind", str(root), str(root)]):
                raise NotImplementedError("remount,ro is not permitted here")
            yield {}
        finally:
            subprocess.run(["umount", str(root)], capture_output=True)
    elif method == "immutable":
        if not _ok(["chattr", "-R", "+i", str(root)]):
            subprocess.run(["chattr", "-R", "-i", str(root)], capture_output=True)
            raise NotImplementedError("chattr +i is not supported on this filesystem")
        try:
            yield {}
        finally:
            subprocess.run(["chattr", "-R", "-i", str(root)], capture_output=True)
    elif method == "setuid-nobody":
        if os.geteuid() != 0:
            raise NotImplementedError("needs root to drop to another uid")
        python = unprivileged_python()
        _let_nobody_traverse(root)
        probe = subprocess.run([python, "-c", "import m3fuse"], capture_output=True, preexec_fn=_drop_privileges)
        assert probe.returncode == 0, probe.stderr
        yield {"preexec_fn": _drop_privileges, "python": python}
    else:
        raise ValueError(method)


_UNPRIVILEGED: list[str] = []


def unprivileged_python() -> str:
    """An interpreter with m3fuse that uid 65534 can run. The test venv's Python often lives
    under /root (mode 700), which nobody cannot enter; so a venv of the system Python is made
    once per session in a world-readable folder, with m3fuse's dependencies and a copy of the
    package (the checkout itself may sit under /root too)."""
    if _UNPRIVILEGED:
        return _UNPRIVILEGED[0]
    import tempfile

    import tomllib

    base = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")
                 if os.access(p, os.X_OK) and subprocess.run(
                     [p, "-c", "pass"], capture_output=True, preexec_fn=_drop_privileges).returncode == 0), None)
    assert base, "no Python that uid 65534 can run (looked for /usr/bin/python3 and /usr/local/bin/python3)"
    home = Path(tempfile.mkdtemp(prefix="m3fuse-nobody-"))
    os.chmod(home, 0o755)
    subprocess.run([base, "-m", "venv", str(home / "venv")], check=True, capture_output=True)
    py = home / "venv" / "bin" / "python"
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *deps],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    shutil.copytree(REPO / "m3fuse", Path(purelib) / "m3fuse", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["chmod", "-R", "a+rX", str(home)], check=True)
    _UNPRIVILEGED.append(str(py))
    return str(py)


def _let_nobody_traverse(path: Path) -> None:
    """o+x on the test's own temp folders above `path` (pytest makes its base temp 0700)."""
    import tempfile

    tmp = Path(tempfile.gettempdir()).resolve()
    for d in [path.resolve(), *path.resolve().parents]:
        if d == tmp or tmp not in d.parents:
            break
        os.chmod(d, os.stat(d).st_mode | 0o001)


def _drop_privileges() -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size_bytes: int) -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    if not _ok(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mountpoint)]):
        raise NotImplementedError("cannot mount a tmpfs here")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def fill_until(path: Path, leave: int) -> None:
    """Fill the filesystem holding `path` so that about `leave` bytes stay free."""
    free = shutil.disk_usage(path.parent).free
    with open(path, "wb") as f:
        f.write(b"\0" * max((free - leave) // 4096 * 4096, 0))
