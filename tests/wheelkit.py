"""Test helpers for the wheel half: small valid wheels, a loopback HTTP server with injected
faults, real venvs, and the two real public wheels (downloaded once into the test cache).

Everything served here listens on 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import fcntl
import gzip as gzip_module
import hashlib
import http.server
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

# ------------------------------------------------------------------------------- wheels


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_wheel(directory: Path, name: str, version: str, files: dict[str, bytes | str] | None = None, *,
                tag: str = "py3-none-any", meta_name: str | None = None, meta_version: str | None = None,
                raw_members: dict[str, bytes] | None = None, filename: str | None = None) -> Path:
    """A small but valid wheel (METADATA, WHEEL, RECORD with real hashes) that pip installs.
    meta_name/meta_version let METADATA disagree with the file name; raw_members adds
    members outside RECORD (unsafe paths for the archive check)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dist = name.replace("-", "_").replace(".", "_")
    files = dict(files or {f"{dist}/__init__.py": f"__version__ = {version!r}\n"})
    info = f"{dist}-{version}.dist-info"
    members: dict[str, bytes] = {k: (v.encode() if isinstance(v, str) else v) for k, v in files.items()}
    members[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: {meta_name or name}\n"
                                   f"Version: {meta_version or version}\nSummary: m3fuse test wheel\n\n").encode()
    members[f"{info}/WHEEL"] = (f"Wheel-Version: 1.0\nGenerator: m3fuse-tests\nRoot-Is-Purelib: true\n"
                                f"Tag: {tag}\n").encode()
    record = "".join(f"{k},{_record_hash(v)},{len(v)}\n" for k, v in members.items()) + f"{info}/RECORD,,\n"
    members[f"{info}/RECORD"] = record.encode()
    out = directory / (filename or f"{dist}-{version}-{tag}.whl")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for k, v in members.items():
            zf.writestr(k, v)
        for k, v in (raw_members or {}).items():
            zf.writestr(zipfile.ZipInfo(k), v)
    return out


def aiter_source(use_1stage: bool = True, pool: bool = True) -> str:
    """custom_all_reduce.py shaped like AITER's: the fused method and the IPC pool."""
    p1 = "        use_1stage: bool = False,\n" if use_1stage else ""
    pool_init = "        self._pool = IpcBufferPool(max_size)\n" if pool else "        self.buffer = None\n"
    pool_use = "        buf = self._pool.get(inp.numel())\n" if pool else "        buf = self.buffer\n"
    return (
        "from typing import Optional\n\n\n"
        "class IpcBufferPool:\n    def __init__(self, n):\n        self.n = n\n\n\n"
        "class CustomAllreduce:\n"
        "    def __init__(self, group, device, max_size=8192 * 1024):\n"
        f"{pool_init}"
        "\n    def fused_ar_rms(\n        self,\n        inp,\n        res_inp,\n        *,\n"
        "        res_out: Optional[object] = None,\n        out: Optional[object] = None,\n"
        "        w,\n        eps: float,\n        registered: bool = False,\n"
        f"{p1}"
        "    ):\n"
        f"{pool_use}"
        "        return out, res_out\n")


def aiter_wheel(directory: Path, version: str = "0.1.15.post1+test", *, use_1stage: bool = True,
                pool: bool = True, include_module: bool = True, **kw) -> Path:
    files: dict[str, bytes | str] = {
        "aiter/__init__.py": "",
        "aiter/dist/__init__.py": "",
        "aiter/dist/device_communicators/__init__.py": "",
    }
    if include_module:
        files["aiter/dist/device_communicators/custom_all_reduce.py"] = aiter_source(use_1stage, pool)
    return build_wheel(directory, "amd-aiter", version, files, **kw)


# The fused path's methods as AITER >= 0.1.17 has them (gemma_norm; v0.1.19+ signatures).
NEWER_API = (
    "\n    def custom_fused_ar_rms(self, input, residual_inp, weight, eps, use_1stage=False, out_hidden_dim=0,\n"
    "                            gemma_norm=False):\n        return None\n"
    "\n    def all_gather_unreg(self, inp, out=None, dim=0):\n        return inp\n")



