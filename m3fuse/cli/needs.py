"""`m3fuse needs SET_DIR --vllm RELEASE`: (re)generate a set's aiter-needs.toml from its release.

A thin wrapper over wheels/needs.py; the wheel plan reads what this writes.
"""

from __future__ import annotations

from pathlib import Path

import click

from . import term

from ..errors import PatchSetError, UsageProblem


@click.command("needs")
@click.argument("set_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--vllm", "releases", multiple=True, required=True, type=click.Path(path_type=Path, exists=True),
              help="The release's vLLM wheel (vllm-X-*.whl) or a folder holding its vllm/; one per release "
                   "the set covers. Repeatable.")
@click.option("--check", is_flag=True, help="Write nothing; exit 3 if the file differs from a fresh derivation.")
def needs_command(set_dir: Path, releases: tuple[Path, ...], check: bool) -> None:
    """Derive what the set's vLLM release(s) need of AITER and FlyDSL (the M3 model's imports,
    the fused path's AITER calls, the AITER vLLM names) into SET_DIR/aiter-needs.toml."""
    from ..patching.patchset import load_patchset
    from ..wheels.needs import NEEDS_FILE, Release, derive, render, write_needs

    patch_set = load_patchset(set_dir).parse()
    for r in releases:
        v = Release(r).version()
        if v not in patch_set.vllm_versions:
            raise UsageProblem(headline=f"{r} is vLLM {v}, which the set {patch_set.name} does not cover",
                               details=[("set", str(set_dir)), ("covers", ", ".join(patch_set.vllm_versions))],
                               hint="pass the release wheel of each version in the set's manifest")
    text = render(derive(list(releases), patch_set), patch_set.name)
    path = set_dir / NEEDS_FILE
    if check:
        from .. import safeio

        try:
            old = safeio.read_text(path, safeio.MAX_SET_FILE)  # a regular file only, bounded, strict UTF-8
        except FileNotFoundError:
            old = None
        except (OSError, safeio.Unsafe) as exc:
            raise PatchSetError(headline=f"{path} cannot be read: {getattr(exc, 'reason', None) or exc}",
                                details=[("set", patch_set.name)],
                                hint=f"remove it and regenerate it: m3fuse needs {set_dir} "
                                     + " ".join(f"--vllm {r}" for r in releases)) from None
        if old != text:
            raise PatchSetError(headline=f"{path} is {'stale' if old else 'missing'}",
                                details=[("set", patch_set.name)],
                                hint=f"regenerate it: m3fuse needs {set_dir} " + " ".join(f"--vllm {r}" for r in releases))
        term.echo(f"{path}: up to date")
        return
    write_needs(path, text)
    term.echo(f"wrote {path}")
