"""Derived data is current: tests/fusion_facts.json equals a fresh derivation from the release
wheels (tests/fusion_facts.py), and README's supported-releases table and docs/pins.md's pin
table equal what tools/release_facts.py renders from the manifests. Both are fixed by one command:
`python tools/release_facts.py --write`."""

from __future__ import annotations

import subprocess
import sys

import pytest

import fusion_facts
from conftest import REPO
from fusion_matrix import ROW_IDS

sys.path.insert(0, str(REPO / "tools"))
import release_facts  # noqa: E402


def test_shipped_facts_equal_a_fresh_derivation():
    shipped = fusion_facts.load()
    assert list(shipped) == ROW_IDS and ROW_IDS, "tests/fusion_facts.json has no rows"
    assert fusion_facts.render(fusion_facts.derive()) == fusion_facts.FACTS_JSON.read_text(), \
        "stale: run python tools/release_facts.py --write"


def test_readme_section_is_current():
    text = (REPO / "README.md").read_text()
    assert text.count(release_facts.BEGIN) == 1 and text.count(release_facts.END) == 1
    assert release_facts.with_section(REPO / "README.md", text, release_facts.readme_section()) == text, \
        "stale: run python tools/release_facts.py --write"


def test_pins_section_is_current():
    text = release_facts.PINS.read_text()
    assert text.count(release_facts.PINS_BEGIN) == 1 and text.count(release_facts.PINS_END) == 1
    assert release_facts.with_section(release_facts.PINS, text, release_facts.pins_section(),
                                      release_facts.PINS_BEGIN, release_facts.PINS_END) == text, \
        "stale: run python tools/release_facts.py --write"


def test_counts_follow_the_manifests(tmp_path):
    """Dropping a set changes the counts and the table; nothing is typed by hand."""
    import shutil

    patches = tmp_path / "patches"
    shutil.copytree(REPO / "patches", patches)
    n_sets = len(list(patches.glob("*/manifest.toml")))
    shutil.rmtree(patches / "vllm-0.27.x")
    pins, table = release_facts.pins_section(patches), release_facts.readme_section(patches)
    assert f"{n_sets - 1} sets" in pins and "0.27.0/0.27.1" not in pins and "| 0.27.0 |" not in pins
    assert "| 0.27.0 |" not in table and "| 0.26.0 | vllm-0.26.0 |" in table


def test_a_release_the_facts_do_not_know_fails_naming_the_fact():
    with pytest.raises(fusion_facts.FactError, match=r"fact 'upstream_aiter_branch'.*no vllm/model_executor"):
        fusion_facts.derive_one(fusion_facts.Release("vllm-0.23.0", ("0.23.0",)))


def test_the_command_finds_nothing_stale():
    r = subprocess.run([sys.executable, str(REPO / "tools" / "release_facts.py"), "--check"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr
