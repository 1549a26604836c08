"""`m3fuse fetch` and `m3fuse lock add|check`: thin click wrappers over wheels/fetch/lock.

Failures are raised as M3fuseError subclasses; the main group maps them to exit codes.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from . import term

from .paths import AbsPath, absolute_python
from ..errors import EnvironmentProblem, UsageProblem
from ..wheels.lock import LockedWheel, add_wheel, load_lock, url_problem
from ..resources import default_lock, refuse_writing_into_package


def _echo(msg: str) -> None:
    term.echo(msg, err=True)


_lock_option = click.option("--lock", "lock_path", type=AbsPath(dir_okay=False),
                            default=None, help="Wheel lock to use (default: the shipped wheels.lock).")
_cache_option = click.option("--cache-dir", type=AbsPath(file_okay=False), default=None,
                             help="Download cache (default: $XDG_CACHE_HOME/m3fuse).")


@click.command("fetch")
@click.option("--dest", required=True, type=AbsPath(file_okay=False),
              help="Folder to place the verified wheels in (use it later with --find-links).")
@_lock_option
@_cache_option
@click.option("--find-links", multiple=True, type=AbsPath(file_okay=False),
              help="Folder of wheel files to take pinned wheels from (still hash-checked). Repeatable.")
@click.option("--python", "python", default=None, callback=absolute_python,
              help="Target interpreter whose tags choose the wheel (default: this Python).")
@click.option("--all", "all_wheels", is_flag=True,
              help="Fetch every wheel in the lock, whatever the target interpreter.")
@click.option("--download-deadline", "deadline", type=float, default=None, metavar="SECONDS",
              help="Give up on a wheel's download after this long, retries included (default: "
                   "$M3FUSE_DOWNLOAD_DEADLINE, else 3600).")
@click.option("--python-version", metavar="X.Y", default=None,
              help="With --all: the CPython of the machine or image the wheels are for; refuse a pin with no "
                   "wheel for it.")
@click.option("--for-vllm", metavar="X.Y.Z", default=None,
              help="Leave out pins that vLLM X.Y.Z cannot run M3 with (install keeps the environment's own "
                   "build there and never installs them).")
def fetch_command(dest: Path, lock_path: Path | None, cache_dir: Path | None, find_links: tuple[Path, ...],
                  python: str | None, all_wheels: bool, deadline: float | None, python_version: str | None,
                  for_vllm: str | None) -> None:
    """Download and verify the pinned wheels into DEST without installing anything
    (for air-gapped machines and multi-stage container builds)."""
    from ..wheels.step import WheelOptions, fetch_only

    if python_version is not None and not all_wheels:
        raise UsageProblem(headline="--python-version goes with --all",
                           hint="add --all: it fetches the lock's wheels for another machine's Python")
    opts = WheelOptions(lock_path=lock_path or default_lock(), cache_dir=cache_dir, find_links=list(find_links),
                        python=python or sys.executable, all_wheels=all_wheels, deadline=deadline,
                        python_version=python_version,
                        needs=_release_needs(for_vllm) if for_vllm else None, skip_unfit=bool(for_vllm))
    for p in fetch_only(opts, dest, echo=_echo):
        term.echo(str(p))


def _release_needs(version: str):
    """The shipped set's needs for vLLM `version` (the set that covers it by its manifest)."""
    from ..patching.patchset import load_all
    from ..resources import patches_dir
    from ..wheels.needs import load_needs

    sets = load_all(patches_dir())
    found = next((s for s in sets if version in s.vllm_versions), None)
    if found is None:
        raise UsageProblem(headline=f"--for-vllm {version}: no shipped patch set covers that release",
                           details=[("covered", ", ".join(v for s in sets for v in s.vllm_versions))],
                           hint="give the vLLM release of the image (its tag), as `m3fuse sets` lists them")
    return load_needs(found.folder)


@click.group("lock")
def lock_group() -> None:
    """Maintain the wheel lock (wheels.lock)."""


@lock_group.command("add")
@click.argument("source")
@_lock_option
@_cache_option
@click.option("--url", "record_url", default=None,
              help="URL to record for a local FILE (default: its file:// URL).")
