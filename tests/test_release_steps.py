"""docs/releases.md's "Adding release N+1" steps, run as written: the first sh block of that
section is run by bash in a fresh copy of the repository (its own git repository) from which
the shipped vllm-0.28.0 set was removed, with V set to 0.28.0. The steps must remake the set
byte for byte (its readers.toml too), with its facts and README section, and stage it; nothing
is downloaded (pip is configured with no index, and the step-1 download is the tests' own
cached wheel). `make` is recorded, not run: `.venv-test/.ready` is this test's own venv (the
facts step runs in it, after it), `make test` is the whole suite.

Also here: the Containerfile's default base tag names the newest set's release; a build that is
not on the package index, zipped from a site-packages as the docs say and placed in the test
cache as a symlink, is a wheel the tests read, and the image build context gets its target."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import imagekit
import realvllm
from conftest import REPO
from m3fuse.patching import readers
from m3fuse.patching.patchset import load_all

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
    lines = block.splitlines()
    # the facts step runs in the test venv, which a fresh checkout makes first
    assert lines.index("make .venv-test/.ready") < lines.index("python tools/release_facts.py --write")
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
make() {{ echo "make $*" >> "{make_log}"; }}   # .venv-test/.ready: this test's own interpreter
git() {{ command git "$@"; }}
'''
    env = {**os.environ, "M3FUSE_TEST_CACHE": str(realvllm.cache_root()), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "nothing")}
    r = subprocess.run(["bash", "-c", preamble + script], cwd=repo, capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "port: took --from" in r.stderr and "downloading" not in r.stderr
    # port's `next:` line names steps 5's three commands, in order
    nxt = next(ln for ln in r.stdout.splitlines() if ln.startswith("next: "))
    order = [nxt.index(c) for c in ("m3fuse port --record-resolutions", "m3fuse needs ", "tools/release_facts.py --write")]
    assert order == sorted(order), nxt
    assert "warning:" not in r.stdout, r.stdout  # the readers and the loop check out at port time
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
    assert make_log.read_text() == "make .venv-test/.ready\nmake test\n"


def test_the_containerfiles_default_base_is_the_newest_sets_release():
    """No step may forget the Containerfile: its default BASE_IMAGE tag (and the comment's
    example) is the newest release a set covers."""
    from packaging.version import Version

    newest = max((v for s in load_all(REPO / "patches") for v in s.vllm_versions), key=Version)
    text = (REPO / "Containerfile").read_text()
    (default,) = re.findall(r"^ARG BASE_IMAGE=\S+:v(\S+)$", text, re.M)
    assert default == newest, f"Containerfile: ARG BASE_IMAGE tag v{default}, newest set's release {newest}"
    comment = re.findall(r"^#.*BASE_IMAGE=\S+:v([^@\s]+)", text, re.M)
    assert comment and set(comment) == {newest}, comment


UNRELEASED = "0.35.0.dev42+g1234abc"


def _zip_site_packages(tmp_path: Path) -> Path:
    """An unreleased build as docs/releases.md makes one from an image's site-packages: the
    package and its dist-info, zipped with `python -m zipfile -c` (here: 0.34.0's model package
    under a dev version)."""
    site = tmp_path / "site"
    with zipfile.ZipFile(realvllm.wheel_path("0.34.0")) as zf:
        package = sorted(m for m in zf.namelist() if m.startswith(readers.PACKAGE))
    members = sorted(set(realvllm.BASE_MEMBERS) | set(package))
    realvllm.extract("0.34.0", site, members)
    for d in site.glob("vllm-0.34.0.dist-info"):
        meta = (d / "METADATA").read_text().replace("Version: 0.34.0", f"Version: {UNRELEASED}")
        d.rename(site / f"vllm-{UNRELEASED}.dist-info")
        (site / f"vllm-{UNRELEASED}.dist-info" / "METADATA").write_text(meta)
    block = steps_unreleased()
    zip_line = next(ln for ln in block.splitlines() if "python -m zipfile -c" in ln)
    elsewhere = tmp_path / "built"
    elsewhere.mkdir()
    cmd = zip_line.replace("$SITE", str(site)).replace("$W/$V", str(elsewhere)).replace("$V", UNRELEASED)
    subprocess.run(["bash", "-c", cmd.replace("python ", f"{sys.executable} ")], check=True)
    (wheel,) = elsewhere.glob("*.whl")
    return wheel


def steps_unreleased() -> str:
    text = (REPO / "docs" / "releases.md").read_text()
    start = text.index("\n### Unreleased builds")
    return re.findall(r"```sh\n(.*?)```", text[start:], re.S)[0]


def test_an_unreleased_build_symlinked_into_the_cache_is_read_as_a_release(tmp_path, monkeypatch):
    wheel = _zip_site_packages(tmp_path)
    released = realvllm.read_member("0.34.0", realvllm.MODEL)
    cache = tmp_path / "cache"
    monkeypatch.setenv("M3FUSE_TEST_CACHE", str(cache))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # found in the cache, never downloaded
    link_line = next(ln for ln in steps_unreleased().splitlines() if ln.startswith("mkdir -p $W/$V && ln -s"))
    cmd = link_line.replace("$W/$V", str(cache / "vllm" / UNRELEASED)).replace(
        "/path/to/vllm-$V-cp38-abi3-linux_x86_64.whl", str(wheel))
    subprocess.run(["bash", "-c", cmd], check=True)
    entry = realvllm.wheel_path(UNRELEASED)
    assert entry.is_symlink() and entry.parent == cache / "vllm" / UNRELEASED
    tree = realvllm.extract(UNRELEASED, tmp_path / "tree")
    assert (tree / realvllm.MODEL).read_bytes() == released
    assert (tree / f"vllm-{UNRELEASED}.dist-info" / "METADATA").is_file()
    # the readers derived from it are 0.34.0's
    model = realvllm.read_member(UNRELEASED, realvllm.MODEL).decode()
    assert readers.reader_keys(readers.derive(model)).keys() == readers.reader_keys(
        readers.derive(released.decode())).keys()
    # the image build context gets the wheel itself, not a link out of the context
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    placed = imagekit.place_in_context(entry, ctx)
    assert placed.name == entry.name and not placed.is_symlink() and placed.is_file()
    assert placed.read_bytes() == wheel.read_bytes()


def test_a_dangling_cache_symlink_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("M3FUSE_TEST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    entry = tmp_path / "cache" / "vllm" / UNRELEASED / f"vllm-{UNRELEASED}-py3-none-any.whl"
    entry.parent.mkdir(parents=True)
    entry.symlink_to(tmp_path / "moved.whl")
    with pytest.raises(RuntimeError, match=f"{re.escape(str(entry))}: a symlink to .*moved.whl, which does not exist"):
        realvllm.wheel_path(UNRELEASED)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    gone = tmp_path / "vllm-0-py3-none-any.whl"
    gone.symlink_to(tmp_path / "nowhere.whl")
    with pytest.raises(FileNotFoundError):
        imagekit.place_in_context(gone, ctx)
    assert list(ctx.iterdir()) == []
