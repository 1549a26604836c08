#!/usr/bin/env python3
"""Write (or refresh) a patch set from a pristine tree and an edited copy of it.

    python tools/mkpatch.py patches/vllm-0.26.0 --version 0.26.0 \
        --pristine /tmp/pristine-0.26.0 --patched /tmp/edited-0.26.0 \
        vllm/model_executor/layers/fused_allreduce_gemma_rms_norm.py vllm/models/minimax_m3/amd/model.py

Both trees hold `vllm/...` paths. Each file gets `<set>/<basename>.diff` and an entry in
`<set>/manifest.toml` with both sha256 pins, rendered by m3fuse's own set writer (the one
`m3fuse port` uses). The edited copies stay outside the repo: only diffs are committed. An
existing manifest's summary and ported-from entries are kept unless given again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from m3fuse.errors import M3fuseError  # noqa: E402
from m3fuse.patching import setwriter  # noqa: E402
from m3fuse.patching.patchset import load_patchset  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("set_dir", type=Path)
    ap.add_argument("--version", action="append", required=True, help="vLLM version(s) the set is for")
    ap.add_argument("--pristine", type=Path, required=True)
    ap.add_argument("--patched", type=Path, required=True)
    ap.add_argument("--summary", default=None)
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    old = load_patchset(a.set_dir) if (a.set_dir / "manifest.toml").is_file() else None
    origin = {t.path: t.ported_from for t in old.targets} if old else {}
    try:
        changes = [setwriter.FileChange(rel, (a.pristine / rel).read_bytes(), (a.patched / rel).read_bytes(),
                                        origin.get(rel)) for rel in a.files]
        summary = a.summary if a.summary is not None else (old.summary if old else "")
        rendered = setwriter.render(a.set_dir.name, a.version, summary, changes,
                                    ported_from=old.ported_from if old else None)
    except M3fuseError as exc:
        sys.exit(f"mkpatch: {exc.message}")
    a.set_dir.mkdir(parents=True, exist_ok=True)
    for name, data in rendered.items():
        (a.set_dir / name).write_bytes(data)
    print(f"wrote {a.set_dir}/manifest.toml with {len(changes)} file(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
