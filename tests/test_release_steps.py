"""docs/releases.md's "Adding release N+1" steps, run as written: the first sh block of that
section is run by bash in a fresh copy of the repository (its own git repository) from which
the shipped vllm-0.28.0 set was removed, with V set to 0.28.0. The steps must remake the set
byte for byte, with its facts and README section, and stage it; nothing is downloaded (pip is
configured with no index, and the step-1 download is the tests' own cached wheel). `make test`
is recorded, not run (it is the whole suite)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import realvllm
from conftest import REPO

VERSION, NAME = "0.28.0", "vllm-0.28.0"
DERIVED = ["tests/fusion_facts.json", "README.md", "docs/pins.md"]


def steps() -> str:
    text = (REPO / "docs" / "releases.md").read_text()
    start = text.index("\n## Adding release N+1\n")
    section = text[start:text.index("\n## ", start + 1)]
    return re.findall(r"```sh\n(.*?)```", section, re.S)[0]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout


def fresh_copy(dest: Path) -> Path:
    files = git(REPO, "ls-files", "-z").split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():  # a file deleted in the worktree but not yet committed is skipped
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git(dest, "init", "-q")
    git(dest, "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    git(dest, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy")
    git(dest, "rm", "-rq", f"patches/{NAME}")
    # The derived files as they were before the release: without its row and README lines.
    subprocess.run([sys.executable, "tools/release_facts.py", "--write"], cwd=dest, check=True, capture_output=True)
    git(dest, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "before the release")
    return dest


def test_the_documented_steps_remake_a_release(tmp_path):
    block = steps()
    assert block.startswith("V=") and "make test" in block.splitlines()[-1]
    wheel = realvllm.wheel_path(VERSION)  # step 1's download, done the tests' way
    wheels = realvllm.cache_root() / "vllm"
    assert wheel.parent == wheels / VERSION
    repo = fresh_copy(tmp_path / "repo")
    script = re.sub(r"^V=\S+", f"V={VERSION}", block, count=1, flags=re.M).replace("/tmp/", f"{tmp_path}/")
    make_log = tmp_path / "make.log"
    preamble = f'''set -e
python() {{ "{sys.executable}" "$@"; }}
m3fuse() {{
  if [ "$2" = --resume ] && [ ! -d "$3" ]; then echo "(the port was clean: nothing to resume)"; return 0; fi
  "{sys.executable}" -m m3fuse "$@"
}}
pip() {{ ls "${{@: -1}}"/vllm-$V-*.whl > /dev/null; }}   # the wheel is in place: nothing to download
make() {{ echo "make $*" >> "{make_log}"; }}
git() {{ command git "$@"; }}
'''
    env = {**os.environ, "M3FUSE_TEST_CACHE": str(realvllm.cache_root()), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "nothing")}
    r = subprocess.run(["bash", "-c", preamble + script], cwd=repo, capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "port: took --from" in r.stderr and "downloading" not in r.stderr
    # The same patched files as the shipped set; the base taken is the nearest set at or below
    # (vllm-0.27.x, itself ported from vllm-0.26.0), so only the manifest's ported-from differs.
    shipped = {p.name: p.read_bytes() for p in (REPO / "patches" / NAME).iterdir()}
    remade = {p.name: p.read_bytes() for p in (repo / "patches" / NAME).iterdir()}
    assert remade.keys() == shipped.keys()
    assert {k: v for k, v in remade.items() if k != "manifest.toml"} == \
        {k: v for k, v in shipped.items() if k != "manifest.toml"}
    assert remade["manifest.toml"].decode() == shipped["manifest.toml"].decode().replace(
        'ported-from = "vllm-0.26.0"', 'ported-from = "vllm-0.27.x"')
    r = subprocess.run([sys.executable, "-m", "m3fuse", "port", "--refresh", "--check", "--patches",
                        str(repo / "patches"), "--wheels", str(wheels)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr  # the remade set is its base plus its (empty) resolutions
    for rel in DERIVED:
        assert (repo / rel).read_bytes() == (REPO / rel).read_bytes(), rel
    staged = git(repo, "diff", "--cached", "--name-only").split()
    assert f"patches/{NAME}/manifest.toml" in staged and set(DERIVED) <= set(staged), staged
    status = git(repo, "status", "--porcelain", "--untracked-files=all").splitlines()
    unstaged = [ln for ln in status if ln.startswith("??") or ln[1] != " "]
    assert not unstaged, f"left unstaged by the steps: {unstaged}"
    assert make_log.read_text() == "make test\n"
