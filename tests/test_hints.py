"""The next-step audit: every failure m3fuse reports (exit codes 2-6 and 130) ends with one
line saying what to do, and that line fits a terminal (errors.HINT_COLUMNS, with each value
filled in at run time counted as 8 columns).

Walked: the error catalogue (every M3fuseError subclass of every m3fuse module) for its
class default; every `hint=` given at a raise site or to a helper that builds an error, read
off the source with ast; the hint-returning functions of `verify`; the one line of an
interrupted run for every tree state; and the real CLI's output for a failed verify.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import types
from pathlib import Path

import pytest

import m3fuse
from conftest import REPO, run_cli
from m3fuse import errors
from m3fuse.errors import HINT_COLUMNS, M3fuseError

PLACEHOLDER = 8  # columns a value filled in at run time is counted as
PREFIX = "hint: "
SOURCES = sorted((REPO / "m3fuse").rglob("*.py"))


def catalogue() -> list[type[M3fuseError]]:
    for mod in pkgutil.walk_packages(m3fuse.__path__, "m3fuse."):
        if not mod.name.endswith("__main__"):  # it runs the CLI
            importlib.import_module(mod.name)
    seen, todo = [], [M3fuseError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo += cls.__subclasses__()
    return seen


def static_text(node: ast.AST) -> str | None:
    """A string expression with each run-time value as PLACEHOLDER x's; None if not a string."""
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, str) else None
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "x" * PLACEHOLDER for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = static_text(node.left), static_text(node.right)
        return None if left is None or right is None else left + right
    if isinstance(node, ast.IfExp):
        texts = [t for t in (static_text(node.body), static_text(node.orelse)) if t is not None]
        return max(texts, key=len) if texts else None
    return None


def given_hints() -> list[tuple[str, str]]:
    """(file:line, static text) of every `hint=` keyword and every string a hint-named function
    returns, across m3fuse's sources."""
    out = []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "hint":
                        text = static_text(kw.value)
                        if text is not None:
                            out.append((f"{where}:{node.lineno}", text))
            if isinstance(node, ast.FunctionDef) and "hint" in node.name:
                for ret in ast.walk(node):
                    if isinstance(ret, ast.Return) and ret.value is not None:
                        text = static_text(ret.value)
                        if text is not None:
                            out.append((f"{where}:{ret.lineno}", text))
    return out


def too_long(text: str) -> bool:
    return len(PREFIX + text) > HINT_COLUMNS or "\n" in text


def test_every_error_class_has_a_next_step_that_fits_a_line():
    classes = catalogue()
    assert len(classes) > 15  # the walk found the catalogue, not just the base class
    for cls in classes:
        assert cls.exit_code in (2, 3, 4, 5, 6, 130), cls
        if cls is errors.Interrupted:
            continue  # its one line ends with the command to run (below)
        assert cls.next_step, f"{cls.__module__}.{cls.__name__} has no next step"
        assert not too_long(cls.next_step), f"{cls.__name__}: {cls.next_step!r} is longer than a line"
        # Raised with a bare message, it still ends with the class's hint line.
        assert cls("it failed").message.splitlines()[-1] == PREFIX + cls.next_step
        assert cls(headline="it failed").message.splitlines()[-1] == PREFIX + cls.next_step
        # A given hint wins, and is the last line.
        assert cls(headline="it failed", hint="do this").message.splitlines()[-1] == "hint: do this"


def test_every_given_hint_fits_one_terminal_line():
    hints = given_hints()
    assert len(hints) > 60, hints  # the walk found the raise sites
    long = [f"{where}: {len(PREFIX + text)} columns: {text}" for where, text in hints if too_long(text)]
    assert not long, f"hints longer than {HINT_COLUMNS} columns (or with a newline):\n" + "\n".join(long)


@pytest.mark.parametrize("state", ["patched", "pristine", "partial", "drifted"])
@pytest.mark.parametrize("command", ["install", "revert"])
def test_an_interrupted_run_ends_with_the_command_to_run(state, command):
    from m3fuse.interrupt import Signalled, report
    from m3fuse.patching.report import interrupted_line

    # interrupted_line reads only these two fields of a TreeState; a real one needs a tree.
    tree = types.SimpleNamespace(vllm=types.SimpleNamespace(root=Path("/x/site-packages")), state=state)
    line = interrupted_line(tree, command)
    assert "\n" not in line and line.rstrip().split(";")[-1].strip().startswith("`m3fuse "), line
    exc = errors.Interrupted(report(Signalled(2)))
    assert exc.message.count("\n") == 0 and exc.message.endswith("run the command again")


def test_a_failed_verify_ends_with_one_hint_line(tmp_path, vllm_tree):
    tree = vllm_tree("0.26.0")  # pristine: verify expects it patched
    r = run_cli("verify", "--vllm-root", str(tree), "--no-wheels")
    assert r.returncode == 3, r.stdout + r.stderr
    last = r.stderr.rstrip().splitlines()[-1]
    assert last == "hint: run `m3fuse install`", r.stderr
    j = run_cli("verify", "--vllm-root", str(tree), "--no-wheels", "--json")
    import json

    assert json.loads(j.stdout)["hint"] == "run `m3fuse install`"


def test_a_verify_failed_on_stale_bytecode_ends_with_the_command_that_removes_it(tmp_path, vllm_tree):
    import importlib.util
    import json
    import py_compile

    import realvllm

    tree = vllm_tree("0.26.0")
    assert run_cli("install", "--no-wheels", "--vllm-root", str(tree)).returncode == 0
    src = tree / realvllm.HELPER
    decoy = tmp_path / src.name
    decoy.write_bytes(src.read_bytes() + b"\nX = 1\n")
    # An unchecked hash-based .pyc of other text: Python would run it without looking.
    py_compile.compile(str(decoy), cfile=importlib.util.cache_from_source(str(src)),
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    r = run_cli("verify", "--vllm-root", str(tree), "--no-wheels")
    assert r.returncode == 3 and "verify: FAILED" in r.stdout, r.stdout + r.stderr
    assert r.stderr.rstrip().splitlines()[-1] == "hint: run `m3fuse install`: it removes the stale .pyc files named above"
    j = json.loads(run_cli("verify", "--vllm-root", str(tree), "--no-wheels", "--json").stdout)
    assert j["hint"].startswith("run `m3fuse install`") and j["problems"]
    assert run_cli("install", "--no-wheels", "--vllm-root", str(tree)).returncode == 0
    assert run_cli("verify", "--vllm-root", str(tree), "--no-wheels").returncode == 0


def test_a_usage_error_ends_with_a_hint_line():
    for argv, where in ((["status", "--bogus"], "status"), (["frobnicate"], ""), (["env", "nope"], "env")):
        r = run_cli(*argv)
        assert r.returncode == 2, (argv, r.stdout, r.stderr)
        last = r.stderr.rstrip().splitlines()[-1]
        assert last.startswith("hint: `") and f"m3fuse {where}".rstrip() + " --help`" in last, (argv, last)
        assert len(last) <= HINT_COLUMNS
    ok = run_cli("--version")
    assert ok.returncode == 0 and "hint" not in ok.stdout + ok.stderr
