"""Real OCI images for the tests, made without any container registry: rootful podman with a
private configuration and storage root, and a base image bootstrapped from the host's own apt
sources with mmdebstrap, holding a real vLLM release wheel in its PEP 668-marked system Python.

The settings are those this kind of sandbox needs (runc, cgroupfs, ulimits it may grant) and
change nothing in /etc: podman and the RUN steps of its builds read them from
CONTAINERS_CONF / CONTAINERS_STORAGE_CONF. The base image is cached as a `podman save` tar
under the test cache, keyed by everything that built it, so a warm run only loads it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import realvllm
from conftest import REPO

CONTAINERS_CONF = """\
[containers]
# The sandbox cannot raise the hard limits podman asks for by default; nproc <= pid_max.
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
# crun refuses these machines' hybrid cgroup v1/v2 layout; runc does not.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

BASE_PACKAGES = ("python3", "python3-pip", "ca-certificates")
MMDEBSTRAP_OPTS = ("--variant=minbase", "--aptopt=Acquire::Check-Valid-Until \"false\"",
                   "--aptopt=Acquire::Check-Date \"false\"")
# The vLLM layer of the base: the release wheel without its dependencies (no torch), into the
# distribution's Python the way a ROCm image holds vLLM, past its PEP 668 marker.
VLLM_LAYER = """\
FROM {debian}
RUN --mount=type=bind,target=/w python3 -m pip install --no-cache-dir --disable-pip-version-check \\
    --break-system-packages --no-deps /w/{wheel}
"""
TOOLS_SCRIPT = REPO / "tools" / "container-tools.sh"
TIMEOUT = 1800  # stops a hang; a cold base with a build takes minutes


class PodmanError(AssertionError):
    pass


def ensure_tools() -> None:
    """podman & co. present, installed by tools/container-tools.sh if not; raises with the
    reason if they cannot be had (the image test must fail then, not skip)."""
    proc = subprocess.run(["bash", str(TOOLS_SCRIPT)], capture_output=True, text=True, timeout=900)
    missing = [t for t in ("podman", "mmdebstrap", "runc") if shutil.which(t) is None]
    if proc.returncode != 0 or missing:
        raise PodmanError(f"the image test needs podman, runc and mmdebstrap; {TOOLS_SCRIPT.name} could not "
                          f"provide {missing or 'them'} (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")


class Podman:
    """podman on a storage root of its own (graphroot, runroot and config under `root`)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        conf = self.root / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        storage = self.root / "storage.conf"
        storage.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{self.root / "storage"}"\n'
                           f'runroot = "{self.root / "run"}"\n')
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf), "CONTAINERS_STORAGE_CONF": str(storage)}

    def run(self, *args: str, check: bool = True, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
        proc = subprocess.run(["podman", *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise PodmanError(f"podman {' '.join(args)[:300]} failed (exit {proc.returncode}):\n"
                              f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def images(self) -> set[str]:
        return set(self.run("images", "--all", "--quiet", "--no-trunc").stdout.split())

    def containers(self) -> set[str]:
        """Every container, build containers included (a failed build must leave none)."""
        return set(self.run("ps", "--all", "--external", "--quiet", "--no-trunc").stdout.split())

    def exists(self, ref: str) -> bool:
        return self.run("image", "exists", ref, check=False).returncode == 0

    def destroy(self) -> None:
        """Every container and image removed, then the storage root (CI's disk must not fill)."""
        self.run("rm", "--all", "--force", check=False)
        self.run("rmi", "--all", "--force", check=False)
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(self.root) + "/")]
        for m in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def _apt_sources() -> list[Path]:
    """The host's enabled apt source files (mmdebstrap reads them: no mirror name is written)."""
    found = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    return [p for p in found if p.is_file() and p.suffix in (".list", ".sources") and p.read_text().strip()]


def _codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise PodmanError("/etc/os-release names no VERSION_CODENAME: no apt suite to bootstrap the base image from")


def base_image(podman: Podman, vllm_version: str) -> str:
    """localhost/m3fuse-test-base:vllm-X in `podman`'s storage: loaded from the cached tar, or
    bootstrapped, built and cached first. Returns the reference."""
    wheel = realvllm.wheel_path(vllm_version)
    suite, sources = _codename(), _apt_sources()
    recipe = {"suite": suite, "packages": BASE_PACKAGES, "mmdebstrap": MMDEBSTRAP_OPTS, "layer": VLLM_LAYER,
              "wheel": wheel.name, "wheel-size": wheel.stat().st_size,
              "sources": [p.read_text() for p in sources]}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    ref = f"localhost/m3fuse-test-base:vllm-{vllm_version}"
    cache = realvllm.cache_root() / "image-base"
    cache.mkdir(parents=True, exist_ok=True)
    tar = cache / f"vllm-{vllm_version}-{key}.tar"
    with open(cache / ".lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        if not tar.is_file():
            _build_base(podman, ref, wheel, suite, sources, tar)
            for old in cache.glob("vllm-*.tar"):  # one base per machine: a stale key is dead weight
                if old != tar:
                    old.unlink()
        else:
            podman.run("load", "--quiet", "--input", str(tar))
    return ref


def place_in_context(wheel: Path, ctx: Path) -> Path:
    """The wheel as a regular file in the build context (linked, else copied). A cache entry may
    be a symlink (a wheel built elsewhere, docs/releases.md): the build cannot follow a link out
    of its context, so the link is resolved first."""
    real = wheel.resolve(strict=True)
    dest = ctx / wheel.name
    try:
        os.link(real, dest)
    except OSError:
        shutil.copy2(real, dest)
    return dest


def _build_base(podman: Podman, ref: str, wheel: Path, suite: str, sources: list[Path], tar: Path) -> None:
    work = podman.root / "base-work"
    work.mkdir()
    rootfs = work / "rootfs.tar"
    cmd = ["mmdebstrap", *MMDEBSTRAP_OPTS, f"--include={','.join(BASE_PACKAGES)}", suite, str(rootfs),
           *map(str, sources)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        raise PodmanError(f"mmdebstrap could not bootstrap {suite} from the host's apt sources "
                          f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    debian = f"localhost/m3fuse-test-debian:{suite}"
    podman.run("import", "--quiet", str(rootfs), debian)
    rootfs.unlink()
    ctx = work / "ctx"
    ctx.mkdir()
    place_in_context(wheel, ctx)
    (ctx / "Containerfile").write_text(VLLM_LAYER.format(debian=debian, wheel=wheel.name))
    podman.run("build", "--network=none", "--quiet", "--tag", ref, str(ctx))
    podman.run("rmi", debian)
    part = tar.with_suffix(".partial")
    part.unlink(missing_ok=True)
    podman.run("save", "--quiet", "--output", str(part), ref)
    os.replace(part, tar)
    shutil.rmtree(work)
