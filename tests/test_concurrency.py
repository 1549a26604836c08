"""Issue 6, part 2: two to four `install` / `revert` runs started together on one real tree.

Every run must either do its work (exit 0, the tree at its goal when it finished) or exit 5
with "another m3fuse run holds the lock" after its wait; the tree must end consistent. Each
round is checked for linearisability: some order of the successful runs, each seeing the tree
its predecessor left, must explain every run's reported changes and the final bytes. Some
rounds hold the lock from the test for a while (so short waits really expire), some add a
concurrent read-only `verify` (which must never see a torn file), and some SIGKILL one of the
runs mid-write while the others wait (the kernel drops its lock; a waiter finishes the job).
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest

import faultkit
from faultkit import FULL

RELEASES = ["0.24.0", "0.26.0", "0.33.0"]
SEED = int(os.environ.get("M3FUSE_STRESS_SEED", str(int(time.time()) % 100000)))
TOTALS = {"races": 0, "runs": 0, "did_work_or_noop": 0, "lock_busy_exit5": 0, "killed_mid_race": 0,
          "concurrent_verifies": 0, "held_lock_rounds": 0}
GOAL = {"install": "patched", "revert": "pristine"}


@pytest.fixture(scope="module", autouse=True)
def _figures():
    yield
    faultkit.record("concurrency", seed=SEED, **TOTALS)


def _explains(start: dict[str, str], runs: list[dict], final: dict[str, str]) -> bool:
    """Is there an order of the successful runs consistent with what each reported?"""
    for order in itertools.permutations(runs):
        state = dict(start)
        ok = True
        for run in order:
            goal = GOAL[run["command"]]
            would = sorted(rel for rel, s in state.items() if s != goal)
            if would != sorted(run["changed"]):
                ok = False
                break
            state = {rel: goal for rel in state}
        if ok and state == final:
            return True
    return False


@pytest.mark.stress
@pytest.mark.parametrize("version", RELEASES)
def test_simultaneous_runs_on_one_tree(version, pristine_trees, tmp_path):
    root = tmp_path / "sp"
    shutil.copytree(pristine_trees(version), root)
    kind = "shipped" if faultkit.shipped_set(version) else "sample"
    patches, setdir = faultkit.isolated_sets(tmp_path, version, kind)
    pins = faultkit.pins(setdir)
    targets = list(pins)
    where = ["--vllm-root", str(root), "--patches", str(patches)]
    assert faultkit.run("install", "--no-wheels", *where).returncode == 0
    data = {(rel, "patched"): (root / rel).read_bytes() for rel in targets}
    assert faultkit.run("revert", *where).returncode == 0
    data.update({(rel, "pristine"): (root / rel).read_bytes() for rel in targets})

    rng = random.Random(f"{SEED}-{version}")
    rounds = 40 if FULL else 5
    for i in range(rounds):
        start = {rel: rng.choice(["pristine", "patched"]) for rel in targets}
        for rel, s in start.items():
            (root / rel).write_bytes(data[(rel, s)])
        n = rng.randint(2, 4)
        commands = [rng.choice(["install", "revert"]) for _ in range(n)]
        timeouts = [rng.choice([0, 0.05, 0.3, 10]) for _ in range(n)]
        hold = rng.choice([0, 0, 0.2, 0.5])
        kill_one = rng.random() < 0.25
        with_verify = rng.random() < 0.4
        holder = None
        if hold:
            holder = os.open(root / "vllm", os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(holder, fcntl.LOCK_EX)
            TOTALS["held_lock_rounds"] += 1
        procs = []
        for j, (cmd, wait) in enumerate(zip(commands, timeouts)):
            env = faultkit.cli_env()
            if kill_one and j == 0:
                env.update(M3FUSE_TEST_CHECKPOINTS=str(tmp_path / f"log-{i}"), M3FUSE_TEST_KILL_AT=str(rng.randint(2, 6)))
                wait = 10
            args = [cmd, *(["--no-wheels"] if cmd == "install" else []), "--json", "--lock-timeout", str(wait), *where]
            procs.append(subprocess.Popen(faultkit.cli_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=env))
        verifies = []
        if with_verify:
            for _ in range(3):
                v = faultkit.run("verify", "--no-wheels", "--json", *where)
                out = json.loads(v.stdout)
                assert out["state"] in ("pristine", "patched", "partial"), out
                assert v.returncode in (0, 3)
                verifies.append(out["state"])
            TOTALS["concurrent_verifies"] += len(verifies)
        if holder is not None:
            time.sleep(hold)
            os.close(holder)
        results = []
        for j, (cmd, p) in enumerate(zip(commands, procs)):
            out, err = p.communicate(timeout=120)
            results.append((j, cmd, p.returncode, out, err))
        TOTALS["races"] += 1
        TOTALS["runs"] += n

        ok_runs = []
        killed = False
        for j, cmd, rc, out, err in results:
            if rc == -signal.SIGKILL:
                assert kill_one and j == 0
                killed = True
                TOTALS["killed_mid_race"] += 1
                continue
            body = json.loads(out)
            if rc == 0:
                assert body["ok"] and body["state"] == GOAL[cmd], body
                ok_runs.append({"command": cmd, "changed": body["actions"]["changed"]})
                TOTALS["did_work_or_noop"] += 1
            else:
                assert rc == 5, (cmd, rc, out, err)
                assert body["error"]["kind"] == "lock-busy", body
                assert "another m3fuse run holds the lock" in body["error"]["message"]
                assert "--lock-timeout" in body["error"]["message"]
                TOTALS["lock_busy_exit5"] += 1
        final = faultkit.file_states(root, pins)
        assert all(not s.startswith("BAD") for s in final.values()), final
        if killed:
            # The killed run may have been the last to hold the lock: finish and check.
            r = faultkit.run("install", "--no-wheels", *where)
            assert r.returncode == 0, r.stderr
            assert faultkit.overall(faultkit.file_states(root, pins)) == "patched"
        else:
            assert faultkit.overall(final) in ("pristine", "patched") or not ok_runs, final
            assert _explains(start, ok_runs, final), (start, ok_runs, final)
            assert faultkit.temp_files(root) == []
            if ok_runs:
                code, out = faultkit.verify_json(root, patches, faultkit.overall(final))
                assert code == 0, out
        for rel in targets:
            s = faultkit.file_states(root, pins)[rel]
            assert (root / rel).read_bytes() == data[(rel, s)]


def test_waiter_takes_over_from_a_killed_holder(vllm_tree, tmp_path):
    """A run killed while holding the lock never leaves a stale lock: a run already waiting
    gets it at once and finishes the half-done job."""
    root = vllm_tree("0.26.0")
    patches, setdir = faultkit.isolated_sets(tmp_path, "0.26.0", "sample")
    pins = faultkit.pins(setdir)
    where = ["--vllm-root", str(root), "--patches", str(patches)]
    log = tmp_path / "log"
    first = subprocess.Popen(faultkit.cli_cmd("install", "--no-wheels", *where), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=faultkit.cli_env(M3FUSE_TEST_CHECKPOINTS=str(log)))
    # Stop it in its write sequence (SIGSTOP at the first step), so it holds the lock.
    while first.poll() is None and not log.exists():
        pass
    first.send_signal(signal.SIGSTOP)
    waiter = subprocess.Popen(faultkit.cli_cmd("install", "--no-wheels", "--lock-timeout", "30", *where),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=faultkit.cli_env())
    time.sleep(0.5)
    assert waiter.poll() is None, "the second run did not wait for the lock"
    first.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    assert faultkit.overall(faultkit.file_states(root, pins)) == "patched"
    assert faultkit.temp_files(root) == []
    code, body = faultkit.verify_json(root, patches)
    assert code == 0, body
