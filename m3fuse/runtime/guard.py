"""The `vllm.general_plugins` entry point: every vLLM process that loads plugins says which
patch set and state its vLLM tree is in, and with M3FUSE_GUARD=strict refuses to start unless
the tree is patched.

vLLM's loader (vllm/plugins/__init__.py, 0.24.0-0.33.0) imports this module inside a
try/except that only logs, then calls `guard()` outside any: so a refusal is raised from the
call, never at import. It has imported `vllm` (and torch) already; this module imports neither
and finds the tree from where the `vllm` package lives. The verdict is `m3fuse verify`'s
(engine.inspect + engine.judge against the shipped sets).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

ENV = "M3FUSE_GUARD"
LOG, STRICT, OFF = "log", "strict", "off"
MODES = (LOG, STRICT, OFF)
# The run mode (runtime/env.py's MODE_VAR and OFF arm, not imported: that module parses vLLM
# sources) that runs upstream code: on a pristine tree it is a deliberate control run.
CONTROL_VAR, CONTROL_VALUE = "M3_AITER_AR_RMS_MODE", "off"

# A child of vLLM's "vllm" logger: vLLM's own handler and format, without importing vllm.logger.
logger = logging.getLogger("vllm.m3fuse.guard")


class GuardRefused(RuntimeError):
    """M3FUSE_GUARD=strict and the vLLM tree is not patched (or M3FUSE_GUARD is misspelt):
    the vLLM process must not start."""


def mode(environ: Mapping[str, str] = os.environ) -> str:
    value = environ.get(ENV, "").strip()
    if not value:
        return LOG
    if value.lower() in MODES:
        return value.lower()
    # A misspelt safety switch must not quietly mean "only log".
    raise GuardRefused(f"{ENV}={value!r} is not one of {', '.join(MODES)} (default {LOG}: log the state; "
                       f"{STRICT}: refuse to start unless vLLM is patched; {OFF}: no check). Set one of "
                       f"them or unset {ENV}.")


def vllm_root() -> Path:
    """The directory that holds the `vllm` package this process runs."""
    mod = sys.modules.get("vllm")
    where = getattr(mod, "__file__", None)
    if where:
        return Path(where).resolve().parent.parent
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise GuardRefused("the m3fuse guard runs in a process where `vllm` cannot be found.")
    return Path(locations[0]).resolve().parent


def check(root: Path | None = None) -> tuple[str, bool]:
    """One log line naming set, state, vLLM version and location, plus whether the tree is
    patched (what `m3fuse verify` would accept)."""
    head, failures, _ = _verdict(root)
    return _line(head, failures), not failures


def _line(head: str, failures: list[str]) -> str:
    return " -- ".join([head, " ".join(failures)]) if failures else head


def _verdict(root: Path | None) -> tuple[str, list[str], bool]:
    """The line naming set, state, version and location; what `m3fuse verify` fails on; and
    whether the tree is cleanly pristine (what `m3fuse verify --expect pristine` accepts)."""
    from dataclasses import replace

    from .. import resources
    from ..patching import engine
    from ..patching.patchset import load_all
    from ..target import from_root

    vllm = from_root(root or vllm_root(), python=sys.executable)
    # Without the dist-info, inspect skips the comparison with vLLM's RECORD (thousands of rows,
    # most of the guard's time); the state comes from the content hashes alone either way.
    tree = engine.inspect(replace(vllm, dist_info=None), load_all(resources.patches_dir()))
    failures, _ = engine.judge(tree, engine.PATCHED)
    line = (f"m3fuse guard: set {tree.patch_set.name if tree.patch_set else 'none'}, state {tree.state}, "
            f"vllm {vllm.version or '(version unknown)'} at {vllm.root}")
    return line, failures, engine.judge(tree, engine.PRISTINE)[1] == 0


def _emit(level: int, line: str) -> None:
    if logger.hasHandlers():
        logger.log(level, "%s", line)
    else:
        # vLLM 0.31.0+ sets up its logging only once the command line is parsed
        # (vllm/entrypoints/cli/main.py:113 in 0.33.0), after the API server's first plugin load
        # (from add_cli_args): with no handler yet, the line would be lost below WARNING.
        print(f"{logging.getLevelName(level)} {line}", file=sys.stderr, flush=True)


def guard() -> None:
    """The plugin function vLLM calls once per process (see module docstring)."""
    how = mode()
    if how == OFF:
        return
    try:
        head, failures, pristine = _verdict(None)
    except Exception as exc:  # the default mode never stops vLLM for m3fuse's own failure
        if how == STRICT:
            raise GuardRefused(f"m3fuse guard: could not check the vLLM tree ({exc}); {ENV}=strict refuses "
                               f"to start.") from exc
        _emit(logging.WARNING, f"m3fuse guard: could not check the vLLM tree: {exc}")
        return
    line = _line(head, failures)
    if not failures:
        _emit(logging.INFO, line)
    elif pristine and how != STRICT and os.environ.get(CONTROL_VAR, "").strip() == CONTROL_VALUE:
        # The upstream arm of an A/B run: `m3fuse revert` made the tree pristine on purpose.
        _emit(logging.INFO, f"{head} ({CONTROL_VAR}={CONTROL_VALUE}: a control run of upstream code)")
    elif how == STRICT:
        raise GuardRefused(f"{line}. {ENV}=strict refuses to start vLLM on a tree that is not patched: run "
                           f"`m3fuse install` (or `m3fuse verify` to see why), or unset {ENV}.")
    else:
        _emit(logging.WARNING, line)
