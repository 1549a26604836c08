"""The known-AITER-defects table, and `install`/`verify` naming the defects of the AITER that is
or will be installed, without changing their exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

from conftest import run_cli
from m3fuse.runtime import defects as aiter_defects
from m3fuse.runtime.defects import DEFECTS, affecting, dist_version, pinned_version
from m3fuse.resources import default_lock
from wheelkit import aiter_wheel, build_wheel, lock_text

PIN = "0.1.15.post1+rocm7.2.manylinux.2.28"


def ids(defects) -> set[str]:
    return {d.id for d in defects}


def fake_aiter(root: Path, version: str) -> None:
    d = root / f"amd_aiter-{version}.dist-info"
    d.mkdir()
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: amd-aiter\nVersion: {version}\n\n")


def test_every_row_is_complete_and_its_versions_parse():
    assert len({d.id for d in DEFECTS}) == len(DEFECTS)
    for d in DEFECTS:
        assert d.id.startswith("ROCm/aiter#") and d.url.endswith(d.id.split("#")[1])
        assert d.defect and d.consequence
        if d.introduced and d.fixed:
            assert Version(d.introduced) < Version(d.fixed)
        # A row's own fixed release is not affected by it; the release before is (when it has one).
        if d.fixed:
            assert d.id not in ids(affecting(d.fixed)) and d.id not in ids(affecting(d.fixed + "+rocm7.2"))


def test_the_shipped_pin_is_exposed_to_both_barrier_defects():
    pin = pinned_version(default_lock())
    assert pin == PIN  # the lock still pins it; if this changes, the README's limits change too
    assert {"ROCm/aiter#3514", "ROCm/aiter#4346", "ROCm/aiter#4888"} <= ids(affecting(pin))


@pytest.mark.parametrize("version,expect", [
    ("0.1.11.post1", {"ROCm/aiter#4346", "ROCm/aiter#4082", "ROCm/aiter#4888", "ROCm/aiter#3792"}),  # plain barrier intact
    ("0.1.15.post3", {"ROCm/aiter#3514", "ROCm/aiter#4346", "ROCm/aiter#4082", "ROCm/aiter#4888", "ROCm/aiter#3792"}),
    ("0.1.16", {"ROCm/aiter#4346", "ROCm/aiter#4082", "ROCm/aiter#4888", "ROCm/aiter#3792"}),
    ("0.1.17+rocm7.1", {"ROCm/aiter#4346", "ROCm/aiter#4082", "ROCm/aiter#4888"}),
    ("0.1.19", {"ROCm/aiter#4346", "ROCm/aiter#4082", "ROCm/aiter#4888"}),
    ("0.1.19.post1", {"ROCm/aiter#4888"}),
    ("0.1.21.post2+rocm7.2.manylinux.2.28", {"ROCm/aiter#4888"}),
    ("0.1.16.dev3+g1234", {"ROCm/aiter#3514", "ROCm/aiter#4346", "ROCm/aiter#4082", "ROCm/aiter#4888",
                           "ROCm/aiter#3792"}),
    ("not a version", {d.id for d in DEFECTS}),
])
def test_affected_ranges_with_local_and_dev_versions(version, expect):
    assert ids(affecting(version)) == expect


def test_the_all_gather_barrier_row_bites_from_vllm_0_30():
    # vLLM 0.30.0 sends DP-group all-gathers/reduce-scatters to AITER's custom collectives (issue
    # 23; read off the wheels), 0.34.0 also TP all-gathers (all_gather_unreg); 0.29.0 neither.
    import realvllm

    comm = "vllm/distributed/device_communicators/cuda_communicator.py"
    for version, routed in (("0.29.0", False), ("0.30.0", True)):
        text = realvllm.read_member(version, comm).decode()
        assert ("aiter_comm.custom_all_gather(" in text and "aiter_comm.custom_reduce_scatter(" in text) is routed
    assert "ROCm/aiter#4082" not in ids(affecting(PIN, "0.29.0"))
    assert "ROCm/aiter#4082" in ids(affecting(PIN, "0.30.0"))
    assert "ROCm/aiter#4082" in ids(affecting(PIN, "0.34.0"))
    assert "ROCm/aiter#4082" not in ids(affecting("0.1.19.post1", "0.34.0"))
    assert "ROCm/aiter#4082" in ids(affecting("0.1.19+rocm7.1", "0.34.0"))


def test_the_gemma_norm_row_bites_only_from_vllm_0_30():
    assert "ROCm/aiter#3792" not in ids(affecting(PIN, "0.26.0"))
    assert "ROCm/aiter#3792" in ids(affecting(PIN, "0.30.0"))
    assert "ROCm/aiter#3792" in ids(affecting(PIN, None))


def test_dist_version_reads_metadata_not_the_folder_name(tmp_path):
    assert dist_version(tmp_path) is None
    d = tmp_path / "amd_aiter-0.1.15.post1+rocm7.2.manylinux.2.28.dist-info"
    d.mkdir()
    (d / "METADATA").write_text("Metadata-Version: 2.1\nName: amd-aiter\nVersion: 0.1.99\n\nBody\nVersion: 1\n")
    assert dist_version(tmp_path) == "0.1.99"
    assert dist_version(tmp_path / "missing") is None


@pytest.fixture
def patched(vllm_tree):
    root = vllm_tree("0.26.0")
    assert run_cli("install", "--no-wheels", "--vllm-root", str(root)).returncode == 0
    return root


def test_verify_names_the_installed_aiter_defects_and_keeps_its_exit_code(patched, pristine_trees, tmp_path):
    base = ["verify", "--no-wheels", "--vllm-root", str(patched)]
    before = run_cli(*base)
    assert before.returncode == 0 and "aiter" not in before.stderr.lower()
    fake_aiter(patched, PIN)
    r = run_cli(*base)
    assert r.returncode == 0 and r.stdout == before.stdout
    assert "ROCm/aiter#3514" in r.stderr and "ROCm/aiter#4346" in r.stderr and ">= 0.1.19.post1" in r.stderr
    assert "ROCm/aiter#3792" not in r.stderr  # vLLM 0.26.0: nothing passes gemma_norm
    out = json.loads(run_cli(*base, "--json").stdout)
    assert out["ok"] and out["aiter"]["version"] == PIN and str(patched) in out["aiter"]["source"]
    assert [d["id"] for d in out["aiter"]["defects"]] == ["ROCm/aiter#3514", "ROCm/aiter#4346", "ROCm/aiter#4888"]
    assert {"id", "url", "defect", "affected", "first_fixed", "consequence"} <= set(out["aiter"]["defects"][0])

    # A failing verify fails the same with the AITER lines added.
    pristine = tmp_path / "pristine"
    shutil.copytree(pristine_trees("0.26.0"), pristine)
    bare = run_cli("verify", "--no-wheels", "--vllm-root", str(pristine))
    fake_aiter(pristine, PIN)
    warned = run_cli("verify", "--no-wheels", "--vllm-root", str(pristine))
    assert bare.returncode == warned.returncode == 3 and "ROCm/aiter#3514" in warned.stderr
    # With the wheel half (this interpreter has no pinned wheels): the tree's exit 3 still wins,
    # and the AITER is read from the dist-info since pip's probe finds none.
    withwheels = run_cli("verify", "--vllm-root", str(pristine), "--json")
    assert withwheels.returncode == 3 and json.loads(withwheels.stdout)["aiter"]["version"] == PIN


def test_a_fixed_aiter_is_only_exposed_to_the_open_defect(patched):
    fake_aiter(patched, "0.1.19.post1+rocm7.1")
    r = run_cli("verify", "--no-wheels", "--vllm-root", str(patched), "--json")
    assert r.returncode == 0
    assert [d["id"] for d in json.loads(r.stdout)["aiter"]["defects"]] == ["ROCm/aiter#4888"]


def test_install_names_the_pinned_aiter_it_would_install(tmp_path, vllm_tree):
    root = vllm_tree("0.26.0")
    fly = build_wheel(tmp_path / "w", "flydsl", "0.1.9.dev1+t", {"flydsl/__init__.py": ""})
    for version, expect in ((PIN, {"ROCm/aiter#3514", "ROCm/aiter#4346"}), ("0.1.19.post1+t", set())):
        aiter = aiter_wheel(tmp_path / f"w-{version}", version)
        lock = tmp_path / f"{version}.lock"
        lock.write_text(lock_text([("flydsl", "0.1.9.dev1+t", [(fly, fly.as_uri())]),
                                   ("amd-aiter", version, [(aiter, aiter.as_uri())])]))
        args = ["install", "--dry-run", "--lock", str(lock), "--vllm-root", str(root)]
        r = run_cli(*args, "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        rep = json.loads(r.stdout)["aiter"]
        assert rep["version"] == version and rep["source"] == f"pinned in {lock.name}"
        assert expect <= {d["id"] for d in rep["defects"]}
        assert not ({"ROCm/aiter#3514", "ROCm/aiter#4346"} - expect) & {d["id"] for d in rep["defects"]}
        text = run_cli(*args)
        assert text.returncode == 0
        assert ("ROCm/aiter#3514" in text.stderr) == bool(expect)


def test_verify_no_wheels_stays_light(vllm_tree):
    """The defect table costs verify --no-wheels no packaging/requests import when no AITER is
    installed beside vLLM (packaging comes in only to compare a version it found)."""
    root = vllm_tree("0.26.0")
    code = ("import sys, m3fuse.cli as c\n"
            "try:\n    c.main(['verify', '--no-wheels', '--vllm-root', sys.argv[1]])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('packaging', 'requests', 'torch') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True)
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout + r.stderr
    assert aiter_defects.dist_version(root) is None


def test_every_sets_run_time_defect_rows_agree_with_the_product_table():
    """The patched helper cannot import m3fuse, so it carries the rows its construction-time
    warning needs; each must be the product table's row (same defect, same first fixed version),
    so the warning in vLLM's log and `m3fuse install`/`verify` never disagree."""
    import ast

    import realvllm
    from conftest import REPO
    from m3fuse.patching.hunks import apply_patch
    from m3fuse.patching.patchset import load_all

    product = {d.id: d.fixed for d in aiter_defects.DEFECTS}
    for pset in load_all(REPO / "patches", parse=True):
        helper = next(t for t in pset.targets if t.path == realvllm.HELPER)
        text = apply_patch(realvllm.read_member(pset.vllm_versions[0], helper.path), helper.patch_file.read_text())
        rows = next(ast.literal_eval(n.value) for n in ast.parse(text).body
                    if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "M3_AITER_DEFECTS")
        assert rows, pset.name
        for defect, fixed, _ in rows:
            assert product.get(defect) == fixed, (pset.name, defect, fixed, product.get(defect))
