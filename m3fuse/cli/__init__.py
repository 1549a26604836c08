"""The command line: parse options, call the library, print. No logic of its own."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import term
from ..textsafe import one_line

from .. import __version__, interrupt, resources
from ..patching import engine, mutex
from ..errors import EXIT_CODES_HELP, EXIT_OK, Interrupted, M3fuseError, UsageProblem
from .paths import AbsPath, absolute_python
from ..patching.patchset import load_all
from ..patching.report import interrupted_line, tree_json, tree_table
from ..target import locate

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _dumps(obj: Any) -> str:
    import json  # only --json output needs it

    return json.dumps(obj, indent=2)


def _emit_error(exc: M3fuseError, as_json: bool, extra: dict[str, Any] | None = None) -> int:
    if as_json:
        body = {"ok": False, "error": {"kind": exc.kind, "exit_code": exc.exit_code, "message": exc.message}}
        body.update(getattr(exc, "payload", None) or {})
        body.update(extra or {})
        click.echo(_dumps(body))
    else:
        term.echo(f"m3fuse: error: {exc.message}", err=True)
    return exc.exit_code


def _run(as_json: bool, body: Callable[[], int]) -> None:
    try:
        code = body()
    except M3fuseError as exc:
        code = _emit_error(exc, as_json)
    sys.exit(code)


def _aiter_warnings(rep: dict[str, Any], as_json: bool) -> None:
    """The known AITER defects of the AITER that is or will be installed: on stderr, never a
    change of exit code."""
    from ..runtime.defects import describe

    if not as_json:
        for line in describe(rep):
            term.echo(f"m3fuse: warning: {line}", err=True)


_exact_pins_option = click.option(
    "--exact-pins", is_flag=True,
    help="Judge the wheels by the lock's pins alone: never keep a newer installed AITER/FlyDSL, install the "
         "pin even where the vLLM release needs more (docs/wheels.md).")


def _needs(tree: engine.TreeState) -> Any:
    """What the tree's release needs of AITER (its set's aiter-needs.toml), or None."""
    if tree.patch_set is None or tree.state == engine.UNSUPPORTED:  # a closest set is not the release's
        return None
    from ..wheels.needs import load_needs

    return load_needs(tree.patch_set.folder)


def _needs_if_found(python: str | None, vllm_root: Path | None, patches_dir: Path | None) -> Any:
    """`install --no-patches`: the needs of the vLLM beside the wheels when one is found and
    known (the pin must not break it either); None when there is none to judge by."""
    try:
        return _needs(engine.inspect(locate(python=python, vllm_root=vllm_root),
                                     load_all(patches_dir or resources.patches_dir())))
    except M3fuseError as exc:
        if exc.kind == "bad-patch-set":
            raise
        return None


def _verify_hint(tree: engine.TreeState, expect: str, wheel_hint: str | None) -> str:
    """The one next step after a failed verify: the tree's first, then the wheels'."""
    fix = "install" if expect == engine.PATCHED else "revert"
    if tree.state in (engine.DRIFTED, engine.UNSUPPORTED):
        try:
            engine.refuse_unless_known(tree, read_only=True)
        except M3fuseError as exc:
            if exc.hint:
                return exc.hint
    if tree.state == engine.PARTIAL:
        return "an interrupted run left it half done: run `m3fuse install` or `m3fuse revert`"
    if tree.state != expect:
        return f"run `m3fuse {fix}`"
    if tree.problems:
        return f"run `m3fuse {fix}`: it removes the stale .pyc files named above"
    return wheel_hint or f"run `m3fuse {fix}` and verify again"


def target_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--python", "python", metavar="PATH", callback=absolute_python,
                     help="Interpreter of the environment holding vLLM (default: the one running m3fuse)."),
        click.option("--vllm-root", type=AbsPath(file_okay=False), metavar="DIR",
                     help="Directory that contains the vllm/ package; overrides discovery."),
        click.option("--patches", "patches_dir", type=AbsPath(file_okay=False), metavar="DIR",
                     help="Folder of patch sets (default: the ones shipped with m3fuse)."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def lock_options(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--lock-timeout", type=float, default=mutex.DEFAULT_TIMEOUT, show_default=True,
                        metavar="SECONDS", help="How long to wait for another m3fuse run on the same tree.")(f)


# Commands whose module is imported only when they are run (or listed by --help): `verify`
# runs in every CI job and must not pay for the lock writer, packaging and tempfile.
_LAZY_COMMANDS = {"fetch": ("wheels", "fetch_command"), "lock": ("wheels", "lock_group"),
                  "env": ("env", "env_command"), "sets": ("sets", "sets_command"),
                  "needs": ("needs", "needs_command")}


class _Group(click.Group):
    """Maps any M3fuseError that escapes a command (fetch, lock ...) to its exit code, so no
    command can end in a traceback for a failure m3fuse knows how to explain. Loads the
    commands of _LAZY_COMMANDS on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is None and cmd_name in _LAZY_COMMANDS:
            from importlib import import_module

            module, attr = _LAZY_COMMANDS[cmd_name]
            cmd = getattr(import_module(f".{module}", __package__), attr)
            self.add_command(cmd, cmd_name)
        return cmd

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except M3fuseError as exc:
            sys.exit(_emit_error(exc, False))

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """SIGINT/SIGTERM: exit 130 with one line saying where the tree stands (see interrupt.py);
        a signal after the command has finished is ignored, never reported as `Aborted!`."""
        interrupt.install()
        try:
            if kwargs.get("standalone_mode", True) is False:
                return super().main(*args, **kwargs)
            return self._standalone(*args, **kwargs)
        except interrupt.Signalled as sig:
            exc = Interrupted(interrupt.report(sig))
            term.echo(f"m3fuse: {one_line(exc.message)}", err=True)  # one line, whatever the paths hold
            sys.exit(exc.exit_code)
        finally:
            interrupt.ignore()


    def _standalone(self, *args: Any, **kwargs: Any) -> Any:
        """click's standalone mode, with one `hint:` line after a usage error (exit 2) as after
        every other failure."""
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            exc.show()
            where = exc.ctx.command_path if exc.ctx is not None else "m3fuse"
            click.echo(f"hint: `{where} --help` lists the options and what each takes", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    # The manifests are read only when --version is asked for: not on every command's start.
    if not value or ctx.resilient_parsing:
        return
    from ..catalog import version_line

    try:
        term.echo(version_line(__version__, load_all(resources.patches_dir())))
    except M3fuseError as exc:
        term.echo(f"m3fuse {__version__} (its patch sets cannot be read: {exc.message})")
    ctx.exit()


@click.group(cls=_Group, context_settings=CONTEXT, epilog=EXIT_CODES_HELP)
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version, the number of patch sets and the newest supported vLLM, and exit.")
def main() -> None:
    """Apply, verify and revert the MiniMax M3 AITER all-reduce + Gemma RMSNorm fusion on an
    installed vLLM. Refuses any file it does not recognise byte for byte."""


def _tree(python: str | None, vllm_root: Path | None, patches_dir: Path | None) -> engine.TreeState:
    """The tree's state. Every manifest is validated but only the matching set's diffs are
    parsed, so verify/status stay as fast with ten sets as with three."""
    vllm = locate(python=python, vllm_root=vllm_root)
    sets = load_all(patches_dir or resources.patches_dir())
    tree = engine.inspect(vllm, sets)
    if tree.patch_set is not None:
        tree.patch_set.parse()
    return tree


def _describe_interrupt(python: str | None, vllm_root: Path | None, patches_dir: Path | None, command: str) -> None:
    """From here on, an interrupt is reported with the tree's state as read at that moment
    (found again then: the signal may come before this run has found it)."""
    interrupt.describe_with(lambda: interrupted_line(
        engine.inspect(locate(python=python, vllm_root=vllm_root), load_all(patches_dir or resources.patches_dir())),
        command))


def _transition(goal: str, python: str | None, vllm_root: Path | None, patches_dir: Path | None,
                dry_run: bool, lock_timeout: float, echo: Callable[[str], None]) -> tuple[engine.TreeState, dict]:
    _describe_interrupt(python, vllm_root, patches_dir, "revert")
    vllm = locate(python=python, vllm_root=vllm_root)
    sets = load_all(patches_dir or resources.patches_dir(), parse=True)
    return engine.converge(vllm, sets, goal, dry_run=dry_run, lock_timeout=lock_timeout, echo=echo)


@main.command(context_settings=CONTEXT, epilog=EXIT_CODES_HELP)
@target_options
@lock_options
@click.option("--no-wheels", is_flag=True, help="Only apply the patches; do not install the pinned wheels.")
@click.option("--no-patches", is_flag=True, help="Only install the pinned wheels; do not patch vLLM.")
@click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
@click.option("--lock", "lock_path", type=AbsPath(dir_okay=False), metavar="FILE",
              help="Wheel lock file (default: the shipped wheels.lock).")
@click.option("--cache-dir", type=AbsPath(file_okay=False), metavar="DIR",
              help="Download cache (default: $XDG_CACHE_HOME/m3fuse).")
@click.option("--find-links", multiple=True, type=AbsPath(file_okay=False), metavar="DIR",
              help="Folder of wheel files to use instead of downloading (still hash-checked).")
@click.option("--allow-downgrade", is_flag=True,
              help="Replace an installed distribution that is newer than its pin (refused otherwise).")
@click.option("--break-system-packages", is_flag=True,
              help="Install into an externally managed (PEP 668) Python; passed on to pip.")
@_exact_pins_option
@click.option("--download-deadline", "deadline", type=float, default=None, metavar="SECONDS",
              help="Give up on a wheel's download after this long, retries included (default: "
                   "$M3FUSE_DOWNLOAD_DEADLINE, else 3600).")
def install(python: str | None, vllm_root: Path | None, patches_dir: Path | None, as_json: bool,
            lock_timeout: float, no_wheels: bool, no_patches: bool, dry_run: bool, lock_path: Path | None,
            cache_dir: Path | None, find_links: tuple[Path, ...], allow_downgrade: bool,
            break_system_packages: bool, exact_pins: bool, deadline: float | None) -> None:
    """Install the pinned wheels, then patch vLLM (or neither)."""
    echo = (lambda s: None) if as_json else term.echo

    def body() -> int:
        if no_wheels and no_patches:
            raise UsageProblem("--no-wheels and --no-patches together leave nothing to do; drop one.")
        if no_patches:
            return steps(None)
        # One run at a time, the wheel step included: the tree's run lock is held from before
        # the wheels are judged until the patches are proved (the patch step takes it again).
        vllm = locate(python=python, vllm_root=vllm_root)
        if not (vllm.root / "vllm").is_dir():  # refused by the inspection below, with its reason
            return steps(vllm)
        with mutex.hold(vllm.root / "vllm", timeout=lock_timeout):
            return steps(vllm)

    def steps(vllm: Any) -> int:
        out: dict[str, Any] = {"ok": True, "command": "install"}
        if not no_patches:
            # Found and parsed once: every set's diffs (install refuses a malformed set), and the
            # vLLM the wheel step must not have changed.
            _describe_interrupt(python, vllm_root, patches_dir, "install")
            sets = load_all(patches_dir or resources.patches_dir(), parse=True)
        needs = None
        if not no_wheels and not no_patches:
            # A vLLM the patches will refuse (missing, drifted, unsupported) or a broken patch set
            # is found before the wheels change the environment, not after.
            known = engine.inspect(vllm, sets)
            engine.refuse_unless_known(known)
            needs = _needs(known)
        elif not no_wheels and not exact_pins:
            needs = _needs_if_found(python, vllm_root, patches_dir)
        if not no_wheels:
            from ..wheels import step as wheels  # imported here: verify --no-wheels must not pay for it
            opts = wheels.WheelOptions(lock_path=lock_path or resources.default_lock(), cache_dir=cache_dir,
                                       find_links=list(find_links), python=python or sys.executable,
                                       allow_downgrade=allow_downgrade, break_system_packages=break_system_packages,
                                       needs=needs, exact_pins=exact_pins, lock_timeout=lock_timeout,
                                       deadline=deadline)
            out["wheels"] = wheels.install_pinned(opts, dry_run=dry_run, echo=echo)
        if not no_patches:
            tree, actions = engine.converge(vllm, sets, engine.PATCHED, dry_run=dry_run, lock_timeout=lock_timeout,
                                            echo=echo)
            out.update(tree_json(tree))
            out["actions"] = actions
        from ..runtime import defects as aiter_defects
        vllm_version = (out.get("vllm") or {}).get("version")
        if not no_wheels:
            out["aiter"] = aiter_defects.planned_report(out["wheels"], lock_path or resources.default_lock(),
                                                        vllm_version)
        else:
            out["aiter"] = aiter_defects.installed_report(Path(out["vllm"]["root"]), vllm_version)
        _aiter_warnings(out["aiter"], as_json)
        if as_json:
            click.echo(_dumps(out))
        return EXIT_OK

    _run(as_json, body)


@main.command(context_settings=CONTEXT, epilog=EXIT_CODES_HELP)
@target_options
@lock_options
@click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
def revert(python: str | None, vllm_root: Path | None, patches_dir: Path | None, as_json: bool,
           lock_timeout: float, dry_run: bool) -> None:
    """Restore the pristine vLLM files exactly (the wheels stay installed)."""
    echo = (lambda s: None) if as_json else term.echo

    def body() -> int:
        tree, actions = _transition(engine.PRISTINE, python, vllm_root, patches_dir, dry_run, lock_timeout, echo)
        if as_json:
            click.echo(_dumps({"ok": True, "command": "revert", **tree_json(tree), "actions": actions}))
        return EXIT_OK

    _run(as_json, body)


@main.command(context_settings=CONTEXT, epilog=EXIT_CODES_HELP)
@target_options
@click.option("--expect", type=click.Choice([engine.PATCHED, engine.PRISTINE]), default=engine.PATCHED,
              show_default=True, help="The state the tree must be in.")
@click.option("--no-wheels", is_flag=True, help="Do not check the pinned wheels (machines without ROCm wheels).")
@click.option("--lock", "lock_path", type=AbsPath(dir_okay=False), metavar="FILE",
              help="Wheel lock file (default: the shipped wheels.lock).")
@_exact_pins_option
def verify(python: str | None, vllm_root: Path | None, patches_dir: Path | None, as_json: bool,
           expect: str, no_wheels: bool, lock_path: Path | None, exact_pins: bool) -> None:
    """Read-only check: exit 0 only if vLLM is as expected and every pinned wheel is accepted
    (the pin, or a build install keeps); names each accepted build and why."""

    def body() -> int:
        tree = _tree(python, vllm_root, patches_dir)
        out: dict[str, Any] = {"command": "verify", "expect": expect, **tree_json(tree)}
        failures, code = engine.judge(tree, expect)
        accepted: list[str] = []
        wheel_hint = None
        if not no_wheels and expect == engine.PATCHED:
            from ..wheels import step as wheels
            judged = wheels.verdict(lock_path or resources.default_lock(), python or sys.executable,
                                    needs=_needs(tree), exact=exact_pins)
            out.update(wheels=judged.results, accepted=judged.accepted, lock=judged.lock)
            accepted, wheel_hint = judged.lines(), judged.hint
            failures += judged.failures
            code = code or judged.exit_code
        from ..runtime import defects as aiter_defects
        probed = next((r.get("installed_version") for r in out.get("wheels", [])
                       if r.get("name") == aiter_defects.AITER_DIST), None)
        out["aiter"] = aiter_defects.installed_report(tree.vllm.root, tree.vllm.version, probed)
        out["ok"] = code == EXIT_OK
        out["failures"] = failures
        if code != EXIT_OK:
            out["hint"] = _verify_hint(tree, expect, wheel_hint)
        if as_json:
            click.echo(_dumps(out))
        else:
            term.echo(tree_table(tree))
            for line in accepted:
                term.echo(line)
            _aiter_warnings(out["aiter"], as_json)
            for f in failures:
                term.echo(f"FAIL: {f}", err=True)
            term.echo("verify: OK" if code == EXIT_OK else f"verify: FAILED (exit {code})")
            if code != EXIT_OK:
                term.echo(f"hint: {out['hint']}", err=True)
        return code

    _run(as_json, body)


@main.command(context_settings=CONTEXT, epilog=EXIT_CODES_HELP)
@target_options
def status(python: str | None, vllm_root: Path | None, patches_dir: Path | None, as_json: bool) -> None:
    """Show vLLM's version and location, the matching patch set and each file's state."""

    def body() -> int:
        tree = _tree(python, vllm_root, patches_dir)
        if as_json:
            click.echo(_dumps({"ok": True, "command": "status", **tree_json(tree)}))
        else:
            term.echo(tree_table(tree))
        return EXIT_OK

    _run(as_json, body)


@main.command(context_settings=CONTEXT, epilog=EXIT_CODES_HELP)
@click.option("--python", "python", metavar="PATH", callback=absolute_python,
              help="Interpreter of the environment holding the new vLLM.")
@click.option("--vllm-root", type=AbsPath(file_okay=False), metavar="DIR",
              help="Directory that contains the new vllm/ package.")
@click.option("--from", "bases", multiple=True, metavar="SET | FILE=SET",
              help="The shipped set to port; FILE=SET takes one file's changes from another set.")
@click.option("--name", metavar="NAME", help="Name (folder) of the new set, e.g. vllm-0.28.0.")
@click.option("--version", "versions", multiple=True, metavar="V",
              help="vLLM version(s) the set is for (default: the tree's version).")
@click.option("--out", type=AbsPath(file_okay=False), metavar="DIR",
              help="Where the set folder goes (default: the patches folder in use).")
@click.option("--patches", "patches_dir", type=AbsPath(file_okay=False), metavar="DIR",
              help="Folder of patch sets to port from (default: the ones shipped with m3fuse).")
@click.option("--workdir", type=AbsPath(file_okay=False), metavar="DIR",
              help="Work folder for files that need a hand (default: m3fuse's cache, port/NAME).")
@click.option("--base-root", "base_roots", multiple=True, type=AbsPath(file_okay=False),
              metavar="DIR", help="Tree(s) holding the base sets' pristine files (else: cache, then pip download).")
@click.option("--edit", is_flag=True, help="Stop at the work folder even when the merge is clean.")
@click.option("--resume", "resume_dir", type=AbsPath(file_okay=False), metavar="WORKDIR",
              help="Finish a set from the hand-resolved files of a work folder.")
@click.option("--wheels", "wheel_dirs", multiple=True, type=AbsPath(file_okay=False),
              metavar="DIR", help="Folder of vLLM release wheels already downloaded (DIR/vllm-X-*.whl or "
                                  "DIR/X/vllm-X-*.whl) to read base files from instead of downloading.")
@click.option("--refresh", is_flag=True, help="Re-derive every ported set from its bases and recorded resolutions.")
@click.option("--record-resolutions", "record", is_flag=True,
              help="Record each ported set's hand resolutions (<file>.resolution.diff) from the set as it is.")
@click.option("--check", is_flag=True, help="With --refresh: write nothing, exit 4 if a set differs.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@lock_options
def port(python: str | None, vllm_root: Path | None, bases: tuple[str, ...], name: str | None,
         versions: tuple[str, ...], out: Path | None, patches_dir: Path | None, workdir: Path | None,
         base_roots: tuple[Path, ...], edit: bool, resume_dir: Path | None, wheel_dirs: tuple[Path, ...],
         refresh: bool, record: bool, check: bool, as_json: bool, lock_timeout: float) -> None:
    """Make a patch set for a vLLM tree that no set matches (three-way merge of a shipped set).

    Without --from, every set is tried per file and the one with the fewest conflicts is taken.
    Never writes into the vLLM tree. A clean merge is not a reviewed set."""
    from ..patching import port as porting
    from ..patching.basesource import BaseSource

    echo = (lambda s: None) if as_json else (lambda s: term.echo(s, err=True))

    def body() -> int:
        source = BaseSource(list(base_roots), list(wheel_dirs), echo=echo)
        if check and not refresh:
            raise UsageProblem("--check goes with --refresh: it re-derives every ported set and writes nothing.")
        if refresh or record:
            return _refresh(patches_dir or resources.patches_dir(), source, record, check, as_json, lock_timeout,
                            others=bool(bases or name or versions or python or vllm_root or edit or resume_dir or out))
        sets = load_all(patches_dir or resources.patches_dir())
        dest = resources.refuse_writing_into_package(out or patches_dir or resources.patches_dir(), "--out DIR")
        extra: dict = {}
        if resume_dir is not None:
            if bases or name or versions or python or vllm_root or edit or base_roots:
                raise UsageProblem("--resume WORKDIR takes only --out, --patches, --json and --lock-timeout; "
                                   "the rest was decided when the work folder was written.")
            result = porting.resume(resume_dir, dest, sets, lock_timeout=lock_timeout)
        else:
            from ..patching.basechoice import port_with_bases

            plain = [b for b in bases if "=" not in b]
            if len(plain) > 1 or not name or (bases and not plain):
                raise UsageProblem("port needs --name NAME and at most one --from SET (plus any FILE=SET); "
                                   "without --from every set is tried and the nearest taken.")
            req = porting.PortRequest(
                vllm=locate(python=python, vllm_root=vllm_root), sets=sets, base=plain[0] if plain else "",
                overrides=[b for b in bases if "=" in b], name=name, versions=list(versions), out=dest,
                workdir=workdir or resources.cache_dir() / "port" / name, base_roots=list(base_roots), edit=edit,
                lock_timeout=lock_timeout)
            result, choice = port_with_bases(req, source, echo)
            extra = {"base_choice": choice.to_json()} if choice else {}
        if as_json:
            click.echo(_dumps({"ok": True, "command": "port", **result.to_json(), **extra}))
        elif result.set_dir is None:
            term.echo(f"port: the merge is clean; edit {result.workdir}/merged/ and run "
                       f"`m3fuse port --resume {result.workdir}` to write the set.")
        else:
            term.echo("\n".join(porting.describe(result)))
            term.echo(porting.next_steps(result, dest))
        return EXIT_OK

    _run(as_json, body)


def _refresh(patches: Path, source: Any, record: bool, check: bool, as_json: bool, lock_timeout: float,
             others: bool) -> int:
    from ..errors import IntegrityError
    from ..patching import lineage

    if others or (record and check):
        raise UsageProblem("--refresh / --record-resolutions take only --patches, --base-root, --wheels, "
                           "--check (with --refresh), --json and --lock-timeout: they work on every ported set.")
    outcomes = lineage.refresh(patches, source, record=record, check=check, lock_timeout=lock_timeout,
                               echo=(lambda s: None) if as_json else (lambda s: term.echo(s, err=True)))
    stale = [o.name for o in outcomes if o.changed]
    if check and stale:
        raise IntegrityError(headline="ported sets differ from what their bases and resolutions give",
                             details=[("stale", n) for n in stale],
                             hint=f"run `m3fuse port --refresh --patches {patches}` and review the diff")
    if as_json:
        click.echo(_dumps({"ok": True, "command": "port", "mode": "record" if record else "refresh",
                           "sets": [o.to_json() for o in outcomes]}))
    else:
        term.echo("\n".join(lineage.describe(outcomes, record=record, check=check)))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    main()
