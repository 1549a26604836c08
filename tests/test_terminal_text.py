"""Issue 25, V18: names, versions and summaries from files others may write reach the terminal
with their control characters shown, never obeyed; `--json` keeps the exact strings."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

from conftest import REPO

from m3fuse.textsafe import one_line, visible

RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
NAME = "vllm-0.26.0\x1b[2J\x1b]0;pwned\x07"
SUMMARY = "fine\x1b[31m RED\r\u202eevil\x9b1m"


def _hostile_sets(tmp_path):
    patches = tmp_path / "patches"
    shutil.copytree(REPO / "patches" / "vllm-0.26.0", patches / "vllm-0.26.0")
    manifest = patches / "vllm-0.26.0" / "manifest.toml"
    text = manifest.read_text()
    text = re.sub(r'^name = ".*"$', lambda _: "name = " + json.dumps(NAME), text, count=1, flags=re.M)
    text = re.sub(r'^summary = ".*"$', lambda _: "summary = " + json.dumps(SUMMARY), text, count=1, flags=re.M)
    manifest.write_text(text)
    return patches


def _m3fuse(*args):
    return subprocess.run([sys.executable, "-m", "m3fuse", *args], capture_output=True, text=True, timeout=120)


def test_set_names_and_summaries_are_shown_not_obeyed(tmp_path, vllm_tree):
    patches = _hostile_sets(tmp_path)
    vllm_tree = vllm_tree("0.26.0")
    for args in (["sets", "--patches", str(patches)],
                 ["status", "--vllm-root", str(vllm_tree), "--patches", str(patches)],
                 ["install", "--no-wheels", "--vllm-root", str(vllm_tree), "--patches", str(patches)]):
        r = _m3fuse(*args)
        out = r.stdout + r.stderr
        assert r.returncode == 0, (args, out)
        assert not RAW.search(out), (args, out)
        if args[0] != "install":  # install names the files it patched, not the set
            assert "\\x1b[2J\\x1b]0;pwned\\x07" in out, (args, out)
    # --json: the exact strings, which JSON itself escapes.
    for args in (["sets", "--json", "--patches", str(patches)],
                 ["status", "--json", "--vllm-root", str(vllm_tree), "--patches", str(patches)]):
        r = _m3fuse(*args)
        assert r.returncode == 0, r.stderr
        assert not RAW.search(r.stdout)
        body = json.loads(r.stdout)
        if args[0] == "sets":
            assert body["sets"][0]["name"] == NAME and body["sets"][0]["summary"] == SUMMARY, body
        else:
            assert body["set"] == NAME, body


def test_an_error_naming_a_hostile_file_shows_its_escapes(tmp_path):
    bad = tmp_path / "evil\x1b[2Jname"
    bad.mkdir()
    r = _m3fuse("sets", "--patches", str(bad / "missing"))
    assert r.returncode != 0
    assert not RAW.search(r.stderr) and "evil\\x1b[2Jname" in r.stderr, r.stderr


def test_visible_and_one_line():
    assert visible("a\tb\nc\x1b[0m\x7f\u202e") == "a\tb\nc\\x1b[0m\\x7f\\u202e"
    assert one_line("a\tb\nc\rd") == "a\\x09b\\x0ac\\x0dd"
    assert visible("plain text, ünïcödé") == "plain text, ünïcödé"
