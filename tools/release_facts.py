#!/usr/bin/env python3
"""Derived data about the shipped sets, regenerated from the manifests and the release wheels:

- tests/fusion_facts.json: the fusion matrix's rows, every fact read off each release's own
  files by the functions of tests/fusion_facts.py;
- README.md's supported-releases table (release -> set), its quick-start prerequisites (from
  the needs files and the lock, as `m3fuse sets` prints them) and docs/pins.md's counts and
  fingerprint table, each between `<!-- BEGIN generated: ... -->` / `<!-- END ... -->` markers.

    python tools/release_facts.py --write   # after adding or changing a set
    python tools/release_facts.py --check   # exit 1 naming what is stale (the tests check the same)

Release wheels come from tests/realvllm.py's cache ($M3FUSE_TEST_CACHE, default
~/.cache/m3fuse-tests): an already-downloaded wheel at $M3FUSE_TEST_CACHE/vllm/X/ is used as is.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from m3fuse.patching.patchset import load_all  # noqa: E402

README = REPO / "README.md"
PINS = REPO / "docs" / "pins.md"
BEGIN = "<!-- BEGIN generated: supported-releases -->"
END = "<!-- END generated: supported-releases -->"
PINS_BEGIN = "<!-- BEGIN generated: pins -->"
PINS_END = "<!-- END generated: pins -->"
SHORT = {"vllm/model_executor/layers/fused_allreduce_gemma_rms_norm.py": "helper",
         "vllm/models/minimax_m3/amd/model.py": "model"}


def _releases(patches: Path) -> tuple[list, list[str]]:
    from packaging.version import Version

    sets = load_all(patches)
    return sets, sorted({v for s in sets for v in s.vllm_versions}, key=Version)


def readme_section(patches: Path = REPO / "patches") -> str:
    """README's table: which set each release gets (`m3fuse sets` prints the same)."""
    sets, versions = _releases(patches)
    rows = [f"| {v} | {next(s.name for s in sets if v in s.vllm_versions)} |" for v in versions]
    return "\n".join([BEGIN, "| vLLM release | patch set |", "|---|---|", *rows, END])


def pins_section(patches: Path = REPO / "patches") -> str:
    """docs/pins.md's counts and one row per release and patched file."""
    from packaging.version import Version

    sets, versions = _releases(patches)
    shared = [s for s in sorted(sets, key=lambda s: Version(s.vllm_versions[0])) if len(s.vllm_versions) > 1]
    same = " and ".join("/".join(s.vllm_versions) for s in shared)
    prose = (f"Every vLLM release that ships M3's ROCm model has a set: {len(versions)} releases, {len(sets)} sets"
             + (f" ({same} ship the same target files)" if shared else "") + ". A set is chosen by content, so "
             "these fingerprints are what counts, not the version string. This section is generated from the "
             "manifests (`python tools/release_facts.py --write`) and a test fails if it is not current.")
    lines = [PINS_BEGIN, *textwrap.wrap(prose, 96, break_on_hyphens=False), "",
             "| release | set | file | pristine sha256 | patched sha256 |",
             "|---|---|---|---|---|"]
    for version in versions:
        pset = next(s for s in sets if version in s.vllm_versions)
        for t in pset.targets:
            lines.append(f"| {version} | {pset.name} | {SHORT.get(t.path, t.path)} | `{t.pristine_sha256}` | "
                         f"`{t.patched_sha256}` |")
    return "\n".join(lines + [PINS_END])


PREREQ_BEGIN = "<!-- BEGIN generated: prerequisites -->"
PREREQ_END = "<!-- END generated: prerequisites -->"


def prerequisites_section(patches: Path = REPO / "patches", lock: Path = REPO / "wheels.lock") -> str:
    """README's quick-start prerequisites: what `m3fuse sets` prints, from the needs files and
    the lock (m3fuse.catalog)."""
    from m3fuse.catalog import prerequisite_lines, prerequisites
    from m3fuse.wheels.lock import load_lock

    lines = prerequisite_lines(prerequisites(load_all(patches), load_lock(lock, spec=False)))
    return "\n".join([PREREQ_BEGIN, *(f"- {line}" for line in lines), PREREQ_END])


def with_section(path: Path, text: str, section: str, begin: str = BEGIN, end: str = END) -> str:
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if len(pattern.findall(text)) != 1:
        raise SystemExit(f"{path}: needs exactly one {begin} ... {end} block")
    return pattern.sub(lambda _: section, text)


def outputs() -> dict[Path, str]:
    import fusion_facts

    return {fusion_facts.FACTS_JSON: fusion_facts.render(fusion_facts.derive()),
            README: with_section(README, with_section(README, README.read_text(), readme_section()),
                                 prerequisites_section(), PREREQ_BEGIN, PREREQ_END),
            PINS: with_section(PINS, PINS.read_text(), pins_section(), PINS_BEGIN, PINS_END)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="write the derived files in place")
    mode.add_argument("--check", action="store_true", help="exit 1 if a derived file is not current")
    a = ap.parse_args()
    stale = []
    for path, text in outputs().items():
        current = path.read_text() if path.is_file() else None
        if current == text:
            continue
        stale.append(path)
        if a.write:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
    for path in stale:
        print(f"{'wrote' if a.write else 'stale'}: {path.relative_to(REPO)}")
    return 1 if stale and a.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
