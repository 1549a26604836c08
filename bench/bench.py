#!/usr/bin/env python3
"""m3fuse against its baselines, side by side, as ratios (issue 7).

Every figure is measured on this machine against its baseline in the same run: a warm-up
first, then several repetitions with m3fuse and baseline interleaved (A B A B ...), so a
neighbour's load hits both sides alike. The table shows medians, min-max, the ratio of the
medians, the goal and PASS/MISS; `--json` prints everything (IQR too) as one object.

Set-up, all inside one temp dir removed at the end:
- a real venv with the real vllm 0.26.0 wheel installed `--no-deps` (the wheel is cached in
  ~/.cache/m3fuse-tests by tests/realvllm.py), m3fuse on its path (a .pth to this checkout
  and to the running interpreter's site-packages, since nothing may be downloaded) and an
  `m3fuse` command written as an installer writes it (bin/m3fuse);
- small test wheels of the two pinned distributions (flydsl, amd-aiter, tests/wheelkit.py
  builders) and a test lock pointing at a loopback HTTP server (tests/wheelkit.py's server,
  run in its own process, 127.0.0.1 only); `m3fuse install` with that lock puts the pins in
  the venv and patches vLLM with the shipped sets (patches/vllm-0.26.0 matches);
- one big hash file, one big download file, two big random-payload wheels.

Nothing here is a test: speed goals are not asserted anywhere (tests/test_bench.py only
checks that the script runs and reports every figure).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

MiB = 1 << 20
FIGURES = ("verify_latency", "verify_with_wheels", "idempotent_install", "verify_10_vs_3_sets", "hashing", "download",
           "cold_install")


@dataclass
class Config:
    quick: bool
    latency_reps: int
    latency_warmup: int
    big_reps: int
    hash_mib: int
    download_mib: int
    wheel_mib: int
    cold_reps: int


def config(quick: bool, reps: int | None) -> Config:
    if quick:
        c = Config(True, 3, 1, 2, 16, 8, 4, 1)
    else:
        c = Config(False, 20, 3, 5, 1024, 200, 100, 3)
    if reps:
        c.latency_reps = c.big_reps = c.cold_reps = reps
    return c


# ----------------------------------------------------------------------------- statistics


def summary(samples: list[float]) -> dict:
    s = sorted(samples)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"n": len(s), "median": statistics.median(s), "min": s[0], "max": s[-1], "q1": q[0], "q3": q[2],
            "samples": s}


@dataclass
class Figure:
    name: str
    title: str
    m3fuse_what: str
    baseline_what: str
    kind: str  # "wall": ratio = m3fuse / baseline (lower is better); "throughput": the inverse
    goal: float
    size_bytes: int | None = None
    m3fuse: dict | None = None
    baseline: dict | None = None
    note: str = ""
    skipped: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.m3fuse or not self.baseline:
            return None
        m, b = self.m3fuse["median"], self.baseline["median"]
        return m / b if self.kind == "wall" else b / m

    @property
    def passed(self) -> bool | None:
        r = self.ratio
        if r is None:
            return None
        return r <= self.goal if self.kind == "wall" else r >= self.goal

    def goal_text(self) -> str:
        return f"<= {self.goal:g}x" if self.kind == "wall" else f">= {self.goal:g}x"

    def to_json(self) -> dict:
        out = {"name": self.name, "title": self.title, "m3fuse_what": self.m3fuse_what,
               "baseline_what": self.baseline_what, "kind": self.kind, "unit": "s",
               "ratio_definition": ("m3fuse median / baseline median (wall time)" if self.kind == "wall" else
                                    "baseline median time / m3fuse median time (= throughput ratio)"),
               "goal": self.goal_text(), "ratio": self.ratio, "pass": self.passed, "note": self.note,
               "skipped": self.skipped or None, "size_bytes": self.size_bytes}
        for side in ("m3fuse", "baseline"):
            st = getattr(self, side)
            out[side] = st
            if st and self.size_bytes:
                st["median_mb_per_s"] = self.size_bytes / st["median"] / 1e6
        return out


def measure(m3: Callable[[], None], base: Callable[[], None], reps: int, warmup: int,
            before: Callable[[], None] | None = None) -> tuple[dict, dict]:
    """Interleaved A/B timing; `before` runs untimed before every single run (clean-up)."""
    def timed(fn: Callable[[], None]) -> float:
        if before:
            before()
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    for _ in range(warmup):
        timed(m3)
        timed(base)
    a: list[float] = []
    b: list[float] = []
    for i in range(reps):
        # Alternate who goes first, so neither side always runs right after the other's cache effects.
        if i % 2:
            b.append(timed(base))
            a.append(timed(m3))
        else:
            a.append(timed(m3))
            b.append(timed(base))
    return summary(a), summary(b)


def run(cmd: list[str], env: dict, cwd: Path, *, ok=(0,)) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    if p.returncode not in ok:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p


# ------------------------------------------------------------------------------- loopback


def serve(directory: str) -> None:
    """Child process: wheelkit's loopback server holding every file of `directory` in memory.
    Prints the port, serves until stdin closes."""
    import wheelkit

    srv = wheelkit.FaultServer()
    for p in sorted(Path(directory).iterdir()):
        if p.is_file():
            srv.add(p.name, p.read_bytes())
    with srv:
        print(srv.port, flush=True)
        sys.stdin.read()


class Server:
    def __init__(self, directory: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--_serve", str(directory)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError("the loopback server did not start")
        self.port = int(line)

    def url(self, name: str) -> str:
        from urllib.parse import quote

        return f"http://127.0.0.1:{self.port}/wheels/{quote(name)}"

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - it must go, however
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------------- set-up


def install_command(python: Path, bin_dir: Path) -> Path:
    """The `m3fuse` command as an installer writes it from the wheel: the repository's
    bin/m3fuse with its shebang pointed at the venv's Python."""
    body = (REPO / "bin" / "m3fuse").read_text().split("\n", 1)[1]
    m3 = bin_dir / "m3fuse"
    m3.write_text(f"#!{python}\n{body}")
    m3.chmod(0o755)
    return m3


