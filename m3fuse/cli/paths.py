"""Path options made absolute where they enter m3fuse, once.

Every path the user types is relative to the directory m3fuse was started in; m3fuse runs
children elsewhere (pip in a temp folder, interpreter queries in "/"), so a relative path that
reached them would name another file. The options convert to absolute paths on parse; symlinks
are kept (a venv's bin/python is a symlink whose own location is what makes it that venv).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from ..target import resolve_python


class AbsPath(click.Path):
    """click.Path that returns an absolute `Path`, without resolving symlinks."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(path_type=Path, **kwargs)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        got = super().convert(value, param, ctx)
        return Path(os.path.abspath(got))


def absolute_python(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--python: a path against the current directory, a bare name through PATH. A venv (or
    any environment) folder stands for its bin/python, which is what was meant."""
    if not value:
        return value
    python = resolve_python(value)
    if os.path.isdir(python):
        exe = os.path.join(python, "bin", "python")
        if os.path.isfile(exe) and os.access(exe, os.X_OK):
            return exe
        from ..errors import EnvironmentProblem  # exit 5, as for any other --python that is no Python

        raise EnvironmentProblem(headline=f"--python {python} is a folder, not a Python interpreter (it has no "
                                          f"bin/python)",
                                 hint="give the interpreter's file, e.g. /path/to/venv/bin/python")
    return python
