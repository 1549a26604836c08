"""The wheel step of `m3fuse install`, `verify` and `fetch`: what the CLI calls.

install_pinned reads the way the patch engine does:

  inspect  the target: installed versions, RECORD integrity, PEP 668 marker (one probe);
  plan     one action per pinned wheel (plan.py), and every refusal that needs no file:
           a downgrade, an externally managed target, no wheel fitting the target;
  obtain   every wheel that is needed (cache, --find-links, file://, download), verified;
  check    every one of them (tags, archive paths, metadata, AITER API);
  install  all of them in one pip run;
  prove    versions equal the pins, torch unchanged.

Nothing changes in the environment before the install step, so a bad download, a bad build or
a refusal changes nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import (EXIT_ENVIRONMENT, EXIT_INTEGRITY, EXIT_OK, EnvironmentProblem, IntegrityError, M3fuseError, Row,
                      UsageProblem)
from .. import interrupt, safeio
from ..fingerprint import hash_file
from . import fit
from . import plan as planner
from .check import check_wheel, target_tags
from .fetch import FetchConfig, max_wheel_bytes, obtain
from .install import PipFailed, install_dir, pip_install, probe, state_of, verify_wheels
from .lock import Lock, load_lock
from .needs import Needs

GUARDED = "torch"  # installing the pins must never move torch (its ROCm build is the image's)


def _quiet(_: str) -> None:
    pass


@dataclass
class WheelOptions:
    lock_path: Path
    cache_dir: Path | None
    find_links: list[Path]
    python: str  # the target interpreter's executable
    force_reinstall: bool = False  # install even when the pinned version is intact
    allow_downgrade: bool = False  # replace a newer installed version with the pinned one
    break_system_packages: bool = False  # install into an externally managed (PEP 668) Python
    all_wheels: bool = False  # fetch_only: every wheel of the lock, not just the target's
    python_version: str | None = None  # fetch_only --all: the image's Python ("3.12"); each pin must fit it
    skip_unfit: bool = False  # fetch_only: leave out pins that cannot meet `needs` (install never uses them)
    retries: int = 4
    backoff: float = 2.0
    connect_timeout: float = 15.0
    read_timeout: float = 60.0
    progress: bool | None = None  # None: a bar when stderr is a terminal
    needs: Needs | None = None  # what the target's vLLM release needs (its set's aiter-needs.toml)
    exact_pins: bool = False  # the pins decide alone: no newer build kept, the pin installed regardless
    lock_timeout: float = 60.0  # how long to wait for another m3fuse run on the same environment
    deadline: float | None = None  # one wheel's whole download (None: fetch.deadline_seconds())

    def fetch_config(self, echo: Callable[[str], None]) -> FetchConfig:
        return FetchConfig(cache_dir=self.cache_dir, find_links=list(self.find_links), retries=self.retries,
                           backoff=self.backoff, connect_timeout=self.connect_timeout,
                           read_timeout=self.read_timeout, progress=self.progress, echo=echo,
                           deadline=self.deadline)


def install_pinned(opts: WheelOptions, *, dry_run: bool = False,
                   echo: Callable[[str], None] = _quiet) -> list[dict]:
    """Bring every pinned distribution into the target environment, or change nothing; one
    dict per pinned package (name, pinned_version, installed_version, action, result, file,
    sha256, url). A dry run never touches the network nor the environment: wheels already in
    the cache (or a --find-links folder / file:// URL) are verified and checked, the others are
    reported with the URL they would be downloaded from."""
    cfg = opts.fetch_config(echo)
    from .fetch import deadline_seconds

    deadline_seconds(cfg.deadline)  # a bad --download-deadline or variable is refused before anything
    lock = load_lock(opts.lock_path, stamps=cfg.lock_stamps())
    if not lock.packages:
        echo(f"{lock.path} pins no wheels; nothing to install")
        return []
    if dry_run:
        return _install(opts, cfg, lock, dry_run, echo)
    # One run at a time per environment, pip included: the lock is taken before the probe the
    # plan is made from and held until the versions are proved (mutex.py).
    from ..patching import mutex

    where = _existing(install_dir(opts.python))
    with mutex.hold(where, timeout=opts.lock_timeout, what=f"the Python environment {where}"):
        return _install(opts, cfg, lock, dry_run, echo)


def _existing(folder: Path) -> Path:
    """`folder`, or its nearest existing parent (pip creates a missing user site-packages)."""
    while not folder.is_dir() and folder.parent != folder:
        folder = folder.parent
    return folder


def _install(opts: WheelOptions, cfg: FetchConfig, lock: Lock, dry_run: bool,
             echo: Callable[[str], None]) -> list[dict]:
    python = opts.python
    names = [p.name for p in lock.packages]
    # inspect
    seen = probe(python, names + [GUARDED], record=names)
    before = seen["dists"]
    # plan
    steps = planner.plan(lock, before, force=opts.force_reinstall, exact=opts.exact_pins, needs=opts.needs,
                         installed=installed_builds(lock, before, opts.needs, opts.exact_pins))
    for s in steps:
        echo(planner.describe(s))
    if opts.exact_pins:
        for line in planner.exact_pin_warnings(steps, opts.needs, str(lock.path)):
            echo(line)
    todo = [s for s in steps if s.changes]
    try:
        planner.refuse_unmet(steps, python, opts.needs, lock)
        if not opts.allow_downgrade:
            planner.refuse_downgrades(steps, python)
        if todo:
            planner.refuse_externally_managed(seen.get("externally_managed"), python,
                                              allowed=opts.break_system_packages)
    except M3fuseError as exc:
        exc.payload = {"wheels": planner.as_json(steps)}  # --json shows the plan it was judged on
        raise
    if todo and not dry_run:
        _warm_requests()  # while the target is asked for its tags
    planner.choose_wheels(steps, lambda: target_tags(python), lock, python)
    results = planner.as_json(steps)
    by_name = {r["name"]: r for r in results}
    # obtain (a failure raises before anything is installed)
    files: dict[str, Path | None] = {}
    for s in todo:
        assert s.wheel is not None  # chosen for every step that changes something
        files[s.package.name] = path = obtain(s.wheel, cfg, allow_network=not dry_run)
        by_name[s.package.name]["file"] = str(path) if path else None
    # check, still before anything is installed
    for s in todo:
        path = files[s.package.name]
        if path is not None:
            check_wheel(path, s.package, target_tags(python), python)
    if dry_run:
        for s in todo:
            by_name[s.package.name]["result"] = "dry-run"
            if files[s.package.name] is None:
                by_name[s.package.name]["note"] = "not cached: would be downloaded and verified first"
        return results
    if not todo:
        # Every pin is intact (the probe proved version and RECORD): the checks below could
        # only repeat that probe.
        return results
    # No RECORD pip acts on may name a file outside site-packages: neither the installed
    # distribution pip replaces (it deletes what that RECORD lists) nor the wheel's own.
    from .recordcheck import refuse_installed, refuse_wheel

    for s in todo:
        path = files[s.package.name]
        assert path is not None
        refuse_wheel(path, s.package.name)
        root = (before.get(s.package.name) or {}).get("root")
        if root:
            refuse_installed(s.package.name, Path(root), python)
    # install: all wheels in one pip run. pip hashes each file as it reads it (--require-hashes),
    # so a file changed after our check is caught on the bytes actually installed.
    batch: list[tuple[Path, str]] = []
    for s in todo:
        path = files[s.package.name]
        assert path is not None and s.wheel is not None
        batch.append((path, s.wheel.sha256))
    echo(f"installing {len(batch)} wheel(s) with {python} -m pip: " + ", ".join(p.name for p, _ in batch))
    todo_pins = {s.package.name: s.package.version for s in todo}
    try:
        # An interrupt here lands after pip has stopped (or finished): the one line says what
        # pip left and that `m3fuse install` again repairs it (pip may leave a half-written
        # package folder when it is stopped mid-way).
        with interrupt.describing(lambda: _interrupted_wheel_step(python, todo_pins)):
            pip_install(python, batch, break_system_packages=opts.break_system_packages)
    except PipFailed as failed:
        if "DO NOT MATCH THE HASHES" in failed.output:
            raise IntegrityError(
                headline="a cached wheel changed after it was verified; pip refused it and installed nothing",
                details=[("python", python), ("pip said", failed.output.strip().splitlines()[-1])],
                hint="delete the wheel cache entry (or the whole --cache-dir) and run m3fuse install again") from None
        todo_names = [s.package.name for s in todo]
        raise _pip_failure(failed, steps, before, _state_now(python, names + [GUARDED], todo_names), python) from None
    for s in todo:
        by_name[s.package.name]["result"] = "installed"
    # prove
    after = probe(python, names + [GUARDED], record=[])["dists"]
    wrong: list[Row] = []
    for s in steps:
        p, i = s.package, after.get(s.package.name)
        want = s.installed if s.keeps_other else p.version  # a kept build must still be there
        if i is None or state_of({**i, "problems": []}, str(want)) != "ok":
            wrong.append((p.name, f"{i['version'] if i else 'not installed'} (expected {want})"))
    if wrong:
        raise EnvironmentProblem(
            headline=f"after installing from {lock.path}, the target Python does not report the pinned versions",
            details=[("python", python), *wrong],
            hint=f"another copy may shadow them (user site-packages, PYTHONPATH); check `{python} -m pip list -v`")
    tb = (before.get(GUARDED) or {}).get("version")
    ta = (after.get(GUARDED) or {}).get("version")
    if tb != ta:
        raise EnvironmentProblem(
            headline="installing the pinned wheels changed torch",
            details=[("python", python), ("before", tb or "not installed"), ("after", ta or "not installed")],
            hint="reinstall the environment's own torch (the image's or your ROCm wheel) before using vLLM")
    return results


def _warm_requests() -> None:
    """Import requests in a thread: the tag query that follows waits on a subprocess with
    the GIL released, so a download that needs requests finds it imported (~60 ms of a cold
    install); a wheel found in the cache only costs that idle time."""
    import threading

    threading.Thread(target=__import__, args=("requests",), name="m3fuse-import", daemon=True).start()


def _interrupted_wheel_step(python: str, pins: dict[str, str]) -> str:
    """The interrupt line's account of the wheel step: which pinned distributions pip left
    intact, which not, and the repair."""
    now = _state_now(python, list(pins), list(pins))
    broken = [f"{n} ({state_of(now.get(n), v)})" for n, v in pins.items() if state_of(now.get(n), v) != "ok"]
    if not now:
        what = "what pip left could not be read"
    elif broken:
        what = (f"not intact now: {', '.join(broken)} (pip may have left a half-written package folder in "
                f"{python}'s site-packages)")
    else:
        what = f"pip had finished: {', '.join(pins)} are installed at their pins"
    return (f"the wheel step was stopped while pip installed {', '.join(pins)} into {python}; {what}; no vLLM file "
            f"was patched. Run `m3fuse install` again to repair it")


def _state_now(python: str, names: list[str], record: list[str]) -> dict[str, dict | None]:
    try:
        return probe(python, names, record=record)["dists"]
    except EnvironmentProblem:
        return {}


def _pip_failure(failed: PipFailed, steps: list[planner.Step], before: dict, after: dict,
                 python: str) -> EnvironmentProblem:
    """What the one pip run left behind: the wheel it failed on (the first, in pip's install
    order, not intact at its pin afterwards: pip rolls that one back) and exactly which
    distributions changed (those pip got through before it, and any other whose version moved)."""
    from packaging.utils import canonicalize_name

    def ver(d: dict, name: str) -> str:
        return (d.get(name) or {}).get("version") or "not installed"

    todo = [s for s in steps if s.changes]
    by_key = {s.package.key: s for s in todo}
    order = [by_key[k] for k in dict.fromkeys(canonicalize_name(n) for n in failed.order) if k in by_key]
    order += [s for s in todo if s not in order]
    failed_on = next((s for s in order if state_of(after.get(s.package.name), s.package.version) != "ok"), order[-1])
    rows: list[Row] = [("python", python), ("failed on", failed_on.wheel.name if failed_on.wheel else failed_on.package.name),
                       ("pip exit", str(failed.code))]
    changed: list[Row] = []
    if after:
        done = order[:order.index(failed_on)]
        for s in done:
            was, now = ver(before, s.package.name), ver(after, s.package.name)
            changed.append((s.package.name, f"{was} -> {now}" if was != now else f"reinstalled at {now}"))
        listed = {s.package.name for s in done}
        changed += [(n, f"{ver(before, n)} -> {ver(after, n)}") for n in [*(s.package.name for s in steps), GUARDED]
                    if n not in listed and ver(before, n) != ver(after, n)]
        rows += [("", "changed by this run:" if changed else "changed by this run: nothing")] + changed
    else:
        rows += [("", "changed by this run: unknown (the target could not be asked afterwards)")]
    last = [ln for ln in failed.output.splitlines() if ln.strip()]
    rows += [("", "pip said:"), ("last line", last[-1].strip() if last else "(no output)")]
    return EnvironmentProblem(
        headline=f"pip failed installing {failed_on.package.name} {failed_on.package.version}",
        details=rows,
        hint="fix the cause (permissions, disk space, a file in the way), run m3fuse install again "
             "(wheels stay cached)")


def installed_builds(lock: Lock, dists: dict[str, dict | None], needs: Needs | None,
                     exact: bool) -> dict[str, fit.Provides]:
    """What each installed pinned distribution provides (read from its files), where the
    release's needs (or, without them, the content checks) are to judge it; none under
    --exact-pins."""
    if exact:
        return {}
    out = {}
    for p in lock.packages:
        i = dists.get(p.name)
        if i and i.get("root"):
            out[p.name] = fit.from_tree(Path(i["root"]), i.get("version"), p.key, fit.wanted(needs, p.key))
    return out


def verify_pinned(lock_path: Path, python: str, *, needs: Needs | None = None, exact: bool = False) -> list[dict]:
    """Per pinned package: name, expected_version, installed_version, state ("ok", "missing",
    "wrong-version", "record-mismatch", "needs-unmet"), ok, record_files, problems, "accepted"
    (why an installed build is accepted: planner.PINNED, KEPT_NEWER or KEPT_NEEDS; None when it
    is not) and "kept" (the plan's reason for a build other than the pin). Accepts exactly what
    `install` keeps (the same planner.decide). Never imports requests; reads the lock without
    packaging's PEP 751 validator (install, fetch and lock run it)."""
    return _verify(load_lock(lock_path, spec=False), python, needs, exact)


def _verify(lock: Lock, python: str, needs: Needs | None, exact: bool) -> list[dict]:
    info = probe(python, [p.name for p in lock.packages])["dists"]
    results = verify_wheels(lock, python, info)
    for r in results:
        r["accepted"] = planner.PINNED if r["ok"] else None
    if exact:
        return results
    steps = planner.plan(lock, info, exact=False, needs=needs, installed=installed_builds(lock, info, needs, False))
    for s, r in zip(steps, results):
        if s.keeps_other:
            r.update(state="ok", ok=True, problems=[], kept=s.reason, expected_version=s.installed,
                     accepted=s.kept)
        elif s.action == planner.UNMET:
            have, pin = r["installed_version"], s.package.version
            if have == pin:
                problems = [f"{s.package.name} {have} (the pin) lacks {planner.brief(s.unmet, 60)}"]
            else:
                problems = [f"{s.package.name} {have}: lacks {planner.brief(s.lacks, 60)}" if have else
                            f"{s.package.name} is not installed",
                            f"the pin {pin} lacks {planner.brief(s.unmet, 60)}"]
            r.update(state="needs-unmet", ok=False, lacks=list(s.lacks), unmet=list(s.unmet), problems=problems)
    return results


@dataclass
class Verdict:
    """What `verify` says of the wheels: every accepted build and why, every failure, the exit
    code (0 when there is none) and the lock it was judged by."""

    results: list[dict]
    accepted: list[dict]  # name, version, pinned_version, reason
    failures: list[str]
    exit_code: int
    lock: dict  # path, sha256

    @property
    def hint(self) -> str | None:
        """The next step for the first failure (None when there is none)."""
        bad = [r for r in self.results if r.get("state") != "ok"]
        if not bad:
            return None
        lock = "" if self.lock["path"].endswith("/wheels.lock") else " --lock " + self.lock["path"]
        if bad[0]["state"] == "needs-unmet":
            return (f"install a build of {bad[0]['name']} with what vLLM needs (--json lists it), "
                    f"or pin one: `m3fuse lock add`")
        return f"run `m3fuse install{lock}`: it installs or repairs the pinned wheels"

    def lines(self) -> list[str]:
        """One line per accepted build, for the text output."""
        return [f"wheel {a['name']} {a['version']}: {a['reason']} (pinned {a['pinned_version']})"
                for a in self.accepted]


def verdict(lock_path: Path, python: str, *, needs: Needs | None, exact: bool = False) -> Verdict:
    """`verify`'s wheel half in one call: the lock read once, the target probed once, each
    pinned distribution judged by the plan `install` follows (`needs`: the release's, from its
    set; None where the release is not known)."""
    from ..fingerprint import sha256_bytes
    from .lock import parse_lock, read_lock_text

    text = read_lock_text(Path(lock_path))
    lock = parse_lock(text, Path(lock_path), spec=False)
    results = _verify(lock, python, needs, exact)
    pins = {p.name: p.version for p in lock.packages}
    accepted = [{"name": r["name"], "version": r["installed_version"], "pinned_version": pins[r["name"]],
                 "reason": r["accepted"]} for r in results if r["ok"]]
    bad = [r for r in results if r.get("state") != "ok"]
    failures = [f"wheel {r.get('name')}: {r.get('state')}: {'; '.join(r.get('problems') or [])}" for r in bad]
    # Edited files of an installed wheel are an integrity failure; a missing or other-version
    # package is an environment that was never set up.
    code = EXIT_OK if not bad else (
        EXIT_INTEGRITY if any(r.get("state") == "record-mismatch" for r in bad) else EXIT_ENVIRONMENT)
    return Verdict(results, accepted, failures, code,
                   {"path": str(lock.path), "sha256": sha256_bytes(text.encode("utf-8"))})


def _refuse_unfit_python(packages: list, version: str, lock: Lock) -> None:
    """Every package keeps a wheel a CPython `version` (e.g. "3.12") can install: by the
    interpreter and ABI tags of its file names (the platform is the image's to judge)."""
    import re

    if not re.fullmatch(r"3\.[0-9]{1,2}", version):
        raise UsageProblem(headline=f"--python-version must be a CPython version like 3.12; got: {version}",
                           hint="give the image's Python: podman run --rm IMAGE python3 --version")
    minor = int(version.split(".")[1])
    cp = f"cp3{minor}"

    def fits(tag: str) -> bool:
        interp, abi, _ = tag.split("-")
        if abi == "abi3":  # cp3N-abi3: any CPython from 3.N on
            return interp.startswith("cp3") and interp[3:].isdigit() and int(interp[3:]) <= minor
        return interp in (cp, "py3", f"py3{minor}") and abi in (cp, "none")

    bad = [(p.name, ", ".join(sorted({t.rsplit("-", 1)[0] for w in p.wheels for t in w.tags})))
           for p in packages if not any(fits(t) for w in p.wheels for t in w.tags)]
    if bad:
        raise UsageProblem(headline=f"the lock pins no wheel that Python {version} can install for "
                                    f"{', '.join(n for n, _ in bad)}",
                           details=[("lock", str(lock.path)), *bad],
                           hint=f"give the image's own Python version, or pin {cp} wheels with `m3fuse lock add`")


def _holds(path: Path, sha256: str) -> bool:
    """True when `path` is a regular file with that hash (a link, FIFO or device never is)."""
    try:
        return hash_file(path, max_wheel_bytes())[0] == sha256
    except (OSError, safeio.Unsafe):
        return False


def fetch_only(opts: WheelOptions, dest: Path, echo: Callable[[str], None] = _quiet) -> list[Path]:
    """Fetch and verify the wheels (the target's, or all with opts.all_wheels) and place
    copies in `dest` (for a later `--find-links dest` install). Nothing is installed."""
    cfg = opts.fetch_config(echo)
    lock = load_lock(opts.lock_path, stamps=cfg.lock_stamps())
    tags: tuple[str, ...] | None = None
    packages = list(lock.packages)
    if opts.skip_unfit and opts.needs is not None:
        # On a release whose needs the pin cannot meet, install keeps the environment's own
        # sound build or refuses: it never installs the pin, so fetching it is wasted.
        for p in list(packages):
            unmet = planner.pin_verdict(p, opts.needs, str(lock.path)).unmet
            if unmet:
                packages.remove(p)
                echo(f"skipped {p.name} {p.version}: vLLM {fit.release_name(opts.needs)} cannot run with it "
                     f"({unmet[0]}); the image must bring its own, which install keeps")
    if opts.python_version is not None:
        _refuse_unfit_python(packages, opts.python_version, lock)
    if opts.all_wheels:
        chosen = [(p, w) for p in packages for w in p.wheels]
    else:
        steps = [planner.Step(p, None, planner.INSTALL) for p in packages]
        planner.choose_wheels(steps, lambda: target_tags(opts.python), lock, opts.python)
        tags = target_tags(opts.python)
        chosen = [(s.package, s.wheel) for s in steps if s.wheel is not None]
    paths = [(p, w, obtain(w, cfg)) for p, w in chosen]
    for p, w, path in paths:
        assert path is not None
        check_wheel(path, p, tags, opts.python)  # tags None (--all): every check but the tag one
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EnvironmentProblem(headline="cannot create the destination folder",
                                 details=[("folder", str(dest)), ("error", str(exc))], hint="pass a writable --dest") from None
    out: list[Path] = []
    for _, w, path in paths:
        assert path is not None
        target = dest / w.name
        if _holds(target, w.sha256):
            out.append(target)
            continue
        fd, tmp = tempfile.mkstemp(prefix=f".{w.name}.", suffix=".part", dir=dest)
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            if hash_file(Path(tmp))[0] != w.sha256:
                raise IntegrityError(headline="copying a verified wheel did not give the pinned bytes",
                                     details=[("file", str(path)), ("to", str(dest)), ("expected", f"sha256 {w.sha256}")],
                                     hint="check the destination disk")
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        echo(f"{w.name} -> {target}")
        out.append(target)
    return out
