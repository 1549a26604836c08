"""RECORD rows that point outside site-packages, found before pip is run.

pip's uninstall deletes every path an installed distribution's RECORD lists; with a system
Python (as in the Containerfile) it does not even keep to the environment's prefix. `install`
runs pip with --force-reinstall, so the RECORD of every installed distribution it replaces is
acted on; and pip copies the rows of a wheel's own RECORD that name no member into the
installed RECORD, for the next uninstall. So both are read first (bounded, regular files only)
and a row that leaves site-packages is refused by name, before pip sees either.

The one place outside site-packages a RECORD legitimately names is the environment's script
folder: pip writes a console script as `../../../bin/NAME` from `<prefix>/lib/pythonX.Y/site-packages`.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from .. import safeio
from ..errors import Row, UnsafePath

MAX_ROWS_SHOWN = 10


def _scripts_dir(root: Path) -> str | None:
    """`<prefix>/bin` when `root` is pip's `<prefix>/lib/pythonX.Y/{site,dist}-packages`."""
    parts = Path(os.path.normpath(root)).parts
    if len(parts) >= 4 and parts[-1] in ("site-packages", "dist-packages") and parts[-3] in ("lib", "lib64"):
        return os.path.join(*parts[:-3], "bin")
    return None


def outside_rows(record_text: str, root: Path) -> list[str]:
    """The rows of an installed RECORD (paths relative to site-packages `root`) that name a
    path outside it, other than one file in the environment's script folder."""
    base = os.path.normpath(root)
    scripts = _scripts_dir(root)
    bad = []
    for row in csv.reader(record_text.splitlines()):
        if not row or not row[0]:
            continue
        name = row[0]
        where = os.path.normpath(os.path.join(base, name))  # an absolute row stays absolute
        if where == base or where.startswith(base + os.sep):
            continue
        if scripts is not None and os.path.dirname(where) == scripts:
            continue
        bad.append(name)
    return bad


def installed_outside(root: Path, dist: str) -> list[tuple[Path, list[str]]]:
    """[(RECORD, its rows outside `root`)] of every dist-info folder of `dist` in `root` that
    has such rows. A RECORD that is not a regular file, or too large, is refused (UnsafePath)."""
    prefix = dist.replace("-", "_").lower() + "-"
    try:
        infos = sorted(p for p in Path(root).iterdir() if p.name.lower().startswith(prefix)
                       and p.name.endswith(".dist-info"))
    except OSError:
        return []
    out = []
    for info in infos:
        record = info / "RECORD"
        try:
            text = safeio.read_regular(record, safeio.MAX_RECORD).decode("utf-8", "replace")
        except FileNotFoundError:
            continue
        except safeio.Unsafe as exc:
            raise safeio.refusal(exc, nothing="pip was not run and nothing was installed",
                                 hint=f"reinstall {dist} by hand after checking {info}, or remove that folder") from None
        except OSError as exc:
            raise UnsafePath(headline=f"{record}: cannot be read ({exc.strerror}); pip was not run",
                             details=[("RECORD", str(record))], hint="check its permissions") from None
        bad = outside_rows(text, root)
        if bad:
            out.append((record, bad))
    return out


def wheel_outside(path: Path) -> list[str]:
    """The rows of a wheel's own RECORD that are absolute or climb out with '..' (a wheel's
    RECORD names its members, relative to the wheel's root). The wheel was verified and checked
    already (check.py), so the archive itself is known to be sound."""
    from .check import read_member, unsafe_member  # the rule a wheel's member names are held to

    with safeio.open_zip(path) as zf:
        names = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/RECORD")]
        bad = []
        for name in names:
            text = read_member(zf, name, path, safeio.MAX_RECORD).decode("utf-8", "replace")
            bad += [row[0] for row in csv.reader(text.splitlines()) if row and row[0] and unsafe_member(row[0])]
    return bad


def _rows(bad: list[str]) -> list[Row]:
    shown: list[Row] = [("row", b) for b in bad[:MAX_ROWS_SHOWN]]
    if len(bad) > MAX_ROWS_SHOWN:
        shown.append(("and", f"{len(bad) - MAX_ROWS_SHOWN} more"))
    return shown


def refuse_installed(dist: str, root: Path, python: str) -> None:
    found = installed_outside(root, dist)
    if not found:
        return
    details: list[Row] = [("python", python)]
    for record, bad in found:
        details += [("", str(record)), *_rows(bad)]
    raise UnsafePath(
        headline=f"the installed {dist}'s RECORD names files outside {root}; pip would delete them when it "
                 f"replaces {dist}, so pip was not run and nothing was installed",
        details=details,
        hint="check those rows (they may be planted); remove them or that dist-info, then `m3fuse install` again")


def refuse_wheel(path: Path, dist: str) -> None:
    bad = wheel_outside(path)
    if not bad:
        return
    from .check import WheelCheckError

    raise WheelCheckError(
        headline=f"{path.name}: its RECORD names paths outside the wheel; pip would keep them in the installed "
                 f"RECORD and a later uninstall would delete them, so pip was not run and nothing was installed",
        details=[("", str(path)), *_rows(bad)],
        hint=f"do not install this build of {dist}; fetch a sound wheel and re-pin it with `m3fuse lock add`")
