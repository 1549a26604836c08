"""Issue 25, part B: the folders m3fuse writes into are checked all the way down before the
first write (V10, V12, V15), `port --refresh --check` writes nothing at all, and a signal
during a refresh leaves no stage folder. Real release wheels, the shipped sets, real signals."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m3fuse.errors import UnsafePath
from m3fuse.patching.portfs import MARKER, STAGE_MARK
from m3fuse.wheels.fetch import FetchConfig
from test_lineage import BASE, fix_base_line, patches, refresh, snapshot_sets, wheels  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_cache_under_a_world_writable_grandparent_is_refused(tmp_path):
    """V15: the cache's parent is root's and private, but the folder above it is world-writable
    and not sticky: anyone could swap the parent for a symlink. Refused, nothing created."""
    shared = tmp_path / "shared"
    (shared / "team").mkdir(parents=True)
    os.chmod(shared, 0o777)
    root = shared / "team" / "m3fuse-cache"
    with pytest.raises(UnsafePath) as exc:
        FetchConfig(cache_dir=root).owned("tmp")
    assert str(shared) in exc.value.message and "not sticky" in exc.value.message, exc.value.message
    assert not root.exists()
    # The same folder made sticky (as /tmp is) is accepted.
    os.chmod(shared, 0o1777)
    assert FetchConfig(cache_dir=root).owned("tmp") == root / "tmp"


def test_a_symlink_on_the_way_through_a_shared_folder_is_refused(tmp_path):
    """V15: a link planted in a world-writable folder leads to a private folder; the real path
    alone would pass, the way there does not."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    (shared / "cache").symlink_to(private)
    with pytest.raises(UnsafePath):
        FetchConfig(cache_dir=shared / "cache" / "m3fuse").owned("tmp")
    assert list(private.iterdir()) == []


def test_refresh_check_writes_nothing_and_a_planted_pristine_link_is_refused(patches, wheels, tmp_path):  # noqa: F811
    """V10: `port --refresh --check` with a fresh cache creates nothing; with a `pristine`
    symlink planted in the cache, check and refresh are refused and nothing is written through it."""
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    r = refresh(patches, wheels, "--check", cache=fresh)
    assert r.returncode == 0, r.stderr
    assert list(fresh.iterdir()) == [], "a --check run wrote into the cache"
    victim = tmp_path / "victim"
    victim.mkdir()
    cache = tmp_path / "planted"
    (cache / "m3fuse").mkdir(parents=True)
    (cache / "m3fuse" / "pristine").symlink_to(victim)
    before = snapshot_sets(patches)
    # --check reads the base files out of the wheels into memory: it never opens the cache.
    r = refresh(patches, wheels, "--check", cache=cache)
    assert r.returncode == 0, r.stderr
    assert list(victim.iterdir()) == []
    r = refresh(patches, wheels, cache=cache)
    assert r.returncode == 5, (r.stdout, r.stderr)
    assert "pristine" in r.stderr and "symbolic link" in r.stderr, r.stderr
    assert list(victim.iterdir()) == []
    assert snapshot_sets(patches) == before


def test_a_symlinked_set_folder_is_never_written_through(patches, wheels, tmp_path):  # noqa: F811
    """V12: a derived set folder that is a symlink to a copy elsewhere: the refresh that would
    replace it is refused, and neither the marker nor a new set lands in the copy."""
    fix_base_line(patches, b"class MiniMaxM3DecoderLayer(nn.Module):\n",
                  b"# m3fuse: a base fix\nclass MiniMaxM3DecoderLayer(nn.Module):\n")
    elsewhere = tmp_path / "elsewhere" / "vllm-0.28.0"
    shutil.move(str(patches / "vllm-0.28.0"), str(elsewhere))
    (patches / "vllm-0.28.0").symlink_to(elsewhere)
    before = _tree(elsewhere.parent)
    sets_before = snapshot_sets(patches)
    r = refresh(patches, wheels)
    assert r.returncode == 5, (r.stdout, r.stderr)
    assert "vllm-0.28.0" in r.stderr and "symbolic link" in r.stderr, r.stderr
    assert _tree(elsewhere.parent) == before
    assert not (elsewhere / MARKER).exists()
    assert [p.name for p in patches.iterdir() if STAGE_MARK in p.name] == []
    assert snapshot_sets(patches) == sets_before  # the refusal came before any set was replaced


def test_signals_during_a_refresh_leave_no_stage_folder(patches, wheels, tmp_path):  # noqa: F811
    """V12: SIGINT/SIGTERM at random instants of a refresh that rewrites every derived set: the
    run exits 130 with one line (or finishes), no stage folder is left, every set is whole."""
    fix_base_line(patches, b"class MiniMaxM3DecoderLayer(nn.Module):\n",
                  b"# m3fuse: a base fix\nclass MiniMaxM3DecoderLayer(nn.Module):\n")
    start = tmp_path / "start"
    shutil.copytree(patches, start)
    cache = tmp_path / "cache"
    t0 = time.monotonic()
    r = refresh(patches, wheels, cache=cache)  # warms the pristine cache; the final state
    whole = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    final = snapshot_sets(patches)
    original = snapshot_sets(start)
    names = sorted({k.split("/")[0] for k in {**final, **original}})
    rng = random.Random(f"{os.environ.get('M3FUSE_STRESS_SEED', '25')}-refresh")
    counts = {"interrupted": 0, "finished": 0}
    for i in range(16):
        shutil.rmtree(patches)
        shutil.copytree(start, patches)
        sig = signal.SIGTERM if i % 4 == 3 else signal.SIGINT
        env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
        proc = subprocess.Popen([sys.executable, "-m", "m3fuse", "port", "--refresh", "--patches", str(patches),
                                 "--wheels", str(wheels)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        end = time.perf_counter() + rng.uniform(0.2, 1.0) * whole
        while proc.poll() is None and time.perf_counter() < end:
            pass
        if proc.poll() is None:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
        why = (i, signal.Signals(sig).name, proc.returncode, err[-1500:])
        assert "Traceback" not in err, why
        assert [p.name for p in patches.iterdir() if STAGE_MARK in p.name] == [], why
        now = snapshot_sets(patches)
        for n in names:  # each set is its old bytes or its new ones, never a mix
            mine = {k: v for k, v in now.items() if k.split("/")[0] == n}
            assert mine in ({k: v for k, v in original.items() if k.split("/")[0] == n},
                            {k: v for k, v in final.items() if k.split("/")[0] == n}), (why, n)
        if proc.returncode == 0:
            counts["finished"] += 1
            assert now == final, why
        else:
            assert proc.returncode == 130, why
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("m3fuse: interrupted by "), why
            # Once the refresh has begun, the line says where the sets stand and what finishes it.
            assert ("`m3fuse port --refresh` on" in lines[0] and "run it again" in lines[0]
                    or "it came before the command touched" in lines[0]), why
            counts["interrupted"] += 1
            # The next refresh finishes the job.
            r = refresh(patches, wheels, cache=cache)
            assert r.returncode == 0 and snapshot_sets(patches) == final, (why, r.stderr)
    assert counts["interrupted"] >= 4, counts
