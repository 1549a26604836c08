"""Lock + target environment -> one action per pinned wheel, decided before anything changes.

The plan is what `install --dry-run` and `--json` show, and what the refusals (a downgrade, an
externally managed Python, no wheel fitting the target) are judged on: all of them happen
here, before any download.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from packaging.version import InvalidVersion, Version

from ..errors import AiterNeedsUnmet, DowngradeRefused, EnvironmentProblem, ExternallyManaged, Row
from . import fit
from .lock import Lock, LockedPackage, LockedWheel, select_wheel
from .needs import Needs

INSTALL = "install"  # not installed
UPGRADE = "upgrade"  # an older version is installed
DOWNGRADE = "downgrade"  # a newer version is installed: refused without --allow-downgrade
KEEP = "keep"  # installed at the pin, every RECORD file intact
REPAIR = "repair"  # installed at the pin, but files differ from its RECORD
REINSTALL = "reinstall"  # intact, but --force-reinstall
REPLACE = "replace"  # installed under a version that is not PEP 440: no order to judge
UNMET = "unmet"  # the release needs more than the pin provides and nothing installed has it: refused

# Why a build is accepted (verify names it): the pin itself, a newer installed build that is
# intact, passes the content checks and meets the release's needs, or an installed build that
# meets the needs where the pin does not.
PINNED = "pinned"
KEPT_NEWER = "kept: newer and sound"
KEPT_NEEDS = "needs met"


@dataclass
class Step:
    package: LockedPackage
    installed: str | None  # the version installed now
    action: str
    wheel: LockedWheel | None = None  # chosen when the action needs one
    reason: str | None = None  # why the release's needs chose this action (None: the pin decided)
    unmet: tuple[str, ...] = ()  # UNMET: what the pin lacks; else what a refused installed build lacks
    kept: str | None = None  # KEEP of a build other than the pin: KEPT_NEWER or KEPT_NEEDS
    lacks: tuple[str, ...] = ()  # what the installed build lacks, when the plan did not keep it

    @property
    def changes(self) -> bool:
        return self.action not in (KEEP, UNMET)

    @property
    def keeps_other(self) -> bool:
        """Kept at a version other than the pin (a newer, sound build)."""
        return self.action == KEEP and self.reason is not None


def action_for(info: dict | None, pinned: str, *, force: bool = False) -> str:
    """What installing `pinned` does to a distribution in state `info` (the probe's entry)."""
    if info is None:
        return INSTALL
    if not isinstance(info.get("version"), str):
        return REPLACE  # a dist-info whose METADATA is missing or names no version
    try:
        have, want = Version(info["version"]), Version(pinned)
    except InvalidVersion:
        return REPLACE
    if have < want:
        return UPGRADE
    if have > want:
        return DOWNGRADE
    if info.get("problems"):
        return REPAIR
    return REINSTALL if force else KEEP


def decide(pkg: LockedPackage, info: dict | None, *, force: bool, exact: bool, needs: Needs | None,
           lock_path: str, installed: fit.Provides | None) -> Step:
    """The action for one pinned package. With --exact-pins the pin decides alone, as
    action_for says. Otherwise an installed build newer than the pin that is intact, passes the
    content checks and meets every need of the release (`needs`; None: the release is not
    known, only the content checks count) is kept; the pin is installed only where it meets
    the needs; where neither does, the step is UNMET."""
    have = info.get("version") if info else None
    step = Step(pkg, have, action_for(info, pkg.version, force=force))
    if exact:
        return step
    vllm = fit.release_name(needs)
    need = fit.needs_of(needs, pkg.key)
    sound: fit.Verdict | None = None
    if info is not None and installed is not None:
        sound = fit.judge(need, installed, dist=pkg.key, vllm=vllm)
        if info.get("problems"):
            sound.unmet[:0] = [f"its files differ from its RECORD ({info['problems'][0]})"]
    newer = step.action == DOWNGRADE
    if newer and sound is not None and sound.ok:
        step.action, step.reason, step.kept = KEEP, f"installed {have} is newer and sound", KEPT_NEWER
        return step
    pinv = pin_verdict(pkg, needs, lock_path)
    if pinv.ok:
        if newer and sound is not None:
            step.reason = f"installed {have} is newer but not sound: {'; '.join(sound.unmet)}"
            step.lacks = tuple(sound.unmet)
        return step
    if sound is not None and sound.ok and step.action != REPLACE:
        step.action, step.kept = KEEP, KEPT_NEEDS
        step.reason = f"installed {have} has what vLLM {vllm} needs; the pin does not"
        return step
    step.action, step.unmet = UNMET, tuple(pinv.unmet)
    if sound is not None:
        step.reason = f"installed {have or 'of unknown version'} is not enough: {'; '.join(sound.unmet)}"
        step.lacks = tuple(sound.unmet)
    return step


def brief(items: Sequence[str], width: int = 90) -> str:
    """The first of `items`, cut to `width` characters, and how many more there are: a line a
    terminal shows whole (--json carries them all)."""
    if not items:
        return ""
    first = items[0] if len(items[0]) <= width else items[0][:width - 3] + "..."
    return first + (f" (+{len(items) - 1} more, --json lists all)" if len(items) > 1 else "")


def short_reason(s: Step) -> str | None:
    """Step.reason in one terminal line: what an installed build lacks is summarised."""
    if s.lacks and s.reason:
        head = s.reason.split(": ", 1)[0]
        return f"{head}: {brief(s.lacks)}"
    return s.reason


def pin_verdict(pkg: LockedPackage, needs: Needs | None, lock_path: str) -> fit.Verdict:
    """Does the pin meet the release's needs, by the lock's facts (or, without them, its version)?"""
    pin = fit.from_lock(pkg, Path(lock_path)) or fit.Provides(pkg.version, f"pinned in {Path(lock_path).name}")
    return fit.judge(fit.needs_of(needs, pkg.key), pin, dist=pkg.key, vllm=fit.release_name(needs))


def exact_pin_warnings(steps: Sequence[Step], needs: Needs | None, lock_path: str) -> list[str]:
    """--exact-pins installs a pin the release cannot run with; say so."""
    out = []
    for s in steps:
        unmet = pin_verdict(s.package, needs, lock_path).unmet if needs is not None else []
        if unmet:
            out.append(f"warning: {s.package.name} {s.package.version} (pinned, kept by --exact-pins) does not have "
                       f"what vLLM {fit.release_name(needs)} needs: {'; '.join(unmet)}")
    return out


def plan(lock: Lock, dists: dict[str, dict | None], *, force: bool = False, exact: bool = True,
         needs: Needs | None = None, installed: dict[str, fit.Provides] | None = None) -> list[Step]:
    """One Step per package, in lock order (the order they install in); no wheel chosen yet.
    `installed`: what each installed build provides (fit.from_tree), for the packages the
    release has needs of."""
    return [decide(p, dists.get(p.name), force=force, exact=exact, needs=needs, lock_path=str(lock.path),
                   installed=(installed or {}).get(p.name)) for p in lock.packages]


def refuse_unmet(steps: Sequence[Step], python: str, needs: Needs | None, lock: Lock) -> None:
    """Before any download: the release needs a newer build than the lock pins, and the
    target has none that is sound."""
    bad = [s for s in steps if s.action == UNMET]
    if not bad:
        return
    vllm = fit.release_name(needs)
    rows: list[Row] = [("python", python), ("lock", str(lock.path))]
    for s in bad:
        need = fit.needs_of(needs, s.package.key)
        rows += [("", s.package.name)]
        if need is not None and need.min_version:
            rows.append(("needs", f">= {need.min_version} (vLLM names it at {need.min_version_source})"))
        missing = [m for m in (need.modules if need else ()) if any(m in u for u in s.unmet)]
        if missing:
            rows.append(("modules", ", ".join(missing)))
        rows += [("pinned", s.package.version)] + [("pin lacks", u) for u in s.unmet]
        rows.append(("installed", short_reason(s) or (f"{s.installed}" if s.installed else "nothing")))
    need = fit.needs_of(needs, bad[0].package.key)
    want = f" >= {need.min_version}" if need is not None and need.min_version else ""
    raise AiterNeedsUnmet(
        headline=f"vLLM {vllm}'s MiniMax M3 needs a newer {', '.join(s.package.name for s in bad)} than the lock "
                 f"pins, and none is installed; nothing was downloaded or installed",
        details=rows,
        hint=f"install {bad[0].package.name}{want} first (m3fuse keeps it), or pin one: `m3fuse lock add URL|FILE`")


def refuse_downgrades(steps: Sequence[Step], python: str) -> None:
    down = [s for s in steps if s.action == DOWNGRADE]
    if not down:
        return
    rows: list[Row] = []
    for s in down:
        rows += [("", s.package.name), ("installed", str(s.installed)), ("pinned", s.package.version)]
    raise DowngradeRefused(
        headline=f"install would downgrade {len(down)} distribution(s) in {python}; nothing was changed",
        details=rows,
        hint="pin the newer build with `m3fuse lock add` if M3 runs with it, or install the pin: --allow-downgrade")


def refuse_externally_managed(marker: str | None, python: str, *, allowed: bool) -> None:
    """PEP 668: the target's stdlib holds EXTERNALLY-MANAGED and it is not a venv."""
    if marker is None or allowed:
        return
    raise ExternallyManaged(
        headline="the target Python is externally managed (PEP 668); nothing was downloaded or installed",
        details=[("python", python), ("marker", marker)],
        hint=f"use a venv (`{python} -m venv /opt/venv`, --python /opt/venv/bin/python) or --break-system-packages")


def choose_wheels(steps: Sequence[Step], tags_of: Callable[[], tuple[str, ...]], lock: Lock, python: str) -> None:
    """Pick the wheel of every step that changes something (tags asked of the target only then)."""
    todo = [s for s in steps if s.changes]
    if not todo:
        return
    from packaging.tags import Tag

    tag_strs = tags_of()
    tags = [Tag(*t.split("-")) for t in tag_strs]
    for s in todo:
        s.wheel = select_wheel(s.package, tags)
        if s.wheel is None:
            offered = ", ".join(sorted({t for w in s.package.wheels for t in w.tags}))
            raise EnvironmentProblem(
                headline=f"no wheel pinned for {s.package.name} {s.package.version} fits the target Python",
                details=[("lock", str(lock.path)), ("python", python),
                         ("best tag", tag_strs[0] if tag_strs else "unknown"), ("lock offers", offered)],
                hint="give --python a Python the pin fits (the shipped lock's: CPython 3.12, x86_64); "
                     "fetch for another machine: --all")


def as_json(steps: Sequence[Step]) -> list[dict]:
    return [{"name": s.package.name, "pinned_version": s.package.version, "installed_version": s.installed,
             "action": s.action, "reason": s.reason, "unmet": list(s.unmet), "lacks": list(s.lacks),
             "result": "unchanged", "file": None,
             "sha256": s.wheel.sha256 if s.wheel else None, "url": s.wheel.url if s.wheel else None}
            for s in steps]


def describe(s: Step) -> str:
    why = f" ({short_reason(s)})" if s.reason else ""
    return f"{s.package.name}: installed {s.installed or '-'}, pinned {s.package.version}: {s.action}{why}"
