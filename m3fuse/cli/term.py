"""Every line of text the CLI prints goes through here (textsafe.py says why); --json output,
which JSON already escapes, is printed as it is."""

from __future__ import annotations

from typing import Any

import click

from ..textsafe import visible


def echo(message: Any = "", err: bool = False) -> None:
    click.echo(visible(str(message)), err=err)


def echo_err(message: Any = "") -> None:
    echo(message, err=True)
