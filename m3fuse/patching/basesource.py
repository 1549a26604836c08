"""Where `port`, `port --refresh` and base choice get a set's pristine release files from.

Port's own order is --base-root trees, then m3fuse's content-addressed cache, then the
release wheel through the user's pip. A maintainer usually already holds the release wheels
(the test suite downloads them): `--wheels DIR` reads the files out of those wheels into the
cache first, so nothing is downloaded. Every file is accepted only under its set's pin.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import safeio
from ..fingerprint import sha256_bytes
from .. import ownedpaths
from .patchset import PatchSet, Target


def pip_config_sources() -> str:
    """Which pip configuration a download goes through, named by file or variable only (the
    index's address is the user's business and never printed)."""
    env = sorted(k for k in os.environ if k.startswith("PIP_") and k != "PIP_DISABLE_PIP_VERSION_CHECK")
    xdg = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    files = [Path("/etc/pip.conf"), Path("/etc/xdg/pip/pip.conf"), xdg / "pip" / "pip.conf",
             Path.home() / ".pip" / "pip.conf", Path(sys.prefix) / "pip.conf"]
    found = [str(p) for p in files if p.is_file()]
    parts = [f"{k} (environment)" for k in env] + found
    where = ", ".join(parts) if parts else "pip's defaults (no pip.conf, no PIP_* variable)"
    return f"{sys.executable} -m pip download, configured by {where}"


def _wheels_for(version: str, dirs: list[Path]) -> list[Path]:
    # A folder of wheels, or the test cache's layout DIR/VERSION/vllm-VERSION-*.whl.
    out: list[Path] = []
    for d in dirs:
        out += sorted(d.glob(f"vllm-{version}-*.whl")) + sorted(d.glob(f"{version}/vllm-{version}-*.whl"))
    return out


def store(cache: Path, data: bytes) -> None:
    """Put `data` in the content-addressed cache: a file under its own sha256 is whole or absent.
    The cache and every folder above it are checked first, and the file is written relative to
    the checked folder (ownedpaths.py): a `pristine` symlink planted in a shared cache is refused,
    never written through."""
    from .portfs import own_folder

    own_folder(cache, "cache folder")
    ownedpaths.write_into(cache, sha256_bytes(data), data, mode=0o644)


@dataclass
class BaseSource:
    base_roots: list[Path] = field(default_factory=list)
    wheel_dirs: list[Path] = field(default_factory=list)
    cache: Path | None = None
    echo: Callable[[str], None] = lambda _: None
    # `port --refresh --check`: nothing is written, not even to the cache; files read out of
    # wheels are kept in memory for the run.
    read_only: bool = False
    _memory: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cache is None:
            from .port import default_cache
            self.cache = default_cache()

    def _prime(self, pset: PatchSet, targets: list[Target]) -> None:
        assert self.cache is not None
        want = {t.path: t.pristine_sha256 for t in targets if not (self.cache / t.pristine_sha256).is_file()}
        for version in pset.vllm_versions:
            for wheel in _wheels_for(version, self.wheel_dirs) if want else []:
                try:
                    # A regular file only; each member inflated through a bound (a shared wheel
                    # folder may hold a zip bomb: it is skipped, never inflated).
                    with safeio.open_zip(wheel) as zf:
                        for rel, pin in list(want.items()):
                            try:
                                data = safeio.read_member(zf, rel, safeio.MAX_SOURCE, shown=wheel)
                            except KeyError:
                                continue
                            if sha256_bytes(data) == pin:
                                if self.read_only:
                                    self._memory[pin] = data
                                else:
                                    store(self.cache, data)
                                del want[rel]
                except (OSError, safeio.Unsafe):
                    continue  # not a usable wheel: the next source is tried, and named if all fail

    def files(self, pset: PatchSet, targets: list[Target]) -> dict[str, bytes]:
        """Each target's pristine file as `pset` pins it."""
        from .port import base_files
        assert self.cache is not None
        self._prime(pset, targets)
        got = {t.path: self._memory[t.pristine_sha256] for t in targets if t.pristine_sha256 in self._memory}
        rest = [t for t in targets if t.path not in got]
        if rest:
            got.update(base_files(pset, rest, base_roots=self.base_roots, cache=self.cache, echo=self.echo,
                                  store=not self.read_only))
        return got

    def pristine(self, pset: PatchSet, target: Target) -> bytes:
        return self.files(pset, [target])[target.path]
