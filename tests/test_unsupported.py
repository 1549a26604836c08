"""Issue 16, part 2: trees no set matches are described right, on real release files.

The closest set is chosen by content, then by the nearest release at or below the tree's;
`--json` never reports it as `set`; a vLLM without the MiniMax M3 model is named as such with
the first release that has it; hints name commands, never repository paths; `verify` never
says it changed nothing.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import realvllm
from conftest import REPO, run_cli, snapshot
from m3fuse.patching.patchset import load_all


def sets_below(tmp_path: Path, version: str, *, skip: tuple[str, ...] = ()) -> tuple[Path, list[str]]:
    """The shipped sets for releases older than `version` (whatever sets later branches add),
    minus `skip`, in a folder of their own."""
    want = tuple(int(n) for n in version.split("."))
    dest = tmp_path / "patches"
    dest.mkdir()
    names = []
    for s in load_all(REPO / "patches"):
        if s.name in skip or not all(tuple(int(n) for n in v.split(".")) < want for v in s.vllm_versions):
            continue
        shutil.copytree(s.folder, dest / s.name)
        names.append(s.name)
    assert len(names) >= 2
    return dest, names


def newest(names: list[str], tmp: Path) -> str:
    sets = load_all(tmp)
    return max(sets, key=lambda s: max(tuple(int(n) for n in v.split(".")) for v in s.vllm_versions)).name


def run_json(*args: str) -> tuple[int, dict]:
    r = run_cli(*args, "--json")
    return r.returncode, json.loads(r.stdout)


def test_a_newer_release_is_closest_to_the_newest_set(vllm_tree, tmp_path):
    root = vllm_tree("0.34.0")
    patches, names = sets_below(tmp_path, "0.34.0")
    want = newest(names, patches)
    before = snapshot(root)
    code, out = run_json("status", "--vllm-root", str(root), "--patches", str(patches))
    assert out["state"] == "unsupported" and out["set"] is None and out["closest_set"] == want, out
    assert out["has_m3_model"] is True
    code, out = run_json("verify", "--no-wheels", "--vllm-root", str(root), "--patches", str(patches))
    assert code == 3 and out["set"] is None and out["closest_set"] == want
    (failure,) = out["failures"]
    assert re.search(rf"closest set: +{want}\n", failure) and "nothing was changed" not in failure
    assert "docs/" not in failure and f"m3fuse port --from {want}" in failure
    r = run_cli("install", "--no-wheels", "--vllm-root", str(root), "--patches", str(patches))
    assert r.returncode == 3 and re.search(rf"closest set: +{want}\n", r.stderr) and "nothing was changed" in r.stderr
    assert "docs/" not in r.stderr
    r = run_cli("status", "--vllm-root", str(root), "--patches", str(patches))
    assert f"(none matches; closest {want})" in r.stdout
    assert snapshot(root) == before


def test_content_first_then_the_nearest_release_at_or_below(vllm_tree, tmp_path):
    """0.25.1 ships the 0.24.0 helper: without the 0.25.x set, the sets sharing that helper
    tie on content and the one at or below 0.25.1 wins, not the first listed nor a newer one."""
    root = vllm_tree("0.25.1")
    patches, names = sets_below(tmp_path, "0.34.0", skip=("vllm-0.25.x",))
    helper_pin = realvllm.read_member("0.25.1", realvllm.HELPER)
    import hashlib

    sharing = [s.name for s in load_all(patches)
               if any(t.path == realvllm.HELPER and t.pristine_sha256 == hashlib.sha256(helper_pin).hexdigest()
                      for t in s.targets)]
    assert "vllm-0.24.0" in sharing and len(sharing) >= 2, sharing  # a real tie on content
    code, out = run_json("status", "--vllm-root", str(root), "--patches", str(patches))
    assert out["set"] is None and out["closest_set"] == "vllm-0.24.0", out


def test_a_vllm_without_m3_is_named_as_such(tmp_path):
    root = realvllm.extract("0.23.0", tmp_path / "sp", ["vllm/__init__.py"])
    with pytest.raises(KeyError):  # the real 0.23.0 wheel has no M3 model at all
        realvllm.extract("0.23.0", tmp_path / "probe", [realvllm.MODEL])
    before = snapshot(root)
    first = min((v for s in load_all(REPO / "patches") for v in s.vllm_versions),
                key=lambda v: tuple(int(n) for n in v.split(".")))
    r = run_cli("install", "--no-wheels", "--vllm-root", str(root))
    assert r.returncode == 3
    assert "vLLM 0.23.0" in r.stderr and "has no MiniMax M3 model" in r.stderr
    assert re.search(rf"first release with M3: +{first}\n", r.stderr) and "m3fuse port" not in r.stderr and "docs/" not in r.stderr
    code, out = run_json("verify", "--no-wheels", "--vllm-root", str(root))
    assert code == 3 and out["set"] is None and out["closest_set"] is None and out["has_m3_model"] is False
    assert "nothing was changed" not in out["failures"][0]
    r = run_cli("status", "--vllm-root", str(root))
    assert "no MiniMax M3 model" in r.stdout
    assert snapshot(root) == before
