#!/usr/bin/env python3
"""Print the README's supported-releases table from the shipped manifests (one row per
release and file), so the table is regenerated, never hand-edited:

    python tools/release_table.py    # the Markdown rows; tests/test_readme_pins.py checks README
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from m3fuse.patching.patchset import load_all  # noqa: E402

SHORT = {"vllm/model_executor/layers/fused_allreduce_gemma_rms_norm.py": "helper",
         "vllm/models/minimax_m3/amd/model.py": "model"}
HEADER = ["| release | set | file | pristine sha256 | patched sha256 |",
          "|---|---|---|---|---|"]


def rows() -> list[str]:
    from packaging.version import Version

    out = []
    sets = load_all(REPO / "patches")
    for version in sorted({v for s in sets for v in s.vllm_versions}, key=Version):
        pset = next(s for s in sets if version in s.vllm_versions)
        for t in pset.targets:
            out.append(f"| {version} | {pset.name} | {SHORT.get(t.path, t.path)} | `{t.pristine_sha256}` | "
                       f"`{t.patched_sha256}` |")
    return HEADER + out


def main() -> int:
    table = rows()
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
