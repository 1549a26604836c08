"""Turn engine results into the JSON object and the human table the CLI prints."""

from __future__ import annotations

from typing import Any

from .engine import TreeState


def tree_json(tree: TreeState) -> dict[str, Any]:
    return {
        "state": tree.state,
        "vllm": {"version": tree.vllm.version, "root": str(tree.vllm.root), "python": tree.vllm.python},
        "set": tree.patch_set.name if tree.patch_set else None,
        "supported_sets": [{"name": s.name, "vllm_versions": list(s.vllm_versions)} for s in tree.supported],
        "files": [
            {
                "path": f.target.path,
                "state": f.state,
                "sha256": f.sha256,
                "expected_pristine_sha256": f.target.pristine_sha256,
                "expected_patched_sha256": f.target.patched_sha256,
                "record": f.record,
                "stale_bytecode": f.stale_bytecode,
            }
            for f in tree.files
        ],
        "leftover_temp_files": [str(p) for p in tree.leftovers],
        "problems": tree.problems,
    }


def tree_table(tree: TreeState) -> str:
    v = tree.vllm
    lines = [f"vLLM {v.version or '(version unknown: no dist-info)'} at {v.root}"
             + (f" (python {v.python})" if v.python else "")]
    lines.append(f"patch set: {tree.patch_set.name if tree.patch_set else '(none matches)'}"
                 f"    state: {tree.state.upper()}")
    if tree.files:
        width = max(len(f.target.path) for f in tree.files)
        lines.append(f"  {'STATE':<10} {'FILE':<{width}}  SHA256 (first 16)  RECORD")
        for f in tree.files:
            digest = (f.sha256 or "-")[:16]
            lines.append(f"  {f.state:<10} {f.target.path:<{width}}  {digest:<17}  {f.record or '-'}")
    for p in tree.problems:
        lines.append(f"  problem: {p}")
    return "\n".join(lines)

