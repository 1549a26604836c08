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
    eval "$(m3fuse env control)". Notes go to stderr.

    fused-1stage is an explicit A/B arm, never the default: AITER's one-stage
    fused kernel where vLLM's own rule admits the call (TP8 <= 10 tokens at M3's
    hidden 6144, TP4 <= 21, TP2 <= 80), two-stage up to 512 tokens. vLLM 0.30+
    and AITER 0.1.19.post1+ (ROCm/aiter#4346) only. Public figures (vLLM
    #54787, MI355X TP4): one-stage about 15% faster than all-reduce + norm at
    <= 16 tokens, two-stage 5-8% slower from 32. Open ROCm/aiter#4888: on
    gfx942 the one-stage kernel can be wrong on the first cold graph replay
    (vLLM #52150's workaround: cudagraph_mode FULL_DECODE_ONLY)."""
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