def lock_add(source: str, lock_path: Path | None, cache_dir: Path | None, record_url: str | None) -> None:
    """Pin the wheel at SOURCE (a URL or a local file): compute its sha256 and size, read its
    name and version from its metadata, and add or update the entry in the lock."""
    from .. import safeio
    from ..wheels.fetch import CEILING_VAR, FetchConfig, download, max_wheel_bytes
    from ..fingerprint import hash_file
    from ..wheels.lock import url_filename
    from ..wheels.check import check_members, read_metadata

    lock_path = refuse_writing_into_package(lock_path or default_lock(), "--lock FILE")
    local = Path(source)
    with tempfile.TemporaryDirectory(prefix="m3fuse-lock-") as d:
        if "://" not in source:
            if not local.is_file():
                raise UsageProblem(headline=f"{source} is neither a URL nor an existing wheel file",
                                   hint="pass an https:// or file:// URL, or the path of a .whl file")
            path = local.resolve()
            url = record_url or path.as_uri()
            fname = path.name
        else:
            if record_url:
                raise UsageProblem(headline="--url only applies to a local FILE",
                                   hint="drop --url: for a URL SOURCE the URL itself is recorded")
            url = source
            problem = url_problem(url)
            if problem:
                raise UsageProblem(headline=f"refusing to pin {url}", details=[("problem", problem)],
                                   hint="pin an https:// URL (plain http only to 127.0.0.1, ::1 or localhost), or a file")
            fname = url_filename(url)
            path = Path(d) / fname
            if url.lower().startswith("file:"):
                from urllib.parse import urlsplit
                from urllib.request import url2pathname

                path = Path(url2pathname(urlsplit(url).path))
        # The name first: nothing that is not a wheel is read, let alone hashed to its end.
        if not fname.endswith(".whl"):
            raise UsageProblem(headline=f"{source} does not name a .whl file", details=[("file name", fname)],
                               hint="pin a wheel (.whl); m3fuse installs no source distributions")
        if path.parent == Path(d):
            sha, size = download(url, path, FetchConfig(cache_dir=cache_dir, echo=_echo), label=fname)
        else:
            try:
                sha, size = hash_file(path, max_wheel_bytes())
            except safeio.Unsafe as exc:
                raise safeio.refusal(exc, nothing="the lock was not changed",
                                     hint=f"pin a wheel file (at most {max_wheel_bytes()} bytes; raise "
                                          f"{CEILING_VAR} for a larger one)") from None
            except OSError as exc:
                raise UsageProblem(headline=f"cannot read {path}", details=[("error", str(exc.strerror or exc))],
                                   hint="pass a readable .whl file") from None
        check_members(path)
        name, version = read_metadata(path)
        from ..wheels.fit import wheel_facts  # what the plan judges this pin by before any download
        from ..resources import patches_dir

        facts = wheel_facts(path, name, version, sha, patches_dir())
    _warn_unusual_pin(lock_path, name, url)
    action = add_wheel(lock_path, name, version, LockedWheel(fname, url, sha, size), facts=facts)
    term.echo(f"{action}: {name} {version} {fname} sha256={sha} size={size} in {lock_path}")


def _warn_unusual_pin(lock_path: Path, name: str, url: str) -> None:
    """What `lock add` accepts but a user rarely means: a pin only this machine can fetch, and a
    distribution m3fuse's lock did not pin before (a typo'd or unrelated wheel)."""
    from packaging.utils import canonicalize_name

    if url.lower().startswith("file:"):
        _echo(f"m3fuse: warning: {url} is a file:// URL: only this machine can fetch it (and only while the "
              f"file exists); pass --url with the address others download it from")
    pinned = [p.name for p in load_lock(lock_path, spec=False).packages] if lock_path.is_file() else []
    if pinned and canonicalize_name(name) not in {canonicalize_name(n) for n in pinned}:
        _echo(f"m3fuse: warning: {lock_path} pins no {name} yet (it pins {', '.join(pinned)}); m3fuse installs "
              f"every distribution of the lock, so {name} will be installed too")


@lock_group.command("check")
@_lock_option
@_cache_option
@click.option("--write-sizes", is_flag=True, help="Record the verified size of wheels the lock gives none for.")
def lock_check(lock_path: Path | None, cache_dir: Path | None, write_sizes: bool) -> None:
    """Download every pinned wheel again (bypassing the cache) and confirm hash and size."""
    from .. import safeio
    from ..wheels.fetch import FetchConfig, download, local_source, max_wheel_bytes, mismatch_error, mismatch_rows
    from ..fingerprint import hash_file
    from ..wheels.lock import set_size

    lock_path = lock_path or default_lock()
    if write_sizes:
        refuse_writing_into_package(lock_path, "--lock FILE")
    lock = load_lock(lock_path)
    cfg = FetchConfig(cache_dir=cache_dir, echo=_echo)
    bad: list = []
    unreachable: list = []
    with tempfile.TemporaryDirectory(prefix="m3fuse-check-") as d:
        for p in lock.packages:
            for w in p.wheels:
                tmp = Path(d) / w.name
                try:
                    src = local_source(w, FetchConfig())  # file:// pins are read in place
                    if src is not None:
                        if not src.is_file():
                            raise EnvironmentProblem(headline=f"{src} does not exist")
                        try:
                            sha, size = hash_file(src, w.size if w.size is not None else max_wheel_bytes())
                        except safeio.TooLarge:
                            sha, size = "", -1  # past the pinned size: a mismatch, shown without its figures
                        except safeio.Unsafe as exc:
                            raise EnvironmentProblem(headline=f"{src}: {exc.reason}") from None
                    else:
                        sha, size = download(w.url, tmp, cfg, label=w.name, expected_size=w.size)
                except EnvironmentProblem as exc:
                    unreachable += [("", w.name), ("error", exc.headline), *exc.details]
                    term.echo(f"UNREACHABLE {w.name}")
                    continue
                finally:
                    tmp.unlink(missing_ok=True)
                if sha != w.sha256 or (w.size is not None and size != w.size):
                    bad += mismatch_rows(w, w.url, sha, size, reveal=src is None or src.name == w.name)
                    term.echo(f"MISMATCH {w.name}")
                    continue
                term.echo(f"ok {w.name} sha256={sha} size={size}")
                if w.size is None and write_sizes:
                    set_size(lock_path, w.name, size)
                    term.echo(f"  recorded size {size} in {lock_path}")
    if bad:
        raise mismatch_error(bad, removed=False)
    if unreachable:
        n = sum(1 for label, _ in unreachable if not label)
        raise EnvironmentProblem(headline=f"{n} pinned wheel(s) of {lock_path} could not be checked",
                                 details=unreachable,
                                 hint="check the network or proxy, or the file:// paths, and run `m3fuse lock check` again")
