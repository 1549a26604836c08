"""What this m3fuse supports, read off the patch sets' manifests and the wheel lock (never a
list kept by hand): `m3fuse sets`, `m3fuse --version`, and the release order the engine uses
to name the set closest to an unsupported tree."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .patching.patchset import PatchSet

_RELEASE = re.compile(r"v?(\d+(?:\.\d+)*)")


def release(version: str | None) -> tuple[int, ...] | None:
    """The release numbers of a version ("0.34.0+rocm7" → (0, 34, 0)), None when it has none.
    Not packaging's Version: the guard runs this in vLLM processes and imports nothing extra."""
    m = _RELEASE.match(version or "")
    return tuple(int(n) for n in m.group(1).split(".")) if m else None


def supported_releases(sets: list[PatchSet]) -> list[str]:
    """Every vLLM release some set is for, oldest first."""
    return sorted({v for s in sets for v in s.vllm_versions}, key=lambda v: (release(v) or (), v))


def catalog(sets: list[PatchSet], patches_dir: Path, lock_path: Path) -> dict[str, Any]:
    """The sets, their pins and the lock's pins as one JSON-able object."""
    from .wheels.lock import load_lock

    lock = load_lock(lock_path, spec=False)
    return {
        "patches": str(patches_dir),
        "supported_releases": supported_releases(sets),
        "sets": [{"name": s.name, "vllm_versions": list(s.vllm_versions), "summary": s.summary,
                  "ported_from": s.ported_from,
                  "files": [{"path": t.path, "pristine_sha256": t.pristine_sha256,
                             "patched_sha256": t.patched_sha256, "ported_from": t.ported_from}
                            for t in s.targets]}
                 for s in sorted(sets, key=lambda s: min((release(v) or () for v in s.vllm_versions), default=()))],
        "lock": {"path": str(lock_path),
                 "packages": [{"name": p.name, "version": p.version,
                               "wheels": [{"name": w.name, "url": w.url, "sha256": w.sha256, "size": w.size}
                                          for w in p.wheels]}
                              for p in lock.packages]},
    }


def render(cat: dict[str, Any]) -> str:
    releases = cat["supported_releases"]
    lines = [f"supported vLLM releases: {', '.join(releases) or 'none'} ({len(cat['sets'])} patch sets in "
             f"{cat['patches']})", ""]
    for s in cat["sets"]:
        lines.append(f"{s['name']}  (vLLM {', '.join(s['vllm_versions'])})"
                     + (f"  ported from {s['ported_from']}" if s["ported_from"] else ""))
        width = max((len(f["path"]) for f in s["files"]), default=0)
        for f in s["files"]:
            lines.append(f"  {f['path']:<{width}}  pristine {f['pristine_sha256']}")
            lines.append(f"  {'':<{width}}  patched  {f['patched_sha256']}")
    lines += ["", f"wheel lock: {cat['lock']['path']}"]
    for p in cat["lock"]["packages"]:
        lines.append(f"  {p['name']} {p['version']}")
        for w in p["wheels"]:
            lines.append(f"    {w['name']}  sha256 {w['sha256']}" + (f"  {w['size']} bytes" if w["size"] else ""))
    return "\n".join(lines)


def version_line(version: str, sets: list[PatchSet]) -> str:
    releases = supported_releases(sets)
    newest = releases[-1] if releases else "none"
    return f"m3fuse {version} ({len(sets)} patch sets; newest supported vLLM release: {newest})"
