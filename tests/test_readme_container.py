"""README's container-build recipe, run: the `m3fuse` command lines of its Dockerfile and of its
CI step are extracted from README.md and run as written (image paths mapped to a real venv that
holds the real vllm 0.26.0, and a test lock on a loopback wheel server), so the recipe cannot
rot. The fetch stage reaches the server; the install stage runs after the server is gone."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import realvllm
import venvs
from conftest import REPO, run_cli
from wheelkit import FaultServer, aiter_wheel, build_wheel, installed, lock_text

pytestmark = pytest.mark.slow

AITER_V = "0.1.15.post1+rocm7.2.readme"
FLY_V = "0.1.9.dev1+readme"


def recipe() -> tuple[list[list[str]], list[str]]:
    """(every m3fuse command of the Dockerfile, in order; the CI step's m3fuse arguments)."""
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Container build\n")
    section = text[start:text.index("\n## ", start + 1)]
    (dockerfile,) = re.findall(r"```dockerfile\n(.*?)```", section, re.S)
    commands = []
    for line in dockerfile.replace("\\\n", " ").splitlines():
        if not line.startswith("RUN "):
            continue
        for part in line[4:].split("&&"):
            argv = shlex.split(part)
            if argv and Path(argv[0]).name == "m3fuse":
                commands.append(argv)
    (ci,) = [ln for block in re.findall(r"```sh\n(.*?)```", section, re.S) for ln in block.splitlines()
             if ln.startswith("docker run ")]
    argv = shlex.split(ci)
    assert argv[argv.index("--entrypoint") + 1] == "m3fuse"
    i = 2
    while argv[i].startswith("-"):
        i += 2 if argv[i] == "--entrypoint" else 1
    return commands, ["m3fuse", *argv[i + 1:]]  # the entrypoint, then what follows the image name


def test_the_readme_recipe_runs(tmp_path):
    commands, ci = recipe()
    assert [c[1] for c in commands] == ["fetch", "install"] and ci[1] == "verify"

    py = venvs.make_venv(tmp_path / "image-python")  # stands for the image's /usr/bin/python3
    venvs.pip(py, "install", "--no-deps", "--no-index", str(realvllm.wheel_path("0.26.0")))
    fly = build_wheel(tmp_path / "w", "flydsl", FLY_V, {"flydsl/__init__.py": "X = 1\n"})
    aiter = aiter_wheel(tmp_path / "w", AITER_V)
    lock = tmp_path / "test.lock"
    paths = {"/wheels": str(tmp_path / "wheels"), "/usr/bin/python3": str(py)}

    def run(argv: list[str], *extra: str):
        args = [paths.get(a, a) for a in argv[1:]]
        r = run_cli(*args, "--lock", str(lock), *extra)
        assert r.returncode == 0, (argv, r.stdout, r.stderr)
        return r

    with FaultServer() as srv:
        lock.write_text(lock_text([("flydsl", FLY_V, [(fly, srv.add(fly.name, fly.read_bytes()))]),
                                   ("amd-aiter", AITER_V, [(aiter, srv.add(aiter.name, aiter.read_bytes()))])]))
        run(commands[0], "--cache-dir", str(tmp_path / "fetch-cache"))  # stage 1, with network
        assert sorted(p.name for p in (tmp_path / "wheels").iterdir()) == sorted([fly.name, aiter.name])
        hits = len(srv.log)
    # Stage 2: the wheel server is gone; only the fetched folder is there.
    r = run(commands[1], "--cache-dir", str(tmp_path / "image-cache"))
    assert installed(py, "flydsl") == FLY_V and installed(py, "amd-aiter") == AITER_V
    assert "patched" in r.stdout and hits == 2
    # The CI step.
    r = run(ci)
    assert "verify: OK" in r.stdout
