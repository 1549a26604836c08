"""Install verified wheels with the target interpreter's own pip, and check what is installed.

Everything about the target environment is asked of the target interpreter in a subprocess
(it may be another Python than the one running m3fuse). One probe answers, per distribution:
the installed version and whether every file its RECORD lists still hashes correctly.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from .errors import EnvironmentProblem
from .lock import Lock
from .target import query_interpreter

# Runs in the target interpreter; argv[1] is a JSON list of distribution names, argv[2] the
# JSON list of those whose RECORD is to be checked (never torch: gigabytes, and not ours).
# RECORD hashes are urlsafe base64 of the digest without padding (PEP 376 / wheel spec).
_PROBE_SCRIPT = r"""
import base64, hashlib, json, os, sys
from importlib import metadata as md
names = json.loads(sys.argv[1])
check = set(json.loads(sys.argv[2]))
out = {}
for name in names:
    dist = None
    # Older importlib.metadata does not normalise names: try the dist-info spelling too.
    for cand in (name, name.replace("-", "_"), name.replace("_", "-")):
        try:
            dist = md.distribution(cand)
            break
        except md.PackageNotFoundError:
            pass
    if dist is None:
        out[name] = None
        continue
    info = {"version": dist.version, "problems": [], "files": 0}
    if name in check:
        files = dist.files
        if files is None:
            info["problems"].append("RECORD is missing")
        else:
            for f in files:
                info["files"] += 1
                if not f.hash:
                    continue
                p = dist.locate_file(f)
                try:
                    h = hashlib.new(f.hash.mode)
                    with open(p, "rb") as fh:
                        for b in iter(lambda: fh.read(1 << 20), b""):
                            h.update(b)
                except FileNotFoundError:
                    info["problems"].append("missing: %s" % f)
                    continue
                except (OSError, ValueError) as e:
                    info["problems"].append("unreadable: %s (%s)" % (f, e))
                    continue
                got = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
                if got != f.hash.value:
                    info["problems"].append("modified: %s" % f)
    out[name] = info
print(json.dumps(out))
"""


def probe(python: str, names: list[str], *, record: list[str] | None = None) -> dict[str, dict | None]:
    """{name: None if not installed, else {"version", "problems", "files"}}; RECORD hashes are
    checked for the names in `record` (default: all of `names`)."""
    return query_interpreter(python, _PROBE_SCRIPT, what="report its installed packages", timeout=300,
                             args=[json.dumps(names), json.dumps(names if record is None else record)])


def state_of(info: dict | None, version: str) -> str:
    from packaging.version import InvalidVersion, Version

    if info is None:
        return "missing"
    try:
        same = Version(info["version"]) == Version(version)
    except InvalidVersion:
        same = False
    if not same:
        return "wrong-version"
    if info["problems"]:
        return "record-mismatch"
    return "ok"


def pip_install(python: str, wheel: Path, sha256: str) -> None:
    """Install one verified wheel: no dependencies, no index, this file only, replacing any
    other version. pip checks the hash again itself (--require-hashes through a requirements
    file), so the file cannot be swapped between our check and its read."""
    with tempfile.TemporaryDirectory(prefix="m3fuse-pip-") as d:
        req = Path(d) / "requirements.txt"
        req.write_text(f"{wheel} --hash=sha256:{sha256}\n")
        cmd = [python, "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall",
               "--require-hashes", "--disable-pip-version-check", "--no-input", "--no-cache-dir",
               "-r", str(req)]
        env = dict(os.environ)
        # Index settings from the user's environment cannot matter with --no-index, but a
        # PIP_FIND_LINKS or PIP_CONSTRAINT could; drop them so only this file is considered.
        for k in ("PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_REQUIREMENT", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL"):
            env.pop(k, None)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=d, env=env)
        except OSError as exc:
            raise EnvironmentProblem(f"Running pip of the target Python {python} failed ({exc}).") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        raise EnvironmentProblem(
            f"pip of the target Python {python} failed to install {wheel.name} (exit {proc.returncode}): "
            f"{tail} Fix the cause (permissions, disk space, a missing pip: `{python} -m ensurepip`) "
            f"and run m3fuse install again; the wheel stays verified in the cache.")


def verify_wheels(lock: Lock, python: str) -> list[dict]:
    """For `m3fuse verify`: each pinned distribution installed, at the pinned version, with
    its RECORD-listed files intact. JSON-able, one dict per package in lock order."""
    info = probe(python, [p.name for p in lock.packages])
    results = []
    for p in lock.packages:
        i = info.get(p.name)
        state = state_of(i, p.version)
        problems: list[str] = []
        if state == "missing":
            problems.append(f"{p.name} is not installed in {python}")
        elif state == "wrong-version":
            problems.append(f"installed {p.name} is {i['version']}, the lock {lock.path} pins {p.version}")
        if i:
            problems.extend(i["problems"])
        results.append({
            "name": p.name,
            "expected_version": p.version,
            "installed_version": i["version"] if i else None,
            "state": state,
            "ok": state == "ok",
            "record_files": i["files"] if i else 0,
            "problems": problems,
        })
    return results