def aiter_build(directory: Path, version: str, modules: list[str], *, gemma_norm: bool = True) -> Path:
    """An AITER wheel shaped like a real one: the fused-path API and these modules (as packages)."""
    files: dict[str, bytes | str] = {"aiter/__init__.py": "", "aiter/dist/__init__.py": "",
                                     "aiter/dist/device_communicators/__init__.py": "",
                                     "aiter/dist/device_communicators/custom_all_reduce.py":
                                         aiter_source() + (NEWER_API if gemma_norm else "")}
    return build_wheel(directory, "amd-aiter", version, package_files(modules, files))


def needed_modules(set_name: str, dist: str = "amd-aiter") -> list[str]:
    """The modules a shipped set's release needs of `dist` (its aiter-needs.toml), or none."""
    from conftest import REPO
    from m3fuse.wheels.needs import load_needs

    needs = load_needs(REPO / "patches" / set_name)
    got = needs.get(dist) if needs is not None else None
    return list(got.modules) if got is not None else []


def package_files(modules: list[str], files: dict[str, bytes | str]) -> dict[str, bytes | str]:
    """`files` plus an empty package (`a/b/__init__.py`) for every dotted module and its parents."""
    files = dict(files)
    for m in modules:
        parts = m.split(".")
        for i in range(1, len(parts) + 1):
            files.setdefault("/".join(parts[:i]) + "/__init__.py", "")
    return files



def lock_text(entries: list[tuple[str, str, list[tuple[Path, str]]]], *, sizes: bool = True) -> str:
    """A lock for [(name, version, [(wheel_path, url), ...]), ...]."""
    out = ['lock-version = "1.0"', 'created-by = "m3fuse-tests"']
    for name, version, wheels in entries:
        out += ["", "[[packages]]", f'name = "{name}"', f'version = "{version}"']
        for path, url in wheels:
            out += ["", "[[packages.wheels]]", f'name = "{Path(path).name}"', f'url = "{url}"']
            if sizes:
                out.append(f"size = {Path(path).stat().st_size}")
            out.append(f'hashes = {{ sha256 = "{sha256_of(path)}" }}')
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------- fault server

FAULTS = ("ok", "drop", "500", "503-then-ok", "wrong", "short", "stall", "slow", "nolength", "404", "bigger",
          "429", "416", "badrange", "reset", "cut", "drip", "garbled")  # and any other HTTP status, as digits


@dataclass
class Served:
    data: bytes
    plan: list[str] = field(default_factory=list)  # one fault per request, then "ok"


