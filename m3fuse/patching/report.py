"""Turn engine results into the JSON object and the human table the CLI prints."""

from __future__ import annotations

from typing import Any

from ..textsafe import one_line
from .engine import PARTIAL, PATCHED, PRISTINE, TreeState


def tree_json(tree: TreeState) -> dict[str, Any]:
    return {
        "state": tree.state,
        "vllm": {"version": tree.vllm.version, "root": str(tree.vllm.root), "python": tree.vllm.python},
        "set": tree.patch_set.name if tree.patch_set else None,
        # Only for a tree no set matches: the set its files come closest to (never a match).
        "closest_set": tree.closest.name if tree.closest else None,
        "has_m3_model": not tree.no_model,
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
    # Names, versions and paths come from files others may write: each stays on its line, with
    # any control character shown, not obeyed (textsafe.py).
    v = tree.vllm
    lines = [f"vLLM {one_line(v.version) if v.version else '(version unknown: no dist-info)'} at {one_line(v.root)}"
             + (f" (python {one_line(v.python)})" if v.python else "")]
    if tree.patch_set:
        which = one_line(tree.patch_set.name)
    elif tree.no_model:
        which = "(none: this vLLM has no MiniMax M3 model)"
    else:
        which = f"(none matches; closest {one_line(tree.closest.name)})" if tree.closest else "(none matches)"
    lines.append(f"patch set: {which}    state: {tree.state.upper()}")
    if tree.files:
        width = max(len(one_line(f.target.path)) for f in tree.files)
        lines.append(f"  {'STATE':<10} {'FILE':<{width}}  SHA256 (first 16)  RECORD")
        for f in tree.files:
            digest = (f.sha256 or "-")[:16]
            lines.append(f"  {f.state:<10} {one_line(f.target.path):<{width}}  {digest:<17}  {one_line(f.record or '-')}")
    for p in tree.problems:
        lines.append(f"  problem: {one_line(p)}")
    return "\n".join(lines)



def interrupted_line(tree: TreeState, command: str) -> str:
    """For an interrupted `install` or `revert`: the tree's state now and the command that
    finishes the job or undoes it (one line)."""
    where = f"vLLM at {one_line(tree.vllm.root)} is {tree.state}"
    if tree.state == PARTIAL:
        return f"{where} (an earlier run was killed); `m3fuse install` finishes it, `m3fuse revert` undoes it"
    if tree.state == PATCHED:
        return (f"{where}; `m3fuse revert` undoes it" if command == "install" else
                f"{where} (revert had not started writing); `m3fuse revert` restores it")
    if tree.state == PRISTINE:
        return (f"{where} (install had not started patching); `m3fuse install` patches it" if command == "install"
                else f"{where}; `m3fuse install` patches it again")
    return f"{where}; `m3fuse verify` says why"
