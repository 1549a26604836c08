"""Install verified wheels with the target interpreter's own pip (one run for all of them),
and check what is installed.

Everything about the target environment is asked of the target interpreter in a subprocess
(it may be another Python than the one running m3fuse). One probe answers, per distribution,
the installed version and whether every file its RECORD lists still hashes correctly, and
whether the interpreter is externally managed (PEP 668).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import EnvironmentProblem
from .lock import Lock
from .. import interrupt, safeio
from ..target import query_interpreter, read_pth, resolve_python, venv_site

# One probe, run either inside the target interpreter (`python -c`, the general case) or here,
# in-process, when the answer can be read off the disk just as that interpreter would: the
# target is this interpreter, or a plain venv (m3fuse.target.venv_site) whose import path is
# its site-packages plus the folders its .pth files add. RECORD hashes are urlsafe base64 of
# the digest without padding (PEP 376 / wheel spec). Never torch's RECORD: gigabytes, not ours.
_PROBE_CODE = r"""
def m3fuse_probe(names, check, path, own):
    import base64, csv, hashlib, io, os, stat, sys, sysconfig
    # importlib.metadata only finds the dist-info folder (a directory listing); its METADATA
    # and RECORD are read here as m3fuse.safeio reads: a regular file only (lstat, then a
    # no-follow, non-blocking open checked again), bounded, strict UTF-8.
    from importlib import metadata as md

    def read_small(p, limit):
        if not stat.S_ISREG(os.lstat(p).st_mode):
            raise OSError("not a regular file")
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError("not a regular file")
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise OSError("larger than %d bytes" % limit)
        return data.decode("utf-8")

    def dist_file(dist, name, limit):
        where = getattr(dist, "_path", None)
        if where is None:
            return None
        try:
            return read_small(os.path.join(str(where), name), limit)
        except (OSError, ValueError):  # missing, not regular, too large, not UTF-8
            return None

    def version_of(dist):
        text = dist_file(dist, "METADATA", 1 << 20) or dist_file(dist, "PKG-INFO", 1 << 20) or ""
        for line in text.splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            if key.strip().lower() == "version":
                return value.strip()
        return None

    def record_of(dist):
        text = dist_file(dist, "RECORD", 64 << 20)
        if text is None:
            return None
        try:
            return [r for r in csv.reader(io.StringIO(text)) if r and r[0]]
        except csv.Error:
            return None

    MAX_HASHED = 2 << 30  # per file: AITER's and FlyDSL's largest are a few hundred MB
    managed = None
    if own:
        # PEP 668: the marker sits in the stdlib directory of the default scheme and does not
        # apply inside a virtual environment.
        try:
            stdlib = sysconfig.get_path("stdlib", sysconfig.get_default_scheme())
        except AttributeError:  # Python < 3.10
            stdlib = sysconfig.get_path("stdlib")
        marker = os.path.join(stdlib, "EXTERNALLY-MANAGED")
        if sys.prefix == getattr(sys, "base_prefix", sys.prefix) and os.path.isfile(marker):
            managed = marker
    check = set(check)
    out = {}
    for name in names:
        dist = None
        # Older importlib.metadata does not normalise names: try the dist-info spelling too.
        for cand in (name, name.replace("-", "_"), name.replace("_", "-")):
            dist = next(iter(md.distributions(name=cand, path=path if path is not None else sys.path)), None)
            if dist is not None:
                break
        if dist is None:
            out[name] = None
            continue
        version = version_of(dist)  # None when METADATA is missing, unreadable or names none
        try:
            root = str(dist.locate_file(""))
        except Exception:
            root = None
        info = {"version": version if isinstance(version, str) else None, "problems": [], "files": 0,
                "root": root}
        if name in check:
            files = record_of(dist) if root else None
            if files is None:
                info["problems"].append("RECORD is missing")
            else:
                for row in files:
                    info["files"] += 1
                    f = row[0]
                    mode, _, want = (row[1] if len(row) > 1 else "").partition("=")
                    if not want:
                        continue
                    # Only files inside site-packages are hashed: a RECORD row with '..' or an
                    # absolute path (a console script in bin/, or a planted /dev/zero) is not
                    # imported code, and following it could read anything or never end.
                    if os.path.isabs(f) or ".." in f.replace("\\", "/").split("/"):
                        continue
                    p = os.path.join(root, f)
                    try:
                        h = hashlib.new(mode)
                        st = os.lstat(p)
                        if not stat.S_ISREG(st.st_mode):
                            raise OSError("not a regular file")
                        size = row[2].strip() if len(row) > 2 else ""
                        if size.isdigit() and int(size) != st.st_size:  # judged before a byte is hashed
                            info["problems"].append("modified: %s (%d bytes, RECORD says %s)" % (f, st.st_size, size))
                            continue
                        if st.st_size > MAX_HASHED:
                            raise OSError("larger than the %d-byte limit m3fuse hashes" % MAX_HASHED)
                        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
                        with os.fdopen(fd, "rb") as fh:
                            if not stat.S_ISREG(os.fstat(fd).st_mode):
                                raise OSError("not a regular file")
                            n = 0
                            for b in iter(lambda: fh.read(1 << 20), b""):
                                h.update(b)
                                n += len(b)
                                if n > st.st_size:
                                    raise OSError("grew while it was read")
                    except FileNotFoundError:
                        info["problems"].append("missing: %s" % f)
                        continue
                    except (OSError, ValueError) as e:
                        info["problems"].append("unreadable: %s (%s)" % (f, e))
                        continue
                    got = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
                    if got != want:
                        info["problems"].append("modified: %s" % f)
        out[name] = info
    return {"dists": out, "externally_managed": managed}