class FaultServer:
    """stdlib http.server in a thread on 127.0.0.1 with per-file fault plans.

    Faults: drop (full Content-Length, half the body, then the connection closes), 500 / 503
    (error status), wrong (same length, other bytes), short (a consistently truncated file,
    honest Content-Length), bigger (extra bytes), stall (no body for `stall_s` seconds, longer
    than the client's read timeout), slow (body trickled in small pieces, within the
    timeout), nolength (no Content-Length; close ends the body), 404; any other number (that
    status, 429 and 416 say), badrange (206 whose Content-Range starts elsewhere than asked), reset (half the
    body, then a TCP reset), cut (no Content-Length, half the body, then close), drip (one byte
    every `drip_s`, 30 of them, then close), garbled (with `gzip`, a body that is not gzip).
    Range requests are honoured when `range_ok` is true, ignored (200 + whole file) otherwise.
    With `gzip` every body is sent gzip-compressed (Content-Encoding: gzip), after the Range cut."""

    def __init__(self, range_ok: bool = True, stall_s: float = 1.5, gzip: bool = False, drip_s: float = 0.2) -> None:
        self.files: dict[str, Served] = {}
        self.range_ok = range_ok
        self.stall_s = stall_s
        self.drip_s = drip_s
        self.gzip = gzip
        self.log: list[tuple[str, str | None, str, int]] = []  # path, Range, fault, status
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *a):  # keep test output clean
                pass

            def do_GET(self):  # noqa: N802
                path = unquote(self.path.split("?", 1)[0])
                with server._lock:
                    served = server.files.get(path)
                    fault = served.plan.pop(0) if served and served.plan else "ok"
                rng = self.headers.get("Range")
                if served is None or fault == "404":
                    server.log.append((path, rng, fault, 404))
                    self.send_error(404)
                    return
                if fault == "503-then-ok" or fault.isdigit():
                    code = 503 if fault == "503-then-ok" else int(fault)
                    server.log.append((path, rng, fault, code))
                    self.send_error(code)
                    return
                data = served.data
                if fault == "wrong":
                    data = bytes(b ^ 0x5A for b in data)
                elif fault == "short":
                    data = data[: len(data) // 2]
                elif fault == "bigger":
                    data = data + b"\0" * 1024
                start = 0
                status = 200
                if rng and server.range_ok and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                    if start >= len(data):
                        server.log.append((path, rng, fault, 416))
                        self.send_error(416)
                        return
                    status = 206
                body = data[start:]
                if server.gzip:
                    body = b"not gzip at all" * 8 if fault == "garbled" else gzip_module.compress(body)
                server.log.append((path, rng, fault, status))
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                if server.gzip:
                    self.send_header("Content-Encoding", "gzip")
                if fault not in ("nolength", "cut"):
                    self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    first = start + 1 if fault == "badrange" else start
                    self.send_header("Content-Range", f"bytes {first}-{len(data) - 1}/{len(data)}")
                if server.range_ok:
                    self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                try:
                    if fault in ("drop", "cut", "reset"):
                        self.wfile.write(body[: max(1, len(body) // 2)])
                        self.wfile.flush()
                        if fault == "reset":  # SO_LINGER 0: close() sends RST, the reader gets ECONNRESET
                            time.sleep(0.05)
                            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                            self.connection.close()
                        else:
                            self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    if fault == "drip":
                        for i in range(min(len(body), 30)):
                            self.wfile.write(body[i:i + 1])
                            self.wfile.flush()
                            time.sleep(server.drip_s)
                        return
                    if fault == "stall":
                        time.sleep(server.stall_s)
                    if fault == "slow":
                        step = max(1, len(body) // 8)
                        for i in range(0, len(body), step):
                            self.wfile.write(body[i:i + step])
                            self.wfile.flush()
                            time.sleep(0.05)
                        return
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        # A short poll: shutdown() waits for it, once per server (0.5 s by default).
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> "FaultServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add(self, name: str, data: bytes, plan: list[str] | None = None) -> str:
        """Serve `data` as /wheels/<name>; returns its URL (with + quoted as %2B)."""
        path = f"/wheels/{name}"
        self.files[path] = Served(data, list(plan or []))
        return self.url(name)

    def pin(self, dist: str, version: str, wheel: Path,
            plan: list[str] | None = None) -> tuple[str, str, list[tuple[Path, str]]]:
        """Serve `wheel` (with `plan`'s faults) and return its lock_text() entry: one file, here."""
        return dist, version, [(wheel, self.add(wheel.name, wheel.read_bytes(), plan))]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/wheels/{quote(name)}"

    def set_plan(self, name: str, plan: list[str]) -> None:
        self.files[f"/wheels/{name}"].plan = list(plan)


def served_lock(tmp_path: Path, srv: FaultServer, *, fly: tuple[str, str, dict[str, bytes | str]],
                aiter: str, extra: str = "") -> Path:
    """A lock in tmp_path pinning a FlyDSL stand-in (name, version, files) and an AITER stand-in,
    both served by `srv`; `extra` is appended (a [tool.m3fuse] table, say)."""
    w = tmp_path / "wheels"
    name, version, files = fly
    fly_wheel = build_wheel(w, name, version, files)
    lock = tmp_path / "test.lock"
    lock.write_text(lock_text([srv.pin(name, version, fly_wheel),
                               srv.pin("amd-aiter", aiter, aiter_wheel(w, aiter))]) + extra)
    return lock

# -------------------------------------------------------------------------------- venvs


def make_venv(path: Path, python: str = sys.executable) -> Path:
    """A real venv with pip; returns its python."""
    subprocess.run([python, "-m", "venv", str(path)], check=True, capture_output=True)
    return path / "bin" / "python"


def clone_venv(template: Path, dest: Path) -> Path:
    """Copy a template venv (bin/python is a symlink to the base interpreter and pyvenv.cfg
    sits beside bin/, so the copy is a working venv of its own); returns its python."""
    shutil.copytree(template, dest, symlinks=True)
    return dest / "bin" / "python"


def make_system_python(dest: Path, *, externally_managed: bool = True) -> Path:
    """A Python installation that is NOT a virtual environment (sys.prefix == sys.base_prefix),
    as a distribution's /usr is, built from the running interpreter's own parts: a copy of its
    executable, its stdlib entries linked in, an empty site-packages of its own (plus the test
    venv's pip), and with externally_managed the PEP 668 marker in its stdlib directory. A venv
    cannot serve here: PEP 668 (and pip) ignore the marker inside one. Returns its python."""
    import sysconfig

    base = Path(sys.base_prefix)
    ver = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    stdlib = Path(sysconfig.get_path("stdlib", vars={"installed_base": str(base)}))
    (dest / "bin").mkdir(parents=True)
    lib = dest / "lib" / ver
    (lib / "site-packages").mkdir(parents=True)
    for entry in stdlib.iterdir():
        if entry.name != "site-packages":
            (lib / entry.name).symlink_to(entry)
    for so in (base / "lib").glob("libpython*"):  # a relative rpath ($ORIGIN/../lib) must find it too
        (dest / "lib" / so.name).symlink_to(so)
    exe = dest / "bin" / "python3"
    shutil.copy2(os.path.realpath(sys._base_executable if hasattr(sys, "_base_executable") else sys.executable), exe)
    import pip

    (lib / "site-packages" / "pip").symlink_to(Path(pip.__file__).parent)
    if externally_managed:
        (lib / "EXTERNALLY-MANAGED").write_text("[externally-managed]\nError=managed by the test's pretend OS\n")
    return exe


def installed(python: Path | str, name: str) -> str | None:
    code = ("import sys\nfrom importlib import metadata as m\n"
            "try:\n print(m.version(sys.argv[1]))\nexcept m.PackageNotFoundError:\n print('')")
    out = subprocess.run([str(python), "-c", code, name], capture_output=True, text=True, check=True)
    return out.stdout.strip() or None


# ------------------------------------------------------------------- real public wheels


def cache_root() -> Path:
    root = Path(os.environ.get("M3FUSE_TEST_CACHE", Path.home() / ".cache" / "m3fuse-tests"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def real_wheel(spec: str, pattern: str, *pip_args: str) -> Path:
    """`pip download --no-deps <pip_args> <spec>` once per machine into the test cache.
    A failed download is an error, never a skip: these tests exist to run on real bytes."""
    key = spec.replace("=", "_")
    dest = cache_root() / "wheels" / key
    dest.mkdir(parents=True, exist_ok=True)
    with open(cache_root() / f".{key}.lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        found = sorted(dest.glob(pattern))
        if found:
            return found[0]
        part = dest / ".partial"
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               *pip_args, spec, "-d", str(part)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(part.glob(pattern))
        if proc.returncode != 0 or not got:
            raise RuntimeError(f"could not download {spec} for the tests (pip exit {proc.returncode}):\n"
                               f"{proc.stderr[-2000:]}")
        final = dest / got[0].name
        os.replace(got[0], final)
        shutil.rmtree(part, ignore_errors=True)
        return final


def real_flydsl() -> Path:
    return real_wheel("flydsl==0.5.0", "flydsl-0.5.0-*.whl", "--only-binary=:all:")


def real_old_aiter() -> Path:
    return real_wheel("amd-aiter==0.1.7.post2.dev18", "amd_aiter-0.1.7.post2.dev18-*.whl", "--pre")


def cache_is_clean(root: Path) -> list[str]:
    """Problems with an m3fuse cache: leftover temp files, or a cached file whose bytes do
    not hash to the sha256 its path names (an unverified file in the cache)."""
    problems = []
    tmp = root / "tmp"
    if tmp.is_dir():
        problems += [f"temp file left: {p}" for p in tmp.iterdir()]
    wheels = root / "wheels" / "sha256"
    if wheels.is_dir():
        for p in wheels.rglob("*"):
            if p.is_file() and sha256_of(p) != p.parent.name:
                problems.append(f"unverified cached file: {p}")
    return problems
