"""Issue 6, part 1: SIGKILL `m3fuse install` / `revert` at every step of the write sequence and
at random moments, on real vLLM release trees, and prove after every kill that

- every target hashes to its pristine or its patched value, nothing else;
- no bytecode would run text other than the source on disk;
- `verify` names the state (pristine / patched / partial) the hashes show, and fails unless it
  is the expected one with no temp files left;
- a second `install` or `revert` finishes (or undoes) the job: exit 0, the goal state, no temp
  files, `verify` clean.

Deterministic kills use the test-only hook in m3fuse/patching/atomic.py (M3FUSE_TEST_KILL_AT=N kills
the run as it enters its N-th write step); random kills land at a random delay after the run
entered its write sequence (so between arbitrary syscalls, not only at hook points), or at a
random delay after start. A kill "landed mid-transaction" when at least one write step had
completed and the final step had not (the hook log says which).

Sizing: `M3FUSE_STRESS=full` runs every kill point of every scenario; otherwise a bounded,
seeded sample (`M3FUSE_STRESS_SEED` to replay one).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import faultkit
from faultkit import FULL

RELEASES = ["0.24.0", "0.26.0", "0.33.0"]
KINDS = ["shipped", "sample"]
SCENARIOS = [  # (state before, command)
    ("pristine", "install"),
    ("patched", "revert"),
    ("partial", "install"),
    ("partial", "revert"),
]
SEED = int(os.environ.get("M3FUSE_STRESS_SEED", str(int(time.time()) % 100000)))
TOTALS = {"kills": 0, "mid_transaction": 0, "visible_partial_or_temp": 0, "survived": 0,
          "double_kills": 0, "checkpoint_kills": 0, "random_kills": 0, "random_missed": 0}


@pytest.fixture(scope="module", autouse=True)
def _figures():
    yield
    faultkit.record("crash", seed=SEED, **TOTALS)


class Rig:
    """One private copy of a real release tree and one patch set; resets between kills."""

    def __init__(self, version: str, kind: str, pristine_trees, tmp: Path) -> None:
        if kind == "shipped" and faultkit.shipped_set(version) is None:
            pytest.skip(f"no shipped set for {version}")
        self.root = tmp / "sp"
        shutil.copytree(pristine_trees(version), self.root)
        self.patches, setdir = faultkit.isolated_sets(tmp, version, kind)
        self.pins = faultkit.pins(setdir)
        self.targets = list(self.pins)
        # The bytes of each state, proven by hash before use.
        self.bytes = {}
        for rel in self.targets:
            pristine = (self.root / rel).read_bytes()
            assert faultkit.sha(pristine) == self.pins[rel][0], f"{rel} of {version} is not the set's pristine"
            self.bytes[(rel, "pristine")] = pristine
        r = faultkit.run("install", "--no-wheels", *self.where())
        assert r.returncode == 0, r.stderr
        for rel in self.targets:
            self.bytes[(rel, "patched")] = (self.root / rel).read_bytes()
        self.log = tmp / "checkpoints.log"

    def where(self) -> list[str]:
        return ["--vllm-root", str(self.root), "--patches", str(self.patches)]

    def args(self, command: str) -> list[str]:
        return [command, *(["--no-wheels"] if command == "install" else []), *self.where()]

    def reset(self, start: str) -> dict[Path, str]:
        for rel in self.targets:
            state = "patched" if start == "patched" or (start == "partial" and rel == self.targets[0]) else "pristine"
            p = self.root / rel
            shutil.rmtree(p.parent / "__pycache__", ignore_errors=True)
            p.write_bytes(self.bytes[(rel, state)])
        for t in faultkit.temp_files(self.root):
            t.unlink()
        assert faultkit.overall(faultkit.file_states(self.root, self.pins)) == start
        self.log.unlink(missing_ok=True)
        return faultkit.plant_bytecode(self.root, self.targets)

    def steps(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def count_steps(self, start: str, command: str) -> int:
        self.reset(start)
        r = faultkit.run(*self.args(command), M3FUSE_TEST_CHECKPOINTS=str(self.log))
        assert r.returncode == 0, r.stderr
        steps = self.steps()
        assert steps and steps[-1] == "done", steps
        return len(steps)

    # -- invariants -------------------------------------------------------------------------

    def check_after_kill(self, planted: dict[Path, str], command: str) -> str:
        states = faultkit.file_states(self.root, self.pins)
        bad = {rel: s for rel, s in states.items() if s.startswith("BAD")}
        assert not bad, f"a target is neither pristine nor patched after a kill: {bad}"
        assert faultkit.bytecode_lies(self.root, self.targets, planted) == []
        state = faultkit.overall(states)
        temps = faultkit.temp_files(self.root)
        expect = "patched" if command == "install" else "pristine"
        code, out = faultkit.verify_json(self.root, self.patches, expect)
        assert out["state"] == state, (out["state"], states)
        assert {f["path"]: f["state"] for f in out["files"]} == states
        if temps:
            assert code == 3 and any("temp file left by an interrupted m3fuse run" in p for p in out["problems"])
        else:
            assert code == (0 if state == expect else 3), (code, out)
        if state == "partial":
            assert any("interrupted run" in f for f in out["failures"]), out["failures"]
        return "visible" if temps or state == "partial" else "clean"

    def finish(self, planted: dict[Path, str], command: str) -> None:
        goal = "patched" if command == "install" else "pristine"
        r = faultkit.run(*self.args(command))
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert faultkit.overall(faultkit.file_states(self.root, self.pins)) == goal
        assert faultkit.temp_files(self.root) == []
        assert faultkit.bytecode_lies(self.root, self.targets, planted) == []
        for rel in self.targets:
            assert (self.root / rel).read_bytes() == self.bytes[(rel, goal)]
        code, out = faultkit.verify_json(self.root, self.patches, goal)
        assert code == 0 and out["problems"] == [], out
        TOTALS["survived"] += 1


def _finisher(command: str, i: int) -> str:
    """Mostly finish the interrupted job; every third time undo it instead."""
    return command if i % 3 else {"install": "revert", "revert": "install"}[command]


@pytest.mark.stress
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("version", RELEASES)
def test_kill_at_every_write_step(version, kind, pristine_trees, tmp_path):
    rig = Rig(version, kind, pristine_trees, tmp_path)
    rng = random.Random(f"{SEED}-{version}-{kind}-steps")
    done = 0
    for start, command in SCENARIOS:
        total = rig.count_steps(start, command)
        points = range(1, total + 1) if FULL else [rng.randint(2, total - 1)]
        for n in points:
            planted = rig.reset(start)
            r = subprocess.run(faultkit.cli_cmd(*rig.args(command)), capture_output=True, text=True, timeout=120,
                               env=faultkit.cli_env(M3FUSE_TEST_CHECKPOINTS=str(rig.log), M3FUSE_TEST_KILL_AT=str(n)))
            assert r.returncode == -signal.SIGKILL, (n, r.returncode, r.stderr)
            assert len(rig.steps()) == n
            TOTALS["kills"] += 1
            TOTALS["checkpoint_kills"] += 1
            if 2 <= n < total:  # steps 1..n-1 done, the final one ("done") not reached
                TOTALS["mid_transaction"] += 1
            if rig.check_after_kill(planted, command) == "visible":
                TOTALS["visible_partial_or_temp"] += 1
            rig.finish(planted, _finisher(command, n))
            done += 1
    assert done >= len(SCENARIOS)


def _kill_randomly(rig: Rig, command: str, rng: random.Random, window: float, anchored: bool,
                   kill_at: int | None = None) -> tuple[bool, list[str]]:
    """Start the run; SIGKILL it `uniform(0, window)` seconds after it entered its write sequence
    (anchored) or after it started. Returns (was it killed, the steps it had entered)."""
    rig.log.unlink(missing_ok=True)
    env = faultkit.cli_env(M3FUSE_TEST_CHECKPOINTS=str(rig.log))
    if kill_at is not None:
        env["M3FUSE_TEST_KILL_AT"] = str(kill_at)
    proc = subprocess.Popen(faultkit.cli_cmd(*rig.args(command)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    if kill_at is None:
        if anchored:
            while proc.poll() is None and not rig.log.exists():
                pass  # busy-wait: the write sequence lasts milliseconds
        delay = rng.uniform(0, window)
        end = time.perf_counter() + delay
        while proc.poll() is None and time.perf_counter() < end:
            pass
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    rc = proc.wait(timeout=120)
    return rc == -signal.SIGKILL, rig.steps()


def _timing(rig: Rig, start: str, command: str) -> tuple[float, float]:
    """(whole run, write sequence) durations of an unkilled run, in seconds."""
    rig.reset(start)
    rig.log.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(faultkit.cli_cmd(*rig.args(command)), stdout=subprocess.DEVNULL,
                            env=faultkit.cli_env(M3FUSE_TEST_CHECKPOINTS=str(rig.log)))
    while proc.poll() is None and not rig.log.exists():
        pass
    t1 = time.perf_counter()
    assert proc.wait() == 0
    t2 = time.perf_counter()
    return t2 - t0, max(t2 - t1, 0.002)


@pytest.mark.stress
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("version", RELEASES)
def test_kill_at_random_moments(version, kind, pristine_trees, tmp_path):
    rig = Rig(version, kind, pristine_trees, tmp_path)
    rng = random.Random(f"{SEED}-{version}-{kind}-random")
    rounds = 24 if FULL else 3
    for i in range(rounds):
        start, command = SCENARIOS[i % len(SCENARIOS)] if FULL else rng.choice(SCENARIOS)
        whole, writing = _timing(rig, start, command)
        anchored = i % 4 != 3  # one in four uniformly over the whole run
        planted = rig.reset(start)
        killed, steps = _kill_randomly(rig, command, rng, writing if anchored else whole, anchored)
        if not killed:
            TOTALS["random_missed"] += 1  # the run finished first: still must be clean
        else:
            TOTALS["kills"] += 1
            TOTALS["random_kills"] += 1
            if len(steps) >= 2 and steps[-1] != "done":
                TOTALS["mid_transaction"] += 1
        if rig.check_after_kill(planted, command) == "visible":
            TOTALS["visible_partial_or_temp"] += 1
        if i % 2 == 0:
            # Kill the recovery run too, at one of its own steps, before finishing for good.
            rig.log.unlink(missing_ok=True)
            second = _finisher(command, i + 1)
            killed2, steps2 = _kill_randomly(rig, second, rng, 0, False, kill_at=rng.randint(1, 12))
            if killed2:
                TOTALS["kills"] += 1
                TOTALS["double_kills"] += 1
                if len(steps2) >= 2 and steps2[-1] != "done":
                    TOTALS["mid_transaction"] += 1
                rig.check_after_kill(planted, second)
        rig.finish(planted, _finisher(command, i))


def test_kill_hook_is_inert_without_its_variable(vllm_tree, tmp_path):
    """The hook must not leave anything when the variables are unset (production runs)."""
    import samplesets

    root = vllm_tree("0.26.0")
    patches = tmp_path / "p"
    samplesets.sample_set(patches, "0.26.0")
    env = faultkit.cli_env(M3FUSE_TEST_KILL_AT="1")  # without the log variable: no effect
    r = subprocess.run(faultkit.cli_cmd("install", "--no-wheels", "--vllm-root", str(root), "--patches", str(patches)),
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert faultkit.overall(faultkit.file_states(root, faultkit.pins(patches / "sample-0.26.0"))) == "patched"


# --- install with wheels from a loopback server ----------------------------------------------

@pytest.fixture(scope="module")
def wheel_rig(tmp_path_factory, pristine_trees):
    import wheelkit

    base = tmp_path_factory.mktemp("wheelkill")
    template = base / "venv-template"
    wheelkit.make_venv(template)
    wheels = {"fly": wheelkit.build_wheel(base / "w", "demo-fly", "0.1.9.dev1+abc",
                                          {"demo_fly/__init__.py": "X = 1\n", "demo_fly/data.txt": "payload " * 40000}),
              "aiter": wheelkit.aiter_wheel(base / "w", "0.1.15.post1+rocm7.2.test")}
    with wheelkit.FaultServer() as srv:
        urls = {k: srv.add(p.name, p.read_bytes()) for k, p in wheels.items()}
        lock = base / "test.lock"
        lock.write_text(wheelkit.lock_text([("demo-fly", "0.1.9.dev1+abc", [(wheels["fly"], urls["fly"])]),
                                            ("amd-aiter", "0.1.15.post1+rocm7.2.test", [(wheels["aiter"], urls["aiter"])])]))
        root = base / "sp"
        shutil.copytree(pristine_trees("0.26.0"), root)
        patches, setdir = faultkit.isolated_sets(base, "0.26.0", "sample")
        yield {"base": base, "template": template, "server": srv, "wheels": wheels, "lock": lock, "root": root,
               "patches": patches, "pins": faultkit.pins(setdir)}


def _wheel_args(rig: dict, venv: Path, cache: Path) -> list[str]:
    return ["install", "--python", str(venv), "--vllm-root", str(rig["root"]), "--patches", str(rig["patches"]),
            "--lock", str(rig["lock"]), "--cache-dir", str(cache)]


@pytest.mark.stress
def test_kill_install_with_wheels_from_loopback(wheel_rig, tmp_path):
    """SIGKILL `m3fuse install` (download -> checks -> pip -> patches) at random moments: the
    cache never holds an unverified file, the tree only pristine/patched files, and a second
    install finishes with nothing left over."""
    import json

    import wheelkit

    rig = wheel_rig
    rng = random.Random(f"{SEED}-wheels")
    rounds = 16 if FULL else 2
    pristine = {rel: (rig["root"] / rel).read_bytes() for rel in rig["pins"]}

    def fresh(i: int) -> tuple[Path, Path]:
        for rel, data in pristine.items():
            (rig["root"] / rel).write_bytes(data)
        venv = wheelkit.clone_venv(rig["template"], tmp_path / f"venv-{i}")
        for k, p in rig["wheels"].items():  # trickle the bodies so kills land in downloads too
            rig["server"].set_plan(p.name, ["slow"])
        return venv, tmp_path / f"cache-{i}"

    venv, cache = fresh(0)
    t0 = time.perf_counter()
    r = subprocess.run(faultkit.cli_cmd(*_wheel_args(rig, venv, cache)), capture_output=True, text=True,
                       env=faultkit.cli_env())
    whole = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    for i in range(1, rounds + 1):
        venv, cache = fresh(i)
        out_path = tmp_path / f"out-{i}"
        with open(out_path, "w") as out:
            proc = subprocess.Popen(faultkit.cli_cmd(*_wheel_args(rig, venv, cache)), stdout=out,
                                    stderr=subprocess.STDOUT, env=faultkit.cli_env(PYTHONUNBUFFERED="1"))
            try:
                proc.wait(timeout=rng.uniform(0.2, whole))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
            rc = proc.wait()
        said = out_path.read_text()
        if rc == -signal.SIGKILL:
            TOTALS["kills"] += 1
            TOTALS["wheel_kills"] = TOTALS.get("wheel_kills", 0) + 1
            if ("downloading" in said or "installing" in said) and "patched: " not in said:
                TOTALS["mid_transaction"] += 1
        else:
            assert rc == 0, said
        # After the kill: an unverified file never sits in the cache proper.
        assert [p for p in wheelkit.cache_is_clean(cache) if "unverified" in p] == []
        states = faultkit.file_states(rig["root"], rig["pins"])
        assert all(not s.startswith("BAD") for s in states.values()), states
        v = faultkit.run("verify", "--json", "--python", str(venv), "--vllm-root", str(rig["root"]),
                         "--patches", str(rig["patches"]), "--lock", str(rig["lock"]))
        body = json.loads(v.stdout)
        assert body["state"] == faultkit.overall(states) and "Traceback" not in v.stderr
        # A second install finishes the job; nothing is left over.
        r = subprocess.run(faultkit.cli_cmd(*_wheel_args(rig, venv, cache)), capture_output=True, text=True,
                           env=faultkit.cli_env())
        assert r.returncode == 0, r.stdout + r.stderr
        assert wheelkit.cache_is_clean(cache) == [], "temp or unverified files left in the cache"
        assert faultkit.temp_files(rig["root"]) == []
        v = faultkit.run("verify", "--python", str(venv), "--vllm-root", str(rig["root"]),
                         "--patches", str(rig["patches"]), "--lock", str(rig["lock"]))
        assert v.returncode == 0, v.stdout + v.stderr
        TOTALS["survived"] += 1