"""
# In the target: argv[1] the JSON list of names, argv[2] those whose RECORD is checked.
_PROBE_SCRIPT = _PROBE_CODE + """
import json, sys
print(json.dumps(m3fuse_probe(json.loads(sys.argv[1]), json.loads(sys.argv[2]), None, True)))
"""


def _import_path(python: str) -> tuple[list[str] | None, bool] | None:
    """(the path importlib.metadata would search in `python`, whether it is this very
    interpreter) when it can be known without running it; None when it cannot."""
    exe = resolve_python(python)
    if os.path.abspath(exe) == os.path.abspath(sys.executable):
        # This interpreter: its own sys.path, minus the script's folder or the caller's
        # directory (the child would run in "/"), unless -P/PYTHONSAFEPATH left it out.
        keep_first = getattr(sys.flags, "safe_path", False)
        return (list(sys.path) if keep_first else list(sys.path[1:])), True
    site = venv_site(exe)
    if site is None:
        return None
    path = [str(site)]
    for pth in sorted(site.glob("*.pth")):  # as site.addpackage reads them: sorted, a folder per line
        try:
            lines = read_pth(pth).splitlines()
        except (OSError, safeio.Unsafe):
            return None
        for line in lines:
            line = line.rstrip()
            if not line or line.startswith(("#", "import ", "import\t")):
                continue
            d = os.path.normpath(os.path.join(site, line))
            if os.path.isdir(d) and d not in path:
                path.append(d)
    return path, False


def probe(python: str, names: list[str], *, record: list[str] | None = None) -> dict:
    """{"dists": {name: None if not installed, else {"version", "problems", "files"}},
    "externally_managed": the PEP 668 marker path or None}; RECORD hashes are checked for the
    names in `record` (default: all of `names`). In-process where _import_path allows (no
    second interpreter start), else in the target interpreter."""
    check = names if record is None else record
    known = _import_path(python)
    if known is not None:
        path, own = known
        ns: dict = {}
        exec(compile(_PROBE_CODE, "<m3fuse probe>", "exec"), ns)  # noqa: S102 - our own code, see above
        return ns["m3fuse_probe"](names, check, path, own)
    return query_interpreter(python, _PROBE_SCRIPT, what="report its installed packages", timeout=300,
                             args=[json.dumps(names), json.dumps(check)])


def install_dir(python: str) -> Path:
    """The folder pip installs `python`'s packages into (its purelib): the wheel step's run
    lock is taken on it, so two m3fuse runs never run two pips into one environment. Known
    without a child process for this interpreter and for a plain venv."""
    known = _import_path(python)
    if known is not None and known[1]:
        import sysconfig

        return Path(sysconfig.get_path("purelib"))
    exe = resolve_python(python)
    site = venv_site(exe)
    if site is not None:
        return site
    got = query_interpreter(python, "import json, sysconfig; print(json.dumps({'purelib': sysconfig.get_path('purelib')}))",
                            what="name its site-packages folder")
    return Path(str(got.get("purelib")))


def versions(python: str, names: list[str]) -> dict[str, str | None]:
    """{name: installed version or None}, RECORD not checked."""
    return {n: (i or {}).get("version") for n, i in probe(python, names, record=[])["dists"].items()}


def state_of(info: dict | None, version: str) -> str:
    from packaging.version import InvalidVersion, Version

    if info is None:
        return "missing"
    try:
        same = Version(info["version"]) == Version(version)
    except (InvalidVersion, TypeError):  # not PEP 440, or no version at all (METADATA missing)
        same = False
    if not same:
        return "wrong-version"
    if info["problems"]:
        return "record-mismatch"
    return "ok"


def pip_install(python: str, wheels: list[tuple[Path, str]], *, break_system_packages: bool = False) -> None:
    """Install verified wheels [(file, sha256), ...] in one pip run: no dependencies, no index,
    these files only, replacing any other version. pip checks every hash again itself
    (--require-hashes through a requirements file), so a file cannot be swapped between our
    check and its read. Raises PipFailed with pip's exit status and output."""
    with tempfile.TemporaryDirectory(prefix="m3fuse-pip-") as d:
        req = Path(d) / "requirements.txt"
        req.write_text("".join(f"{w} --hash=sha256:{sha}\n" for w, sha in wheels))
        cmd = [python, "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall",
               "--require-hashes", "--disable-pip-version-check", "--no-input", "--no-cache-dir",
               "-r", str(req)]
        if break_system_packages:
            cmd.append("--break-system-packages")
        env = dict(os.environ)
        # Index settings from the user's environment cannot matter with --no-index, but a
        # PIP_FIND_LINKS or PIP_CONSTRAINT could; drop them so only these files are considered.
        for k in ("PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_REQUIREMENT", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL"):
            env.pop(k, None)
        try:
            # pip is putting files in place: an interrupt waits for it (a Ctrl-C from the
            # terminal reaches pip too, which stops cleanly by itself).
            with interrupt.deferred():
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=d, env=env)
        except OSError as exc:
            raise EnvironmentProblem(headline="running pip of the target Python failed",
                                     details=[("python", python), ("error", str(exc))],
                                     hint=f"check that {python} runs and has pip (`{python} -m ensurepip`)") from None
    if proc.returncode != 0:
        # pip names the order it installs in ("Installing collected packages: a, b"); after a
        # failure that tells which wheels it got through.
        order = next((ln.split(":", 1)[1] for ln in proc.stdout.splitlines()
                      if ln.startswith("Installing collected packages:")), "")
        raise PipFailed(proc.returncode, (proc.stderr.strip() or proc.stdout.strip())[-2000:],
                        [n.strip() for n in order.split(",") if n.strip()])


class PipFailed(Exception):
    """pip exited non-zero; the wheel step turns this into an EnvironmentProblem that says what changed."""

    def __init__(self, code: int, output: str, order: list[str] | None = None) -> None:
        super().__init__(output)
        self.code, self.output, self.order = code, output, order or []


def verify_wheels(lock: Lock, python: str, info: dict | None = None) -> list[dict]:
    """For `m3fuse verify`: each pinned distribution installed, at the pinned version, with
    its RECORD-listed files intact. JSON-able, one dict per package in lock order. `info`: the
    probe's "dists" when the caller has probed already."""
    if info is None:
        info = probe(python, [p.name for p in lock.packages])["dists"]
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
