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


def lock_python(lock: Any) -> str:
    """The interpreters and platforms the lock's wheels install on, from their file names'
    tags: "CPython 3.12 on Linux x86_64" (every pinned distribution must fit, so the versions
    are those all of them share)."""
    shared: set[str] | None = None
    platforms: set[str] = set()
    for p in lock.packages:
        interps = set()
        for w in p.wheels:
            for tag in w.tags:
                interp, _, plat = tag.split("-")
                interps.add("any" if interp.startswith("py") else f"{interp[2]}.{interp[3:]}")
                arch = next((a for a in ("x86_64", "aarch64") if plat.endswith(a)), plat)
                platforms.add(plat if plat == "any" or "linux" not in plat else f"Linux {arch}")
        shared = interps if shared is None else (shared & interps if "any" not in interps else shared)
    versions = sorted(v for v in (shared or set()) if v != "any")
    if not versions:
        return "any Python"
    where = sorted(x for x in platforms if x != "any")
    return f"CPython {', '.join(versions)}" + (f" on {', '.join(where)}" if where else "")


def prerequisites(sets: list[PatchSet], lock: Any) -> list[dict[str, Any]]:
    """Per supported release, oldest first: what must be in place before `m3fuse install`
    beyond vLLM itself. Read off the set's aiter-needs.toml and the lock (its pins' recorded
    facts, else their versions): a pin that cannot meet the release's needs is never installed,
    so the environment must already hold a build that does."""
    from .wheels import fit
    from .wheels.needs import load_needs
    from .wheels.plan import pin_verdict

    python = lock_python(lock)
    out = []
    for version in supported_releases(sets):
        pset = next(s for s in sets if version in s.vllm_versions)
        needs = load_needs(pset.folder)
        installed = []
        for pkg in lock.packages:
            unmet = pin_verdict(pkg, needs, str(lock.path)).unmet if needs is not None else []
            if unmet:
                need = fit.needs_of(needs, pkg.key)
                installed.append({"name": pkg.name, "min_version": need.min_version if need else None,
                                  "pinned_version": pkg.version, "pin_lacks": list(unmet)})
        out.append({"vllm": version, "set": pset.name, "python": python, "installed": installed})
    return out


def prerequisite_lines(prereqs: list[dict[str, Any]]) -> list[str]:
    """Releases with the same prerequisites grouped, one line each (`m3fuse sets`, README)."""
    def what(p: dict[str, Any]) -> str:
        if not p["installed"]:
            return "the lock's wheels (m3fuse install puts them in)"
        return "; ".join(f"an {i['name']}" + (f" >= {i['min_version']}" if i["min_version"] else "")
                         + f" already installed (the pin {i['pinned_version'].split('+')[0]} cannot run M3 there;"
                           f" ROCm vLLM images ship one)" for i in p["installed"])

    lines: list[str] = []
    runs: list[tuple[list[str], str]] = []
    for p in prereqs:
        w = what(p)
        if runs and runs[-1][1] == w:
            runs[-1][0].append(p["vllm"])
        else:
            runs.append(([p["vllm"]], w))
    if prereqs:
        lines.append(f"the lock's wheels need {prereqs[0]['python']}")
    for versions, w in runs:
        span = versions[0] if len(versions) == 1 else f"{versions[0]} to {versions[-1]}"
        lines.append(f"vLLM {span}: {w}")
    return lines


def catalog(sets: list[PatchSet], patches_dir: Path, lock_path: Path) -> dict[str, Any]:
    """The sets, their pins, the lock's pins and each release's prerequisites as one JSON-able
    object."""
    from .wheels.lock import load_lock

    lock = load_lock(lock_path, spec=False)
    return {
        "patches": str(patches_dir),
        "supported_releases": supported_releases(sets),
        "prerequisites": prerequisites(sets, lock),
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
             f"{cat['patches']})", "", "prerequisites (besides vLLM itself):"]
    lines += [f"  {line}" for line in prerequisite_lines(cat["prerequisites"])] + [""]
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
