"""Build small patch sets at test time from real vLLM release files.

The real fusion sets are the payload; these exercise the engine with edits of known shape on
the same real bytes (the release wheels via tests/realvllm.py), so engine tests do not depend
on what the fusion patches happen to change.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable
from pathlib import Path

import realvllm

Edit = Callable[[list[str]], list[str]]


def default_edit(lines: list[str]) -> list[str]:
    """Touch the start, the middle and the end, so there are several hunks."""
    out = list(lines)
    out.insert(2, "# m3fuse sample edit: top\n")
    mid = len(out) // 2
    out[mid] = out[mid].rstrip("\n") + "  # m3fuse sample edit: middle\n"
    out.append("M3FUSE_SAMPLE = True\n")
    return out


def write_set(dest: Path, name: str, versions: list[str], files: dict[str, tuple[bytes, bytes]]) -> Path:
    """`files` maps a target path to (pristine bytes, patched bytes)."""
    folder = dest / name
    folder.mkdir(parents=True, exist_ok=True)
    manifest = ["format = 1", f'name = "{name}"',
                "vllm-versions = [" + ", ".join(f'"{v}"' for v in versions) + "]",
                'summary = "test sample set"', ""]
    for rel, (old, new) in files.items():
        diff = "".join(difflib.unified_diff(old.decode().splitlines(keepends=True),
                                            new.decode().splitlines(keepends=True),
                                            f"a/{rel}", f"b/{rel}"))
        patch = Path(rel).name + ".diff"
        (folder / patch).write_text(diff)
        manifest += ["[[files]]", f'path = "{rel}"', f'patch = "{patch}"',
                     f'pristine-sha256 = "{hashlib.sha256(old).hexdigest()}"',
                     f'patched-sha256 = "{hashlib.sha256(new).hexdigest()}"', ""]
    (folder / "manifest.toml").write_text("\n".join(manifest))
    return folder


def sample_set(dest: Path, version: str, *, targets: tuple[str, ...] = (realvllm.HELPER, realvllm.MODEL),
               edit: Edit = default_edit, name: str | None = None) -> Path:
    files = {}
    for rel in targets:
        old = realvllm.read_member(version, rel)
        new = "".join(edit(old.decode().splitlines(keepends=True))).encode()
        files[rel] = (old, new)
    write_set(dest, name or f"sample-{version}", [version], files)
    return dest


def patched_bytes(version: str, rel: str, edit: Edit = default_edit) -> bytes:
    old = realvllm.read_member(version, rel)
    return "".join(edit(old.decode().splitlines(keepends=True))).encode()
