"""The shipped Containerfile, built and run: a real OCI image, no registry, no mock.

The base is made here (imagekit): the host distribution's own packages bootstrapped with
mmdebstrap, its PEP 668-marked system Python holding the real vLLM release wheel of the newest
release a shipped patch set covers (--no-deps: no torch), tagged as the Containerfile's default
BASE_IMAGE in the test's own storage. The image is made by README.md's container sequence, run
verbatim in a fresh copy of the checkout's files: it makes its venv, fills wheels/ with
tools/image-wheels.sh and builds with --network=none. The lock there is a test lock pinning test
AITER/FlyDSL wheels (tests/wheelkit.py) served on 127.0.0.1 (the pinned ones cannot be fetched
on these machines).

Asserted: the sequence builds the image and its `m3fuse verify` exits 0, also after a save/load
round trip into fresh storage (what a registry push and pull do); a rebuild with the cache
reuses every layer, and one after the lock changed or a new m3fuse wheel came in rebuilds and
the image holds (and verify reads) the new inputs; the guard runs in the image's vLLM Python
through the release's own plugin loader; the Containerfile's ENV block is
`m3fuse env fused --format docker` of the built image and reaches its processes; hostile build
arguments and a context without the lock fail the build with a clear message and leave no
image or container behind.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.version import Version

import imagekit
from conftest import REPO
from m3fuse.patching.patchset import load_all
from test_readme_container import readme_sequence
from wheelkit import FaultServer, _record_hash, aiter_build, build_wheel, lock_text, needed_modules, package_files

pytestmark = [pytest.mark.slow, pytest.mark.image]

# The newest release a shipped set covers: the image test follows new sets by itself.
VLLM = max((v for s in load_all(REPO / "patches") for v in s.vllm_versions), key=Version)
SET = next(s.name for s in load_all(REPO / "patches") if VLLM in s.vllm_versions)
AITER_V = "0.1.21.post2+rocm7.2.image"  # at the min-version 0.30.0+ name (releases.md, runtime.md)
FLY_V = "0.1.9.dev1+image"
IMAGE = "localhost/m3-vllm:latest"  # the tag README.md's sequence builds
ENV_BEGIN, ENV_END = "# BEGIN m3fuse env fused\n", "# END m3fuse env fused\n"

# vLLM's real plugin loader, run from the image's installed vLLM. Only the execution of
# vllm/__init__.py is left out (it imports torch, which a --no-deps vLLM lacks): the package
# object is made from its real location, so vllm.plugins, vllm.envs and vllm.logger are the
# release's own files, the entry point is found the way vLLM finds it (importlib.metadata over
# the image's site-packages), and the guard locates the tree from sys.modules["vllm"].
LOADER = r"""
import importlib.util, sys, types
spec = importlib.util.find_spec("vllm")
pkg = types.ModuleType("vllm")
pkg.__file__, pkg.__path__ = spec.origin, list(spec.submodule_search_locations)
sys.modules["vllm"] = pkg
import vllm.logger
from vllm.plugins import load_general_plugins
load_general_plugins()
print("STARTED torch=%s" % ("torch" in sys.modules), flush=True)
"""


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    imagekit.ensure_tools()
    pm = imagekit.Podman(tmp_path_factory.mktemp("podman"))
    yield pm
    pm.destroy()


@pytest.fixture(scope="module")
def base(podman):
    return imagekit.base_image(podman, VLLM)


def default_base() -> str:
    (ref,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", (REPO / "Containerfile").read_text(), re.M)
    return ref


def fresh_clone(dest: Path) -> Path:
    """The checkout's tracked files, as `git clone` of this commit gives them."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout
    for rel in filter(None, listed.decode().split("\0")):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory, podman, base):
    """README.md's container sequence, verbatim, in a fresh copy of the checkout whose
    wheels.lock is the test lock; the base image is there under the Containerfile's default
    name. Returns the copy (the build context) and the sequence's output."""
    ctx = fresh_clone(tmp_path_factory.mktemp("clone"))
    src = tmp_path_factory.mktemp("test-wheels")
    # Test wheels that meet what the release needs (the set's aiter-needs.toml: from 0.30.0 on
    # M3's model imports AITER modules the old pin lacks), as a modern image's AITER does.
    fly = build_wheel(src, "flydsl", FLY_V,
                      package_files(needed_modules(SET, "flydsl"), {"flydsl/__init__.py": "X = 1\n"}))
    aiter = aiter_build(src, AITER_V, needed_modules(SET))
    podman.run("tag", base, default_base())
    pyver = podman.run("run", "--rm", "--network=none", base, "python3", "-c",
                       "import sys; print('%d.%d' % sys.version_info[:2])").stdout.strip()
    t0 = time.monotonic()
    with FaultServer() as srv:
        (ctx / "wheels.lock").write_text(lock_text([srv.pin("flydsl", FLY_V, fly),
                                                    srv.pin("amd-aiter", AITER_V, aiter)]))
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_sequence()], cwd=ctx, capture_output=True,
                              text=True, timeout=1800, env={**podman.env, "IMAGE_PYTHON": pyver})
    print(f"\nREADME sequence (venv, wheels, build, verify): {time.monotonic() - t0:.0f} s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    names = sorted(p.name for p in (ctx / "wheels").iterdir())
    assert fly.name in names and aiter.name in names and any(n.startswith("m3fuse-") for n in names), names
    return ctx, proc


@pytest.fixture(scope="module")
def context(readme_run):
    return readme_run[0]


def build(podman, ctx: Path, tag: str, **args: str) -> subprocess.CompletedProcess:
    argv = ["build", "--network=none", "--file", str(ctx / "Containerfile"), "--tag", tag]
    for k, v in args.items():
        argv += ["--build-arg", f"{k}={v}"]
    return podman.run(*argv, str(ctx), check=False)


@pytest.fixture(scope="module")
def image(podman, readme_run):
    assert podman.exists(IMAGE)
    return IMAGE


def run(podman, image: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
    return podman.run("run", "--rm", "--network=none", *flags, image, *argv, check=False)


def verify_ok(podman, image: str) -> str:
    r = run(podman, image, "m3fuse", "verify")
    assert r.returncode == 0, f"verify exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "verify: OK" in r.stdout
    return r.stdout


def test_the_base_is_a_pep668_system_python_with_the_real_vllm(podman, base):
    r = run(podman, base, "python3", "-m", "pip", "install", "--no-index", "m3fuse")
    assert r.returncode != 0 and "externally-managed-environment" in r.stdout + r.stderr
    r = run(podman, base, "python3", "-c", "from importlib import metadata as m; print(m.version('vllm'))")
    assert r.stdout.strip() == VLLM, r.stderr


def test_the_readme_sequence_builds_an_image_that_verifies(readme_run, podman, image):
    _, proc = readme_run
    assert "verify: OK" in proc.stdout and f"{SET}" in proc.stdout, proc.stdout[-3000:]
    out = verify_ok(podman, image)
    # verify names the builds it accepted: here the test lock's pins, installed by the build.
    assert f"wheel amd-aiter {AITER_V}: pinned (pinned {AITER_V})" in out, out
    assert f"wheel flydsl {FLY_V}: pinned (pinned {FLY_V})" in out, out
    assert f"{SET}" in out
    # m3fuse, AITER and FlyDSL live in vLLM's own Python; the lock the image was built with is
    # the one verify reads.
    code = ("from importlib import metadata as m; import os; "
            "print(m.version('amd-aiter'), m.version('flydsl'), os.environ['M3FUSE_LOCK'])")
    r = run(podman, image, "python3", "-c", code)
    assert r.stdout.split() == [AITER_V, FLY_V, "/etc/m3fuse/wheels.lock"], r.stderr


def test_verify_after_save_and_load_into_fresh_storage(podman, image, tmp_path):
    archive = tmp_path / "image.tar"
    podman.run("save", "--quiet", "--output", str(archive), image)
    fresh = imagekit.Podman(tmp_path / "pulled")
    try:
        assert not fresh.images()
        fresh.run("load", "--quiet", "--input", str(archive))
        archive.unlink()
        # Whether the patched files have .pyc files in the image bears on verify's stale-.pyc rule
        # (layers keep mtimes to the second and reset every ctime): shown, and reported on failure.
        patched = next(s for s in load_all(REPO / "patches") if s.name == SET).targets
        globs = " ".join(f"-o -path '*/{Path(f.path).parent}/__pycache__/{Path(f.path).stem}.*.pyc'" for f in patched)
        pyc = run(fresh, image, "sh", "-c", f"find / -xdev -false {globs}").stdout.split()
        print(f"\n.pyc of the patched files in the loaded image: {pyc or 'none'}")
        r = run(fresh, image, "m3fuse", "verify")
        assert r.returncode == 0, f"verify exit {r.returncode} after save/load\n{r.stdout}\n{r.stderr}\n.pyc: {pyc}"
        assert "verify: OK" in r.stdout
    finally:
        fresh.destroy()


def guard_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if "m3fuse guard:" in ln]
    assert len(lines) == 1, r.stdout + r.stderr
    return lines[0]


def test_the_guard_loads_in_the_images_vllm_python(podman, image):
    for mode in ("log", "strict"):
        r = run(podman, image, "python3", "-c", LOADER, env={"M3FUSE_GUARD": mode})
        assert r.returncode == 0 and "STARTED torch=False" in r.stdout, r.stdout + r.stderr
        line = guard_line(r)
        assert f"set {SET}, state patched, vllm {VLLM}" in line and "INFO" in line, line
    # The same loader on a reverted tree: the guard warns, and strict stops the process.
    revert_then = f"m3fuse revert >/dev/null && exec python3 -c '{LOADER}'"
    r = run(podman, image, "sh", "-c", revert_then)
    assert r.returncode == 0 and "WARNING" in guard_line(r) and "state pristine" in guard_line(r)
    r = run(podman, image, "sh", "-c", revert_then, env={"M3FUSE_GUARD": "strict"})
    assert r.returncode != 0 and "STARTED" not in r.stdout and "refuses to start" in r.stderr


def test_the_env_block_is_env_fused_of_the_image_and_reaches_its_processes(podman, image):
    text = (REPO / "Containerfile").read_text()
    block = text[text.index(ENV_BEGIN) + len(ENV_BEGIN):text.index(ENV_END)]
    fresh = run(podman, image, "m3fuse", "env", "fused", "--format", "docker")
    assert fresh.returncode == 0, fresh.stderr
    assert block == fresh.stdout, (f"the Containerfile's ENV block is not `m3fuse env fused --format docker` "
                                   f"of an image built from it (vLLM {VLLM}); replace it with:\n{fresh.stdout}")
    wanted = json.loads(run(podman, image, "m3fuse", "env", "fused", "--json").stdout)["env"]
    seen = json.loads(run(podman, image, "python3", "-c", "import os, json; print(json.dumps(dict(os.environ)))").stdout)
    assert wanted and {k: seen.get(k) for k in wanted} == wanted


@pytest.mark.parametrize("arg, value, says", [
    # No step of a Containerfile runs before FROM: podman's own refusal shows the value.
    ("BASE_IMAGE", "localhost/x;touch /pwned", "invalid reference format"),
    ("BASE_IMAGE", "localhost/x\nRUN touch /pwned", "invalid reference format"),
    ("M3FUSE_LOCK_FILE", "wheels.lock; touch /pwned", "build arg M3FUSE_LOCK_FILE must be"),
    ("M3FUSE_LOCK_FILE", "../../etc/passwd", "build arg M3FUSE_LOCK_FILE must be"),
    ("VLLM_PYTHON", "python3\ntouch /pwned", "build arg VLLM_PYTHON must be"),
])
def test_hostile_build_args_are_refused_cleanly(podman, base, context, arg, value, says):
    before = (podman.images(), podman.containers())
    args = {"BASE_IMAGE": base, arg: value}
    r = build(podman, context, "localhost/m3fuse-test:hostile", **args)
    assert r.returncode != 0
    assert says in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert (podman.images(), podman.containers()) == before  # nothing half-done
    assert not podman.exists("localhost/m3fuse-test:hostile")


def test_a_context_without_the_lock_is_refused_with_the_next_step(podman, base, context, tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for name in ("Containerfile", ".dockerignore"):
        shutil.copy2(context / name, ctx / name)
    shutil.copytree(context / "wheels", ctx / "wheels")
    # The steps before the failing check stay in the build cache, as any build's do; no image
    # is tagged and no container is left.
    before = (tagged(podman), podman.containers())
    r = build(podman, ctx, "localhost/m3fuse-test:nolock", BASE_IMAGE=base)
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert "the build context has no wheels.lock" in err and "copy wheels.lock" in err, err[-3000:]
    assert "cannot stat" not in err and "no such file" not in err and "Traceback" not in err
    assert (tagged(podman), podman.containers()) == before and not podman.exists("localhost/m3fuse-test:nolock")
    shutil.rmtree(ctx / "wheels")
    (ctx / "wheels.lock").write_text((context / "wheels.lock").read_text())
    r = build(podman, ctx, "localhost/m3fuse-test:nolock", BASE_IMAGE=base)
    assert r.returncode != 0 and "has no wheels/m3fuse-*.whl" in r.stdout + r.stderr
    assert "tools/image-wheels.sh" in r.stdout + r.stderr
    assert (tagged(podman), podman.containers()) == before


def tagged(podman) -> set[str]:
    """The named images (a failed build's cached steps are unnamed)."""
    names = podman.run("images", "--all", "--format", "{{.Repository}}:{{.Tag}} {{.Id}}").stdout.splitlines()
    return {n for n in names if not n.startswith("<none>:<none>")}


def image_id(podman, ref: str) -> str:
    return podman.run("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()


def with_marker(wheel: Path, marker: str) -> bytes:
    """The m3fuse wheel's bytes with one more module, m3fuse/image_marker.py, and a RECORD that
    lists it: a new m3fuse build under the same file name."""
    import io
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    record = next(n for n in members if n.endswith(".dist-info/RECORD"))
    members["m3fuse/image_marker.py"] = f"MARK = {marker!r}\n".encode()
    members[record] = "".join(f"{k},{_record_hash(v)},{len(v)}\n" for k, v in members.items()
                              if k != record).encode() + f"{record},,\n".encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for k, v in members.items():
            # The old member's ZipInfo keeps its mode: the `m3fuse` script must stay executable.
            zf.writestr(infos.get(k, k), v)
    return buf.getvalue()


def test_a_rebuild_with_the_cache_sees_a_new_lock_and_a_new_m3fuse_wheel(podman, context, image, tmp_path):
    """The stale-layer case: the install step's layer must follow its inputs. A bind mount of
    the context is no cache key in podman 4.3 (the old Containerfile reused the install layer
    after the lock changed, and verify in the image still read the old lock)."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for name in ("Containerfile", ".dockerignore", "wheels.lock"):
        shutil.copy2(context / name, ctx / name)
    shutil.copytree(context / "wheels", ctx / "wheels")
    tag = "localhost/m3fuse-test:rebuild"
    argv = ["build", "--network=none", "-f", str(ctx / "Containerfile"), "-t", tag, str(ctx)]
    # The same inputs: every layer from the cache, the very image the README sequence built.
    t0 = time.monotonic()
    same = podman.run(*argv)
    print(f"\ncached rebuild: {time.monotonic() - t0:.1f} s")
    assert image_id(podman, tag) == image_id(podman, image), same.stdout[-3000:]

    # A changed lock: the image changes, holds the new lock, and verify reads it.
    lock = ctx / "wheels.lock"
    lock.write_text(lock.read_text() + "# rebuilt: the lock changed\n")
    t0 = time.monotonic()
    podman.run(*argv)
    print(f"rebuild after a lock change: {time.monotonic() - t0:.0f} s")
    assert image_id(podman, tag) != image_id(podman, image)
    assert run(podman, tag, "cat", "/etc/m3fuse/wheels.lock").stdout == lock.read_text()
    v = run(podman, tag, "m3fuse", "verify", "--json")
    assert v.returncode == 0, v.stdout[-3000:] + v.stderr
    assert json.loads(v.stdout)["lock"] == {"path": "/etc/m3fuse/wheels.lock",
                                            "sha256": hashlib.sha256(lock.read_bytes()).hexdigest()}
    changed = image_id(podman, tag)

    # A new m3fuse wheel under the same file name: the image changes and runs the new m3fuse.
    (wheel,) = (ctx / "wheels").glob("m3fuse-*.whl")
    data = with_marker(wheel, "new build")
    wheel.unlink()
    wheel.write_bytes(data)
    podman.run(*argv)
    assert image_id(podman, tag) not in (changed, image_id(podman, image))
    r = run(podman, tag, "python3", "-c", "from m3fuse.image_marker import MARK; print(MARK)")
    assert r.stdout.strip() == "new build", r.stdout + r.stderr
    sums = run(podman, tag, "cat", "/etc/m3fuse/inputs.sha256").stdout
    assert f"{hashlib.sha256(data).hexdigest()}  wheels/{wheel.name}" in sums, sums
    verify_ok(podman, tag)
    podman.run("rmi", tag)


def test_the_dockerignore_keeps_venvs_demo_and_caches_out_of_the_context(podman, base, tmp_path):
    """What a build receives of a context shaped like this checkout: only what the image build
    reads (and the small source files), never the multi-GB venvs. Seen through COPY: podman
    4.3 applies .dockerignore there (a docker client applies it to the whole upload), not to
    a RUN step's bind mount, which reads the directory in place."""
    ctx = tmp_path / "ctx"
    junk = [".venv-test/bin/python", ".venv/lib/x.py", ".demo/vllm/x.py", ".git/HEAD", "m3fuse/__pycache__/cli.pyc",
            ".pytest_cache/v/x", ".hypothesis/x", "build/x", "dist/x.whl", "m3fuse.egg-info/PKG-INFO",
            "tests/test_x.py", "docs/x.md", "bench/x.py"]
    kept = ["wheels/m3fuse-0-py3-none-any.whl", "wheels.lock", "Containerfile", "m3fuse/cli.py"]
    for rel in junk + kept:
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx / rel).write_text("x\n")
    shutil.copy2(REPO / ".dockerignore", ctx / ".dockerignore")
    (tmp_path / "Listing").write_text(f"FROM {base}\nCOPY . /c\nRUN cd /c && find . -type f | sort\n")
    r = podman.run("build", "--network=none", "--no-cache", "--file", str(tmp_path / "Listing"), "--tag",
                   "localhost/m3fuse-test:listing", str(ctx))
    podman.run("rmi", "localhost/m3fuse-test:listing")
    seen = {ln[2:] for ln in r.stdout.splitlines() if ln.startswith("./")}
    assert seen & set(junk) == set() and set(kept) <= seen, sorted(seen)


def test_m3fuse_lock_names_the_default_lock(monkeypatch, tmp_path):
    from m3fuse import resources

    monkeypatch.delenv(resources.LOCK_ENV, raising=False)
    assert resources.default_lock().name == "wheels.lock" and resources.default_lock().is_file()
    monkeypatch.setenv(resources.LOCK_ENV, str(tmp_path / "image.lock"))
    assert resources.default_lock() == tmp_path / "image.lock"


def test_the_default_base_image_is_a_pinned_release_with_a_set():
    text = (REPO / "Containerfile").read_text()
    (ref,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    tag = ref.rsplit(":", 1)[1]
    assert tag != "latest" and re.fullmatch(r"v\d+\.\d+\.\d+", tag), ref
    assert any(tag[1:] in s.vllm_versions for s in load_all(REPO / "patches")), ref
