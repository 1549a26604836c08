"""The wheel step of `m3fuse install`, `verify` and `fetch`: what the CLI calls.

install_pinned fetches and verifies every pinned wheel and runs every pre-install check
before it installs anything, so a bad download or a bad build changes nothing. It then
installs in lock order and checks the result (pinned versions present, torch untouched).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import EXIT_ENVIRONMENT, EXIT_INTEGRITY, EXIT_OK, EnvironmentProblem, IntegrityError
from .fetch import FetchConfig, obtain
from .fingerprint import hash_file
from .lock import Lock, LockedPackage, LockedWheel, load_lock
from .wheelcheck import check_wheel, select_wheel, target_tags
from .wheelinstall import pip_install, probe, state_of, verify_wheels

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
    all_wheels: bool = False  # fetch_only: every wheel of the lock, not just the target's
    retries: int = 4
    backoff: float = 2.0
    connect_timeout: float = 15.0
    read_timeout: float = 60.0
    progress: bool | None = None  # None: a bar when stderr is a terminal

    def fetch_config(self, echo: Callable[[str], None]) -> FetchConfig:
        return FetchConfig(cache_dir=self.cache_dir, find_links=list(self.find_links), retries=self.retries,
                           backoff=self.backoff, connect_timeout=self.connect_timeout,
                           read_timeout=self.read_timeout, progress=self.progress, echo=echo)


def _plan(lock: Lock, python: str) -> tuple[tuple[str, ...], list[tuple[LockedPackage, LockedWheel]]]:
    tags = target_tags(python)
    return tags, [(p, select_wheel(p, tags, lock.path, python)) for p in lock.packages]


def install_pinned(opts: WheelOptions, *, dry_run: bool = False,
                   echo: Callable[[str], None] = _quiet) -> list[dict]:
    """Bring every pinned distribution into the target environment, or change nothing.

    Order: plan (tags of the target) -> fast-path check of what is installed -> fetch and
    verify ALL needed wheels -> pre-install checks on ALL of them -> install in lock order ->
    post-checks. A dry run never touches the network nor the environment: wheels already in
    the cache (or a --find-links folder / file:// URL) are verified and checked, others are
    reported as would-install from their URL."""
    lock = load_lock(opts.lock_path)
    if not lock.packages:
        echo(f"{lock.path} pins no wheels; nothing to install")
        return []
    names = [p.name for p in lock.packages]
    before = probe(opts.python, names + [GUARDED], record=names)
    tags: tuple[str, ...] | None = None  # asked of the target only when a wheel must be chosen
    cfg = opts.fetch_config(echo)

    results: list[dict] = []
    todo: list[tuple[LockedPackage, LockedWheel, Path | None, dict]] = []
    for pkg in lock.packages:
        info = before.get(pkg.name)
        res = {"name": pkg.name, "version": pkg.version, "action": "", "file": None, "sha256": None,
               "url": None, "installed_before": info["version"] if info else None}
        results.append(res)
        if not opts.force_reinstall and state_of(info, pkg.version) == "ok":
            # Intact at the pin: no wheel is needed, not even one that fits the tags.
            res["action"] = "already-installed"
            echo(f"{pkg.name} {pkg.version}: already installed, RECORD intact")
            continue
        if state_of(info, pkg.version) == "record-mismatch":
            echo(f"{pkg.name} {pkg.version}: installed but {len(info['problems'])} file(s) differ from RECORD; reinstalling")
        if tags is None:
            tags = target_tags(opts.python)
        wheel = select_wheel(pkg, tags, lock.path, opts.python)
        res["sha256"], res["url"] = wheel.sha256, wheel.url
        todo.append((pkg, wheel, None, res))

    # 1. Fetch and verify everything first (a failure here raises before any install).
    fetched: list[tuple[LockedPackage, LockedWheel, Path | None, dict]] = []
    for pkg, wheel, _, res in todo:
        path = obtain(wheel, cfg, allow_network=not dry_run)
        res["file"] = str(path) if path else None
        fetched.append((pkg, wheel, path, res))
    # 2. Every pre-install check on every file, still before anything is installed.
    for pkg, wheel, path, _ in fetched:
        if path is not None:
            assert tags is not None  # set when the package was planned
            check_wheel(path, pkg, tags, opts.python)
    if dry_run:
        for _, _, path, res in fetched:
            res["action"] = "would-install"
            if path is None:
                res["note"] = "not cached: would be downloaded and verified first"
        return results
    # 3. Install in lock order. Re-hash right before handing the file to pip (it also checks).
    for pkg, wheel, path, res in fetched:
        assert path is not None
        sha, _ = hash_file(path)
        if sha != wheel.sha256:
            raise IntegrityError(f"The cached wheel {path} changed after it was verified (expected sha256 "
                                 f"{wheel.sha256}, got {sha}). Delete it and run m3fuse install again.")
        echo(f"{pkg.name} {pkg.version}: installing {path.name}")
        pip_install(opts.python, path, wheel.sha256)
        res["action"] = "installed"
    if not fetched:
        # Every pin was already intact (the probe above proved version and RECORD) and nothing
        # was installed, so the post-checks below could only repeat that probe.
        return results
    # 4. Post-checks.
    after = probe(opts.python, names + [GUARDED], record=[])
    wrong = []
    for p in lock.packages:
        i = after.get(p.name)
        if i is None or state_of({**i, "problems": []}, p.version) != "ok":
            wrong.append(f"{p.name} is {i['version'] if i else 'not installed'} (pinned {p.version})")
    if wrong:
        raise EnvironmentProblem(
            f"After installing from {lock.path}, the target Python {opts.python} does not report the pinned "
            f"versions: {'; '.join(wrong)}. Another copy may shadow them (user site-packages, PYTHONPATH); "
            f"check `{opts.python} -m pip list -v`.")
    tb = (before.get(GUARDED) or {}).get("version")
    ta = (after.get(GUARDED) or {}).get("version")
    if tb != ta:
        raise EnvironmentProblem(
            f"Installing the pinned wheels changed torch in {opts.python}: before {tb or 'not installed'}, "
            f"after {ta or 'not installed'}. The fusion needs the environment's own torch build; reinstall it "
            f"(from the image or your ROCm torch wheel) before using vLLM.")
    return results


def verify_pinned(lock_path: Path, python: str) -> list[dict]:
    """Per pinned package: name, expected_version, installed_version, state ("ok", "missing",
    "wrong-version", "record-mismatch"), ok, record_files, problems. Never imports requests."""
    return verify_wheels(load_lock(lock_path), python)


def judge(results: list[dict]) -> tuple[list[str], int]:
    """What `verify` reports for `verify_pinned` results: the failures and the exit code (0 when
    there are none)."""
    bad = [r for r in results if r.get("state") != "ok"]
    failures = [f"wheel {r.get('name')}: {r.get('state')}: {'; '.join(r.get('problems') or [])}" for r in bad]
    if not bad:
        return failures, EXIT_OK
    # Edited files of an installed wheel are an integrity failure; a missing or other-version
    # package is an environment that was never set up.
    return failures, EXIT_INTEGRITY if any(r.get("state") == "record-mismatch" for r in bad) else EXIT_ENVIRONMENT


def fetch_only(opts: WheelOptions, dest: Path, echo: Callable[[str], None] = _quiet) -> list[Path]:
    """Fetch and verify the wheels (the target's, or all with opts.all_wheels) and place
    copies in `dest` (for a later `--find-links dest` install). Nothing is installed."""
    lock = load_lock(opts.lock_path)
    if opts.all_wheels:
        chosen = [(p, w) for p in lock.packages for w in p.wheels]
        tags = None
    else:
        tags, chosen = _plan(lock, opts.python)
    cfg = opts.fetch_config(echo)
    paths = [(p, w, obtain(w, cfg)) for p, w in chosen]
    for p, w, path in paths:
        assert path is not None
        check_wheel(path, p, tags, opts.python)  # tags None (--all): every check but the tag one
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EnvironmentProblem(f"Cannot create the destination folder {dest} ({exc}); pass a writable --dest.") from None
    out: list[Path] = []
    for _, w, path in paths:
        assert path is not None
        target = dest / w.name
        if target.is_file() and hash_file(target)[0] == w.sha256:
            out.append(target)
            continue
        fd, tmp = tempfile.mkstemp(prefix=f".{w.name}.", suffix=".part", dir=dest)
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            if hash_file(Path(tmp))[0] != w.sha256:
                raise IntegrityError(f"Copying {path} to {dest} did not give the pinned bytes (expected sha256 "
                                     f"{w.sha256}); check the destination disk.")
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        echo(f"{w.name} -> {target}")
        out.append(target)
    return out
