"""Each release's prerequisites, derived (issue 26): `m3fuse sets` and README's quick start say
what must be in place besides vLLM, read off each set's aiter-needs.toml and the wheel lock
(read here independently with tomllib), never typed by hand."""

from __future__ import annotations

import json
import sys
import tomllib

from conftest import REPO, run_cli
from wheelkit import build_wheel, lock_text

sys.path.insert(0, str(REPO / "tools"))
import release_facts  # noqa: E402


def needs_of(set_dir) -> dict:
    path = set_dir / "aiter-needs.toml"
    return tomllib.loads(path.read_text()) if path.is_file() else {}


def test_the_readme_prerequisites_equal_a_fresh_derivation():
    text = (REPO / "README.md").read_text()
    assert text.count(release_facts.PREREQ_BEGIN) == 1 and text.count(release_facts.PREREQ_END) == 1
    assert release_facts.with_section(REPO / "README.md", text, release_facts.prerequisites_section(),
                                      release_facts.PREREQ_BEGIN, release_facts.PREREQ_END) == text, \
        "stale: run python tools/release_facts.py --write"


def test_sets_names_each_releases_prerequisites_from_the_needs_and_the_lock():
    r = run_cli("sets", "--json")
    assert r.returncode == 0, r.stderr
    prereqs = {p["vllm"]: p for p in json.loads(r.stdout)["prerequisites"]}
    lock = tomllib.loads((REPO / "wheels.lock").read_text())
    aiter = next(p for p in lock["packages"] if p["name"] == "amd-aiter")
    from packaging.version import Version

    for set_dir in sorted((REPO / "patches").glob("vllm-*")):
        manifest = tomllib.loads((set_dir / "manifest.toml").read_text())
        want = needs_of(set_dir).get("amd-aiter", {}).get("min-version")
        for v in manifest["vllm-versions"]:
            # A release whose AITER floor is above the pin needs one installed beforehand.
            above = want is not None and Version(want) > Version(aiter["version"])
            got = [i["name"] for i in prereqs[v]["installed"]]
            assert ("amd-aiter" in got) == above, (v, want, prereqs[v])
            if above:
                assert prereqs[v]["installed"][0]["min_version"] == want
            assert prereqs[v]["python"] == "CPython 3.12 on Linux x86_64"
    text = run_cli("sets").stdout
    assert "the lock's wheels need CPython 3.12 on Linux x86_64" in text
    # Releases with the same prerequisites share one line, named by their first and last.
    floors = [p for p in prereqs.values() if p["installed"]]
    first, last = floors[0], floors[-1]
    assert (f"vLLM {first['vllm']} to {last['vllm']}: an amd-aiter >= {first['installed'][0]['min_version']} "
            f"already installed") in text, text[:2000]


def test_a_lock_whose_pin_meets_the_needs_asks_for_nothing_beforehand(tmp_path):
    """Other inputs, other prerequisites: a lock of pure-Python wheels pinning an AITER at the
    newest release's floor needs no particular Python and nothing installed first."""
    floor = needs_of(REPO / "patches" / "vllm-0.34.0")["amd-aiter"]["min-version"]
    fly = build_wheel(tmp_path, "flydsl", "0.1.9")
    aiter = build_wheel(tmp_path, "amd-aiter", floor)
    lock = tmp_path / "any.lock"
    lock.write_text(lock_text([("flydsl", "0.1.9", [(fly, fly.as_uri())]),
                               ("amd-aiter", floor, [(aiter, aiter.as_uri())])]))
    out = json.loads(run_cli("sets", "--json", "--lock", str(lock)).stdout)
    last = next(p for p in out["prerequisites"] if p["vllm"] == "0.34.0")
    assert last == {"vllm": "0.34.0", "set": "vllm-0.34.0", "python": "any Python", "installed": []}
    text = run_cli("sets", "--lock", str(lock)).stdout
    assert "the lock's wheels need any Python" in text and "already installed" not in text
