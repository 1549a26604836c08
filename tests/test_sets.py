"""Issue 16, part 4: `m3fuse sets` and `m3fuse --version`, derived from the manifests and the
lock (read here independently with tomllib), and hostile inputs to `sets` refused cleanly."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest

from conftest import REPO, run_cli


def manifests(root: Path) -> list[dict]:
    return [tomllib.loads(m.read_text()) for m in sorted(root.glob("*/manifest.toml"))
            if not m.parent.name.startswith(".")]


def key(v: str) -> tuple[int, ...]:
    return tuple(int(n) for n in v.split("."))


def test_sets_json_is_the_manifests_and_the_lock():
    r = run_cli("sets", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    shipped = manifests(REPO / "patches")
    assert out["supported_releases"] == sorted({v for m in shipped for v in m["vllm-versions"]}, key=key)
    assert {s["name"]: [(f["path"], f["pristine_sha256"], f["patched_sha256"]) for f in s["files"]]
            for s in out["sets"]} == {m["name"]: [(f["path"], f["pristine-sha256"], f["patched-sha256"])
                                                  for f in m["files"]] for m in shipped}
    lock = tomllib.loads((REPO / "wheels.lock").read_text())
    assert [(p["name"], p["version"], [(w["name"], w["sha256"]) for w in p["wheels"]]) for p in out["lock"]["packages"]] \
        == [(p["name"], p["version"], [(w["name"], w["hashes"]["sha256"]) for w in p["wheels"]]) for p in lock["packages"]]
    text = run_cli("sets").stdout
    for m in shipped:
        assert m["name"] in text and all(f["patched-sha256"] in text for f in m["files"])
    for p in lock["packages"]:
        assert f"{p['name']} {p['version']}" in text


def test_version_names_the_sets_and_the_newest_release():
    shipped = manifests(REPO / "patches")
    newest = max((v for m in shipped for v in m["vllm-versions"]), key=key)
    r = run_cli("--version")
    assert r.returncode == 0
    assert f"({len(shipped)} patch sets; newest supported vLLM release: {newest})" in r.stdout


def test_a_set_added_to_the_folder_shows_up(tmp_path):
    patches = tmp_path / "patches"
    shutil.copytree(REPO / "patches" / "vllm-0.26.0", patches / "vllm-0.26.0")
    shutil.copytree(REPO / "patches" / "vllm-0.26.0", patches / "mine")
    m = patches / "mine" / "manifest.toml"
    m.write_text(m.read_text().replace('name = "vllm-0.26.0"', 'name = "mine"')
                 .replace('vllm-versions = ["0.26.0"]', 'vllm-versions = ["0.99.1"]'))
    out = json.loads(run_cli("sets", "--json", "--patches", str(patches)).stdout)
    assert out["supported_releases"] == ["0.26.0", "0.99.1"] and [s["name"] for s in out["sets"]] == ["vllm-0.26.0", "mine"]


@pytest.mark.parametrize("case", ["bad-toml", "escaping-path", "bad-hash", "missing-folder", "folder-is-a-file",
                                  "duplicate-name", "bad-lock", "lock-is-a-folder"])
def test_hostile_inputs_to_sets_are_refused_cleanly(case, tmp_path):
    patches = tmp_path / "patches"
    shutil.copytree(REPO / "patches" / "vllm-0.26.0", patches / "vllm-0.26.0")
    manifest = patches / "vllm-0.26.0" / "manifest.toml"
    text = manifest.read_text()
    lock = REPO / "wheels.lock"
    args = ["--patches", str(patches)]
    want = 3
    if case == "bad-toml":
        manifest.write_text(text + "\n[[files]\n")
    elif case == "escaping-path":
        manifest.write_text(text.replace('path = "vllm/', 'path = "../../etc/', 1))
    elif case == "bad-hash":
        manifest.write_text(text.replace('pristine-sha256 = "', 'pristine-sha256 = "zz', 1))
    elif case == "missing-folder":
        args = ["--patches", str(tmp_path / "nowhere")]
    elif case == "folder-is-a-file":
        (tmp_path / "f").write_text("x")
        args, want = ["--patches", str(tmp_path / "f")], 2
    elif case == "duplicate-name":
        shutil.copytree(patches / "vllm-0.26.0", patches / "copy")
    elif case == "bad-lock":
        lock = tmp_path / "bad.lock"
        lock.write_text('lock-version = "1.0"\n[[packages]]\nname = 5\n')
        want = 2
    elif case == "lock-is-a-folder":
        lock, want = tmp_path, 2
    for extra in ([], ["--json"]):
        r = run_cli("sets", *args, "--lock", str(lock), *extra)
        assert r.returncode == want, (case, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr + r.stdout
        if extra and case not in ("folder-is-a-file", "lock-is-a-folder"):  # those two are click's usage errors
            assert json.loads(r.stdout)["ok"] is False
        else:
            assert r.stderr.strip()


def test_the_readme_release_table_is_what_sets_reports():
    """README's generated block (releases → set) against `m3fuse sets --json`: one source."""
    import re

    text = (REPO / "README.md").read_text()
    block = text[text.index("<!-- BEGIN generated: supported-releases -->"):
                 text.index("<!-- END generated: supported-releases -->")]
    rows = re.findall(r"^\| (\d+(?:\.\d+)+) \| ([A-Za-z0-9._+-]+) \|$", block, re.M)
    out = json.loads(run_cli("sets", "--json").stdout)
    want = [(v, s["name"]) for v in out["supported_releases"] for s in out["sets"] if v in s["vllm_versions"]]
    assert rows == want
