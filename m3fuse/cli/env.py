"""`m3fuse env ARM`: thin click wrapper over m3fuse.runtime.env."""

from __future__ import annotations

from pathlib import Path

import click

from . import term
from . import CONTEXT, _run, _tree, target_options
from ..errors import EXIT_CODES_HELP, EXIT_OK
from ..runtime.env import ARMS, FORMATS, arm_env, render


@click.command("env", context_settings=CONTEXT, epilog=EXIT_CODES_HELP)
@click.argument("arm", type=click.Choice(ARMS))
@target_options
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="sh", show_default=True,
              help="sh: `export K=V` lines for eval; docker: Dockerfile `ENV K=\"V\"` lines; json: one object.")
def env_command(arm: str, python: str | None, vllm_root: Path | None, patches_dir: Path | None,
                as_json: bool, fmt: str) -> None:
    """Print the environment the A/B arm ARM needs on the installed vLLM:
    eval "$(m3fuse env control)". Notes go to stderr."""
    fmt = "json" if as_json else fmt

    def body() -> int:
        tree = _tree(python, vllm_root, patches_dir)
        result = arm_env(arm, tree)
        if fmt != "json":
            for note in result.notes:
                term.echo(f"m3fuse env: note: {note}", err=True)
        term.echo(render(result, fmt, tree))
        return EXIT_OK

    _run(fmt == "json", body)
