"""`m3fuse sets`: thin click wrapper over m3fuse.catalog."""

from __future__ import annotations

from pathlib import Path

import click

from .. import resources
from ..catalog import catalog, render
from . import CONTEXT, _dumps, _run, term
from .paths import AbsPath
from ..errors import EXIT_CODES_HELP, EXIT_OK
from ..patching.patchset import load_all


@click.command("sets", context_settings=CONTEXT, epilog=EXIT_CODES_HELP)
@click.option("--patches", "patches_dir", type=AbsPath(file_okay=False), metavar="DIR",
              help="Folder of patch sets (default: the ones shipped with m3fuse).")
@click.option("--lock", "lock_path", type=AbsPath(dir_okay=False), metavar="FILE",
              help="Wheel lock file (default: the shipped wheels.lock).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def sets_command(patches_dir: Path | None, lock_path: Path | None, as_json: bool) -> None:
    """List the supported vLLM releases, each patch set's file pins and the wheel lock's pins."""

    def body() -> int:
        folder = patches_dir or resources.patches_dir()
        cat = catalog(load_all(folder), folder, lock_path or resources.default_lock())
        if as_json:
            click.echo(_dumps({"ok": True, "command": "sets", **cat}))  # exact strings: JSON escapes them
        else:
            term.echo(render(cat))
        return EXIT_OK

    _run(as_json, body)
