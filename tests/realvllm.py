"""Real vLLM release files for the tests, fetched on demand and cached outside the repo.

`pip download --no-deps --only-binary=:all: vllm==X` brings the release wheel (~300 MB) into
``$M3FUSE_TEST_CACHE`` (default ``~/.cache/m3fuse-tests``); only the members a test needs are
extracted. A failed download is an error, never a skip: these tests exist to run on real
release bytes.

A build that is not on the package index (vLLM main, a nightly, an image's site-packages) is
used the same way: a wheel at ``$M3FUSE_TEST_CACHE/vllm/X/vllm-X-*.whl``, X the version its
dist-info says, made and placed as docs/releases.md ("Unreleased builds") shows. The entry may
be a symlink to a wheel kept elsewhere; one that points nowhere is an error naming it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

HELPER = "vllm/model_executor/layers/fused_allreduce_gemma_rms_norm.py"
MODEL = "vllm/models/minimax_m3/amd/model.py"
MTP = "vllm/models/minimax_m3/amd/mtp.py"

# Members enough for a tree that m3fuse (and a `find_spec`) recognises as a vLLM install.
BASE_MEMBERS = (
    "vllm/__init__.py",
    "vllm/models/__init__.py",
    "vllm/models/minimax_m3/__init__.py",
    "vllm/models/minimax_m3/amd/__init__.py",
    HELPER,
    MODEL,
    MTP,
)


def cache_root() -> Path:
    root = Path(os.environ.get("M3FUSE_TEST_CACHE", Path.home() / ".cache" / "m3fuse-tests"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def wheel_path(version: str) -> Path:
    """The release wheel of vllm==version, downloaded once per machine."""
    dest = cache_root() / "vllm" / version
    dest.mkdir(parents=True, exist_ok=True)
    with open(cache_root() / f".vllm-{version}.lock", "w") as lk:
        # Several pytest processes (the stress suite, xdist) may ask at once.
        fcntl.flock(lk, fcntl.LOCK_EX)
        found = sorted(dest.glob(f"vllm-{version}-*.whl"))
        if found:
            if not found[0].exists():  # a symlinked entry whose wheel moved
                raise RuntimeError(f"{found[0]}: a symlink to {os.readlink(found[0])}, which does not exist; "
                                   f"point it at the vllm {version} wheel or remove it (it is then downloaded)")
            return found[0]
        part = dest / ".partial"
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "--disable-pip-version-check", f"vllm=={version}", "-d", str(part)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(part.glob(f"vllm-{version}-*.whl"))
        if proc.returncode != 0 or not got:
            raise RuntimeError(
                f"could not download vllm=={version} for the tests (pip exit {proc.returncode}):\n"
                f"{proc.stderr[-2000:]}")
        final = dest / got[0].name
        os.replace(got[0], final)
        shutil.rmtree(part, ignore_errors=True)
        return final


def dist_info_members(zf: zipfile.ZipFile) -> list[str]:
    return [n for n in zf.namelist()
            if n.split("/")[0].endswith(".dist-info") and n.split("/")[-1] in ("METADATA", "RECORD", "WHEEL")]


def read_member(version: str, member: str) -> bytes:
    with zipfile.ZipFile(wheel_path(version)) as zf:
        return zf.read(member)


def extract(version: str, dest: Path, members: tuple[str, ...] | list[str] = BASE_MEMBERS) -> Path:
    """Make `dest` look like a site-packages holding vllm==version (only `members` of it).

    Returns `dest` (the directory that contains the `vllm/` package)."""
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel_path(version)) as zf:
        names = set(zf.namelist())
        for m in list(members) + dist_info_members(zf):
            if m not in names:
                raise KeyError(f"{m} is not in the vllm {version} wheel")
            target = dest / m
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(m))
    return dest
