"""Lock + target environment -> one action per pinned wheel, decided before anything changes.

The plan is what `install --dry-run` and `--json` show, and what the refusals (a downgrade, an
externally managed Python, no wheel fitting the target) are judged on: all of them happen
here, before any download.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

from packaging.version import InvalidVersion, Version

from ..errors import DowngradeRefused, EnvironmentProblem, ExternallyManaged, Row
from .lock import Lock, LockedPackage, LockedWheel, select_wheel

INSTALL = "install"  # not installed
UPGRADE = "upgrade"  # an older version is installed
DOWNGRADE = "downgrade"  # a newer version is installed: refused without --allow-downgrade
KEEP = "keep"  # installed at the pin, every RECORD file intact
REPAIR = "repair"  # installed at the pin, but files differ from its RECORD
REINSTALL = "reinstall"  # intact, but --force-reinstall
REPLACE = "replace"  # installed under a version that is not PEP 440: no order to judge


@dataclass
class Step:
    package: LockedPackage
    installed: str | None  # the version installed now
    action: str
    wheel: LockedWheel | None = None  # chosen when the action needs one

    @property
    def changes(self) -> bool:
        return self.action != KEEP


def action_for(info: dict | None, pinned: str, *, force: bool = False) -> str:
    """What installing `pinned` does to a distribution in state `info` (the probe's entry)."""
    if info is None:
        return INSTALL
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


def plan(lock: Lock, dists: dict[str, dict | None], *, force: bool = False) -> list[Step]:
    """One Step per package, in lock order (the order they install in); no wheel chosen yet."""
    return [Step(p, (dists.get(p.name) or {}).get("version"), action_for(dists.get(p.name), p.version, force=force))
            for p in lock.packages]


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
        hint="a newer build is installed (the image's own?); pin it with `m3fuse lock add` if the fusion "
             "works with it, or pass --allow-downgrade to install the pinned one anyway")


def refuse_externally_managed(marker: str | None, python: str, *, allowed: bool) -> None:
    """PEP 668: the target's stdlib holds EXTERNALLY-MANAGED and it is not a venv."""
    if marker is None or allowed:
        return
    raise ExternallyManaged(
        headline="the target Python is externally managed (PEP 668); nothing was downloaded or installed",
        details=[("python", python), ("marker", marker)],
        hint=f"install into a virtual environment (`{python} -m venv /opt/venv`, then --python "
             f"/opt/venv/bin/python), or pass --break-system-packages to install into it anyway "
             f"(m3fuse then passes that flag to pip)")


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
                hint="point --python at an interpreter the pinned build was made for (for the shipped lock: "
                     "CPython 3.12 on x86_64 Linux), or pin a matching wheel with `m3fuse lock add`")


def as_json(steps: Sequence[Step]) -> list[dict]:
    return [{"name": s.package.name, "pinned_version": s.package.version, "installed_version": s.installed,
             "action": s.action, "result": "unchanged", "file": None,
             "sha256": s.wheel.sha256 if s.wheel else None, "url": s.wheel.url if s.wheel else None}
            for s in steps]


def describe(s: Step) -> str:
    return f"{s.package.name}: installed {s.installed or '-'}, pinned {s.package.version}: {s.action}"