def write_random(path: Path, size: int) -> None:
    """Incompressible bytes, written in 16 MiB blocks (urandom for every block is slow to make
    and buys nothing: no compressor sees across 16 MiB)."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n


@dataclass
class Setup:
    tmp: Path
    env: dict
    venv_python: Path
    m3fuse: Path
    site: Path
    small_lock: Path
    big_lock: Path
    big_urls: list[str]
    template: Path
    hash_file: Path
    dl_name: str
    dl_sha: str
    dl_size: int
    server: Server
    log: Callable[[str], None]


def make_setup(tmp: Path, cfg: Config, log: Callable[[str], None]) -> Setup:
    import realvllm
    import wheelkit

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "PYTHON")) and k not in ("VIRTUAL_ENV",)}
    # Nothing may reach a package index: pip runs offline, with no self-check.
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", XDG_CACHE_HOME=str(tmp / "xdg-cache"))

    log("venv with vllm 0.26.0 (real wheel, --no-deps) ...")
    vllm_whl = realvllm.wheel_path("0.26.0")
    py = wheelkit.make_venv(tmp / "venv")
    run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", vllm_whl], env, tmp)
    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env, tmp).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_m3fuse_bench.pth").write_text("\n".join([str(REPO), *sorted(deps)]) + "\n")
    m3 = install_command(py, py.parent)

    log("test wheels and files ...")
    served = tmp / "served"
    served.mkdir()
    small = [wheelkit.build_wheel(served, "flydsl", "0.1.9+bench"),
             wheelkit.aiter_wheel(served, "0.1.15.post1+bench")]
    big = []
    for n in ("a", "b"):
        payload = tmp / f"payload-{n}.bin"
        write_random(payload, cfg.wheel_mib * MiB)
        big.append(wheelkit.build_wheel(served, f"m3bench-big-{n}", "1.0",
                                        {f"m3bench_big_{n}/__init__.py": "", f"m3bench_big_{n}/payload.bin":
                                         payload.read_bytes()}))
        payload.unlink()
    dl = served / "download.bin"
    write_random(dl, cfg.download_mib * MiB)
    hash_file = tmp / "hash.bin"
    write_random(hash_file, cfg.hash_mib * MiB)

    log("loopback server ...")
    server = Server(served)
    small_lock = tmp / "small.lock"
    small_lock.write_text(wheelkit.lock_text([
        ("flydsl", "0.1.9+bench", [(small[0], server.url(small[0].name))]),
        ("amd-aiter", "0.1.15.post1+bench", [(small[1], server.url(small[1].name))])]))
    big_lock = tmp / "big.lock"
    big_lock.write_text(wheelkit.lock_text([
        (f"m3bench-big-{n}", "1.0", [(w, server.url(w.name))]) for n, w in zip("ab", big)]))

    log("m3fuse install (pins from the loopback server, then the patches) ...")
    run([m3, "install", "--lock", small_lock, "--cache-dir", tmp / "cache"], env, tmp)
    run([m3, "verify", "--lock", small_lock], env, tmp)

    log("template venv for cold installs ...")
    template = tmp / "template"
    wheelkit.make_venv(template)
    return Setup(tmp, env, py, m3, site, small_lock, big_lock, [server.url(w.name) for w in big], template,
                 hash_file, dl.name, wheelkit.sha256_of(dl), dl.stat().st_size, server, log)


# -------------------------------------------------------------------------------- figures


def fig_latency(s: Setup, cfg: Config, only: list[str]) -> list[Figure]:
    base = [s.venv_python, "-c", "pass"]
    out = []
    for name, title, args, goal, what in [
        ("verify_latency", "verify latency", ["verify", "--no-wheels", "--python", s.venv_python], 6.0,
         "m3fuse verify --no-wheels --python VENV (real vllm 0.26.0 venv, patched)"),
        ("verify_with_wheels", "verify with wheels", ["verify", "--lock", s.small_lock], 2.5,
         "m3fuse verify (both pinned dists installed, test wheels)"),
        ("idempotent_install", "idempotent install",
         ["install", "--lock", s.small_lock, "--cache-dir", s.tmp / "cache"], 8.0,
         "m3fuse install (pins installed, tree patched)"),
    ]:
        if name not in only:
            continue
        s.log(f"{title} ...")
        cmd = [s.m3fuse, *args]
        a, b = measure(lambda: run(cmd, s.env, s.tmp), lambda: run(base, s.env, s.tmp),
                       cfg.latency_reps, cfg.latency_warmup)
        out.append(Figure(name, title, what, "python -c pass (same venv interpreter)", "wall", goal, None, a, b))
    return out


def fig_sets(s: Setup, cfg: Config) -> Figure:
    """verify --no-wheels with every shipped set against the same with only the first three
    (0.24.0, 0.26.0, 0.33.0): adding sets must not slow the CI check down."""
    three = s.tmp / "three-sets"
    for name in ("vllm-0.24.0", "vllm-0.26.0", "vllm-0.33.0"):
        shutil.copytree(REPO / "patches" / name, three / name, dirs_exist_ok=True)
    n_all = sum(1 for d in (REPO / "patches").iterdir() if (d / "manifest.toml").is_file())
    s.log(f"verify with {n_all} sets vs 3 ...")
    every = [s.m3fuse, "verify", "--no-wheels", "--patches", REPO / "patches"]
    few = [s.m3fuse, "verify", "--no-wheels", "--patches", three]
    a, b = measure(lambda: run(every, s.env, s.tmp), lambda: run(few, s.env, s.tmp), cfg.latency_reps,
                   cfg.latency_warmup)
    return Figure("verify_10_vs_3_sets", f"verify, {n_all} sets vs 3",
                  f"m3fuse verify --no-wheels --patches <all {n_all} shipped sets> (real vllm 0.26.0 venv, patched)",
                  "the same with only vllm-0.24.0/0.26.0/0.33.0", "wall", 1.05, None, a, b)


def fig_hashing(s: Setup, cfg: Config) -> Figure:
    from m3fuse import fingerprint

    s.log("hashing ...")
    p = s.hash_file

    def m3() -> None:
        fingerprint.hash_file(p)

    def base() -> None:
        with open(p, "rb") as f:
            if hasattr(hashlib, "file_digest"):
                hashlib.file_digest(f, "sha256")
                return
            h = hashlib.sha256()  # Python 3.10: the same OpenSSL through a 1 MiB readinto loop
            buf = bytearray(MiB)
            mv = memoryview(buf)
            while n := f.readinto(buf):
                h.update(mv[:n])

    a, b = measure(m3, base, cfg.big_reps, 1)
    size = p.stat().st_size
    return Figure("hashing", "hashing", f"m3fuse.fingerprint.hash_file (every m3fuse hash: downloads, wheels, patched files) of a {size // MiB} MiB file (page cache warm)",
                  "hashlib.file_digest(f, 'sha256') in the same process", "throughput", 0.95, size, a, b)


def fig_download(s: Setup, cfg: Config) -> Figure:
    from m3fuse.wheels.fetch import FetchConfig, obtain
    from m3fuse.wheels.lock import LockedWheel

    s.log("download ...")
    url = s.server.url(s.dl_name)
    out = s.tmp / "dl"
    curl = shutil.which("curl")
    if curl is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "curl"], capture_output=True)
        curl = shutil.which("curl")
    fig = Figure("download", "download", f"m3fuse.wheels.fetch.obtain: {s.dl_size // MiB} MiB from 127.0.0.1 into an empty "
                 "cache, sha256-verified (in process, requests already imported)",
                 "curl -s -o FILE of the same URL", "throughput", 0.9, s.dl_size)
    if curl is None:
        fig.skipped = "curl is not installed and could not be installed with apt-get; row skipped"
        return fig
    wheel = LockedWheel(s.dl_name, url, s.dl_sha, s.dl_size)

    def clean() -> None:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()

    def m3() -> None:
        got = obtain(wheel, FetchConfig(cache_dir=out / "cache", retries=0))
        assert got is not None and got.stat().st_size == s.dl_size

    def base() -> None:
        subprocess.run([curl, "-s", "--fail", "-o", str(out / "curl.bin"), url], check=True)

    fig.m3fuse, fig.baseline = measure(m3, base, cfg.big_reps, 1, before=clean)
    clean()
    return fig


def fig_cold(s: Setup, cfg: Config) -> Figure:
    import wheelkit

    s.log("cold install ...")
    work = s.tmp / "cold"
    size = sum(int(line.split("=")[1]) for line in s.big_lock.read_text().splitlines() if line.startswith("size ="))
    state = {}

    def clean() -> None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        state["py"] = wheelkit.clone_venv(s.template, work / "venv")

    def m3() -> None:
        run([s.m3fuse, "install", "--no-patches", "--lock", s.big_lock, "--cache-dir", work / "cache",
             "--python", state["py"]], s.env, s.tmp)

    def base() -> None:
        py = state["py"]
        run([py, "-m", "pip", "download", "--no-deps", "--no-index", "--no-cache-dir", "-q", "-d", work / "dl",
             *s.big_urls], s.env, s.tmp)
        run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir", "-q",
             *sorted((work / "dl").glob("*.whl"))], s.env, s.tmp)

    a, b = measure(m3, base, cfg.cold_reps, 1, before=clean)
    shutil.rmtree(work, ignore_errors=True)
    return Figure("cold_install", "cold install",
                  f"m3fuse install --no-patches --python FRESH_VENV: lock of 2 wheels, {size // MiB} MiB in all, "
                  "from 127.0.0.1, empty cache", "pip download --no-deps URL URL + pip install --no-deps FILES "
                  "(same fresh venv copy, --no-cache-dir)", "wall", 0.9, size, a, b)


# --------------------------------------------------------------------------------- report


def _sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def machine(tmp: Path) -> dict:
    model = next((line.split(":", 1)[1].strip() for line in _sh("lscpu").splitlines()
                  if line.startswith("Model name")), platform.processor())
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "0")
    df = _sh(f"df -hT {tmp} | tail -1").split()
    return {"nproc": os.cpu_count(), "cpu": model, "memory_gib": round(int(mem) / 1024 / 1024, 1),
            "python": sys.version.split()[0], "implementation": platform.python_implementation(),
            "kernel": platform.release(), "disk": {"filesystem": df[0] if df else "", "type": df[1] if len(df) > 1 else "",
                                                    "size": df[2] if len(df) > 2 else "", "tmp_dir": str(tmp)},
            "loadavg_at_end": os.getloadavg()}


def _fmt(fig: Figure, side: str) -> str:
    st = getattr(fig, side)
    if not st:
        return "-"
    if fig.size_bytes:
        f = lambda t: fig.size_bytes / t / 1e9  # noqa: E731
        return f"{f(st['median']):.2f} GB/s [{f(st['max']):.2f}-{f(st['min']):.2f}]"
    if st["median"] >= 1:
        return f"{st['median']:.2f} s [{st['min']:.2f}-{st['max']:.2f}]"
    return f"{st['median'] * 1e3:.1f} ms [{st['min'] * 1e3:.1f}-{st['max'] * 1e3:.1f}]"


def table(figs: list[Figure]) -> str:
    head = ["figure", "m3fuse median [min-max]", "baseline median [min-max]", "ratio", "goal", "result"]
    rows = []
    for f in figs:
        if f.kind == "wall" and f.size_bytes:  # cold install: wall time, not throughput
            m = _fmt_wall(f.m3fuse)
            b = _fmt_wall(f.baseline)
        else:
            m, b = _fmt(f, "m3fuse"), _fmt(f, "baseline")
        r = f.ratio
        rows.append([f.title, m, b, f"{r:.2f}x" if r is not None else "-", f.goal_text(),
                     "SKIP" if f.skipped else ("PASS" if f.passed else "MISS")])
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(n) for c, n in zip(cells, w)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (n + 2) for n in w) + "|"] + [line(r) for r in rows]
    return "\n".join(out)


def _fmt_wall(st: dict | None) -> str:
    if not st:
        return "-"
    return f"{st['median']:.2f} s [{st['min']:.2f}-{st['max']:.2f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repetitions, small files (smoke test, ~1 min)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per figure (overrides the defaults)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(FIGURES)}")
    ap.add_argument("--json-out", metavar="FILE", help="also write the JSON object to FILE")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (its path is printed)")
    ap.add_argument("--_serve", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._serve:
        serve(args._serve)
        return 0
    cfg = config(args.quick, args.reps)
    only = [x for x in args.only.split(",") if x] or list(FIGURES)
    unknown = set(only) - set(FIGURES)
    if unknown:
        ap.error(f"unknown figure(s) {sorted(unknown)}")

    def log(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="m3fuse-bench-"))
    s = None
    figs: list[Figure] = []
    try:
        s = make_setup(tmp, cfg, log)
        if {"verify_latency", "verify_with_wheels", "idempotent_install"} & set(only):
            figs += fig_latency(s, cfg, only)
        if "verify_10_vs_3_sets" in only:
            figs.append(fig_sets(s, cfg))
        if "hashing" in only:
            figs.append(fig_hashing(s, cfg))
        if "download" in only:
            figs.append(fig_download(s, cfg))
        if "cold_install" in only:
            figs.append(fig_cold(s, cfg))
        mach = machine(tmp)
    finally:
        if s is not None:
            s.server.close()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    figs.sort(key=lambda f: FIGURES.index(f.name))
    result = {"config": cfg.__dict__, "machine": mach, "elapsed_s": round(time.monotonic() - t0, 1),
              "figures": {f.name: f.to_json() for f in figs}}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table(figs))
        print()
        m = mach
        print(f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB RAM, Python {m['python']}, "
              f"kernel {m['kernel']}, temp dir on {m['disk']['type']} ({m['disk']['filesystem']}); "
              f"{result['elapsed_s']} s in all" + ("; --quick" if cfg.quick else ""))
        for f in figs:
            if f.skipped:
                print(f"note: {f.title}: {f.skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
