"""Issue 6, parts 3 and 4: hostile patch sets and environment faults.

Every hostile input must be refused before any file is touched (bytes, mode and inode of the
whole tree, and of anything outside it that a link points at, unchanged) with a message that
names the problem. Every environment fault must end with exit 5, a clear message and nothing
changed. test_engine.py already covers the basic `..`/absolute manifest paths, a symlinked
package directory and a diff that gives the wrong hash; this file covers the rest of the
issue's list and drives each case through both `install` and (where the case allows) `revert`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import faultkit
import realvllm
import samplesets
from conftest import snapshot

VERSION = "0.26.0"
HELPER, MODEL = realvllm.HELPER, realvllm.MODEL
REFUSED: list[str] = []  # ids of hostile inputs refused (collected for the reliability figures)


@pytest.fixture
def setup(vllm_tree, tmp_path):
    root = vllm_tree(VERSION)
    good = tmp_path / "good"
    samplesets.sample_set(good, VERSION)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    outside = tmp_path / "outside"
    outside.mkdir()
    return root, good, bad, bad / f"sample-{VERSION}", outside


def _manifest(setdir: Path) -> Path:
    return setdir / "manifest.toml"


def _edit_manifest(setdir: Path, old: str, new: str, count: int = 1) -> None:
    m = _manifest(setdir)
    text = m.read_text()
    assert old in text, old
    m.write_text(text.replace(old, new, count))


def _diff(setdir: Path, name: str = "model.py.diff") -> Path:
    return setdir / name


def _model_pins() -> tuple[str, str]:
    pristine = realvllm.read_member(VERSION, MODEL)
    return hashlib.sha256(pristine).hexdigest(), hashlib.sha256(samplesets.patched_bytes(VERSION, MODEL)).hexdigest()


# Each mutation returns the regex the refusal must match (the problem, by name). ------------

def dotdot_inside_path(setdir, root, outside):
    _edit_manifest(setdir, f'path = "{MODEL}"', 'path = "vllm/models/minimax_m3/amd/../../../../../outside.py"')
    return r"'\.\.'.*outside the vLLM tree|outside the vLLM tree.*'\.\.'|contains '\.\.'"


def dotdot_patch_name(setdir, root, outside):
    shutil.copy(_diff(setdir), setdir.parent / "model.py.diff")
    _edit_manifest(setdir, 'patch = "model.py.diff"', 'patch = "../model.py.diff"')
    return r"patch '\.\./model\.py\.diff' must be a file name inside"


def dotdot_in_diff_header(setdir, root, outside):
    d = _diff(setdir)
    d.write_text(d.read_text().replace(f"a/{MODEL}", "a/../outside.py").replace(f"b/{MODEL}", "b/../outside.py"))
    return r"the diff patches '\.\./outside\.py' but the manifest says"


def absolute_path(setdir, root, outside):
    _edit_manifest(setdir, f'path = "{MODEL}"', f'path = "{outside}/model.py"')
    return r"is absolute"


def absolute_diff_header(setdir, root, outside):
    d = _diff(setdir)
    d.write_text(d.read_text().replace(f"--- a/{MODEL}", "--- /etc/passwd").replace(f"+++ b/{MODEL}", "+++ /etc/passwd"))
    return r"the diff patches '/etc/passwd' but the manifest says"


def backslash_path(setdir, root, outside):
    _edit_manifest(setdir, f'path = "{MODEL}"', 'path = "vllm\\\\models\\\\x.py"')
    return r"backslash"


def symlinked_target_file(setdir, root, outside):
    (outside / "model.py").write_bytes((root / MODEL).read_bytes())
    (root / MODEL).unlink()
    (root / MODEL).symlink_to(outside / "model.py")
    return r"resolves through a symlink to .*outside the vLLM root"


def symlinked_layers_dir(setdir, root, outside):
    layers = root / "vllm/model_executor/layers"
    shutil.copytree(layers, outside / "layers")
    shutil.rmtree(layers)
    layers.symlink_to(outside / "layers")
    return r"resolves through a symlink to .*outside the vLLM root"


def symlink_to_relative_escape(setdir, root, outside):
    (outside / "model.py").write_bytes((root / MODEL).read_bytes())
    (root / MODEL).unlink()
    (root / MODEL).symlink_to(os.path.relpath(outside / "model.py", (root / MODEL).parent))
    return r"resolves through a symlink to .*outside the vLLM root"


def hunk_context_mismatch(setdir, root, outside):
    d = _diff(setdir)
    lines = d.read_text().splitlines(keepends=True)
    i = next(i for i, l in enumerate(lines) if l.startswith(" ") and l.strip())
    lines[i] = " # not what the release says\n"
    d.write_text("".join(lines))
    return r"hunk \d+ does not match at line \d+: expected '# not what the release says\\n'"


def hunk_at_wrong_line(setdir, root, outside):
    d = _diff(setdir)
    text = d.read_text()
    m = re.search(r"^@@ -(\d+),(\d+) \+(\d+),(\d+) @@", text, re.M)
    a, b, c, e = map(int, m.groups())
    d.write_text(text.replace(m.group(0), f"@@ -{a + 7},{b} +{c + 7},{e} @@", 1))
    return r"hunk 1 does not match at line"


def wrong_result_hash(setdir, root, outside):
    d = _diff(setdir)
    d.write_text(d.read_text().replace("+M3FUSE_SAMPLE = True", "+M3FUSE_SAMPLE = 1"))
    return r"gives sha256 [0-9a-f]{64}, but the manifest pins " + _model_pins()[1]


def patched_pin_tampered(setdir, root, outside):
    _edit_manifest(setdir, _model_pins()[1], "f" * 64)
    return r"gives sha256 " + _model_pins()[1] + r", but the manifest pins f{64}"


def malformed_hash_upper(setdir, root, outside):
    _edit_manifest(setdir, _model_pins()[0], _model_pins()[0].upper())
    return r"'pristine-sha256' must be 64 lowercase hex digits, got '" + _model_pins()[0].upper()


def malformed_hash_short(setdir, root, outside):
    _edit_manifest(setdir, _model_pins()[1], _model_pins()[1][:-1])
    return r"'patched-sha256' must be 64 lowercase hex digits"


def malformed_hash_prefixed(setdir, root, outside):
    _edit_manifest(setdir, f'"{_model_pins()[0]}"', f'"sha256:{_model_pins()[0][7:]}"')
    return r"'pristine-sha256' must be 64 lowercase hex digits, got 'sha256:"


def malformed_hash_not_string(setdir, root, outside):
    _edit_manifest(setdir, f'"{_model_pins()[0]}"', "0x1234")
    return r"'pristine-sha256' must be 64 lowercase hex digits, got 4660"


def equal_pins(setdir, root, outside):
    _edit_manifest(setdir, _model_pins()[1], _model_pins()[0])
    return r"pristine and patched sha256 are equal"


def duplicate_target(setdir, root, outside):
    m = _manifest(setdir)
    text = m.read_text()
    block = text[text.index("[[files]]"):text.index("[[files]]", text.index("[[files]]") + 1)]
    m.write_text(text + "\n" + block)
    return r"target '" + re.escape(HELPER) + r"' is listed twice"


def duplicate_target_other_diff(setdir, root, outside):
    # The same file through a second diff of its own: order-dependent, refused.
    shutil.copy(_diff(setdir), setdir / "model2.py.diff")
    m = _manifest(setdir)
    text = m.read_text()
    block = text[text.rindex("[[files]]"):].replace('patch = "model.py.diff"', 'patch = "model2.py.diff"')
    m.write_text(text + "\n" + block)
    return r"target '" + re.escape(MODEL) + r"' is listed twice"


def truncated_mid_hunk(setdir, root, outside):
    d = _diff(setdir)
    data = d.read_bytes()
    d.write_bytes(data[: len(data) // 2])
    return r"not a well-formed unified diff .*it may be truncated"


def truncated_to_header(setdir, root, outside):
    d = _diff(setdir)
    text = d.read_text()
    d.write_text(text[: text.index("@@")])
    return r"has no hunks"


def truncated_whole_hunks(setdir, root, outside):
    d = _diff(setdir)
    text = d.read_text()
    d.write_text(text[: text.rindex("@@ -")])  # a cut exactly at a hunk boundary still parses
    return r"gives sha256 [0-9a-f]{64}, but the manifest pins"


def truncated_last_line(setdir, root, outside):
    d = _diff(setdir)
    data = d.read_bytes()
    d.write_bytes(data[:-6])  # mid-way through the final added line
    return r"gives sha256 [0-9a-f]{64}, but the manifest pins|not a well-formed unified diff"


def empty_patch_file(setdir, root, outside):
    _diff(setdir).write_bytes(b"")
    return r"is empty: no diff header and no hunks, so it was truncated"


def binary_nul(setdir, root, outside):
    d = _diff(setdir)
    d.write_bytes(d.read_bytes().replace(b"+M3FUSE_SAMPLE", b"+M3FUSE\x00SAMPLE"))
    return r"contains NUL bytes: it is binary"


def binary_not_utf8(setdir, root, outside):
    d = _diff(setdir)
    d.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" + os.urandom(256))
    return r"not UTF-8 text; it is binary or corrupted"


def git_binary_patch(setdir, root, outside):
    _diff(setdir).write_text(f"diff --git a/{MODEL} b/{MODEL}\nindex 1234567..89abcde 100644\n"
                             f"GIT binary patch\nliteral 5\nMcmZ?wbYx@t00BY*0RR91\n\n")
    return r"binary patch"


def crlf_patch(setdir, root, outside):
    d = _diff(setdir)
    d.write_bytes(d.read_bytes().replace(b"\n", b"\r\n"))
    return r"carriage returns \(CRLF line endings\)"


def two_files_in_one_diff(setdir, root, outside):
    d = _diff(setdir)
    text = d.read_text()
    d.write_text(text + _diff(setdir, "fused_allreduce_gemma_rms_norm.py.diff").read_text())
    return r"must change exactly one file but names 2"


def manifest_not_toml(setdir, root, outside):
    m = _manifest(setdir)
    m.write_text(m.read_text().replace('path = "', 'path = ', 1))
    return r"not valid TOML"


def manifest_unknown_format(setdir, root, outside):
    _edit_manifest(setdir, "format = 1", "format = 2")
    return r"format is 2, this m3fuse reads format 1"


HOSTILE = [dotdot_inside_path, dotdot_patch_name, dotdot_in_diff_header, absolute_path, absolute_diff_header,
           backslash_path, symlinked_target_file, symlinked_layers_dir, symlink_to_relative_escape,
           hunk_context_mismatch, hunk_at_wrong_line, wrong_result_hash, patched_pin_tampered,
           malformed_hash_upper, malformed_hash_short, malformed_hash_prefixed, malformed_hash_not_string,
           equal_pins, duplicate_target, duplicate_target_other_diff, truncated_mid_hunk, truncated_to_header,
           truncated_whole_hunks, truncated_last_line, empty_patch_file, binary_nul, binary_not_utf8,
           git_binary_patch, crlf_patch, two_files_in_one_diff, manifest_not_toml, manifest_unknown_format]
# Cases whose refusal depends on the direction (the hunk or pin problem only shows one way).
INSTALL_ONLY = {hunk_context_mismatch, hunk_at_wrong_line, wrong_result_hash, patched_pin_tampered,
                truncated_whole_hunks, truncated_last_line}


def _everything(root: Path, outside: Path) -> tuple[dict, dict]:
    return snapshot(root), snapshot(outside)


@pytest.mark.parametrize("mutate,command", [(m, c) for c in ("install", "revert") for m in HOSTILE
                                            if not (c == "revert" and m in INSTALL_ONLY)],
                         ids=lambda v: getattr(v, "__name__", v))
def test_hostile_patch_set_is_refused_untouched(mutate, command, setup):
    root, good, bad, setdir, outside = setup
    if command == "revert":
        r = faultkit.run("install", "--no-wheels", "--vllm-root", str(root), "--patches", str(good))
        assert r.returncode == 0, r.stderr
    pattern = mutate(setdir, root, outside)
    before = _everything(root, outside)
    args = [command, "--vllm-root", str(root), "--patches", str(bad)] + (["--no-wheels"] if command == "install" else [])
    r = faultkit.run(*args)
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    msg = r.stderr
    assert re.search(pattern, msg, re.S), msg
    # The message names where the problem is: the manifest, the patch file or the tree file.
    assert str(setdir) in msg or str(root) in msg or str(outside) in msg, msg
    assert "Traceback" not in msg
    assert _everything(root, outside) == before
    assert faultkit.temp_files(root) == [] and faultkit.temp_files(outside) == []
    # And the same input is refused by --dry-run, read-only `verify` does not crash on it.
    v = faultkit.run("verify", "--no-wheels", "--vllm-root", str(root), "--patches", str(bad))
    assert v.returncode == 3 and "Traceback" not in v.stderr
    assert _everything(root, outside) == before
    REFUSED.append(f"{mutate.__name__}/{command}")


def test_every_truncation_of_a_patch_is_refused(vllm_tree, tmp_path):
    """Cut a real patch at every line boundary and at mid-line points: the engine must refuse
    each cut (parse error, hunk mismatch or pin mismatch) without writing. In-process (the CLI
    cases above prove the end-to-end path); one CLI run per 20 cuts for good measure."""
    from m3fuse.patching import engine
    from m3fuse.errors import M3fuseError
    from m3fuse.patching.patchset import load_all
    from m3fuse.target import from_root

    root = vllm_tree(VERSION)
    patches = tmp_path / "p"
    samplesets.sample_set(patches, VERSION)
    d = patches / f"sample-{VERSION}" / "model.py.diff"
    full = d.read_bytes()
    cuts = sorted({i + 1 for i, b in enumerate(full) if b == 0x0A} | set(range(1, len(full), 37)))
    cuts = [c for c in cuts if c < len(full)]
    before = snapshot(root)
    refused = 0
    for n, cut in enumerate(cuts):
        d.write_bytes(full[:cut])
        with pytest.raises(M3fuseError) as info:
            tree = engine.inspect(from_root(root), load_all(patches))
            engine.plan(tree, engine.PATCHED)
        assert info.value.exit_code == 3, (cut, info.value.message)
        refused += 1
        if n % 20 == 0:
            r = faultkit.run("install", "--no-wheels", "--vllm-root", str(root), "--patches", str(patches))
            assert r.returncode == 3, (cut, r.stderr)
    assert snapshot(root) == before
    REFUSED.append(f"truncations x{refused}")


# --- environment faults ----------------------------------------------------------------------

ENV_FAULTS: list[str] = []


def _install_revert_args(command: str, root: Path, patches: Path) -> list[str]:
    return [command, "--vllm-root", str(root), "--patches", str(patches)] + (["--no-wheels"] if command == "install" else [])


@pytest.mark.parametrize("command", ["install", "revert"])
@pytest.mark.parametrize("method", ["ro-bind-mount", "immutable", "setuid-nobody"])
def test_read_only_tree(method, command, setup):
    root, good, _, _, _ = setup
    if command == "revert":
        assert faultkit.run(*_install_revert_args("install", root, good)).returncode == 0
    faultkit.plant_bytecode(root, (HELPER, MODEL))
    before = snapshot(root)
    try:
        with faultkit.read_only(root, method) as kw:
            cmd = faultkit.cli_cmd(*_install_revert_args(command, root, good))
            cmd[0] = kw.pop("python", cmd[0])
            r = subprocess.run(cmd, capture_output=True, text=True, env=faultkit.cli_env(), timeout=120, **kw)
    except NotImplementedError as exc:
        pytest.skip(str(exc))
    assert r.returncode == 5, (r.returncode, r.stdout, r.stderr)
    assert re.search(r"not writable|Read-only file system|read-only|Operation not permitted|immutable", r.stderr), r.stderr
    assert "Nothing was changed" in r.stderr or "nothing was changed" in r.stderr.lower(), r.stderr
    assert "Traceback" not in r.stderr
    assert snapshot(root) == before
    ENV_FAULTS.append(f"read-only tree ({method}) / {command}")


@pytest.mark.parametrize("command", ["install", "revert"])
def test_one_immutable_target_changes_nothing(command, setup):
    """Only the second target is read-only (chattr +i): the first must not be written either."""
    root, good, _, _, _ = setup
    if command == "revert":
        assert faultkit.run(*_install_revert_args("install", root, good)).returncode == 0
    before = snapshot(root)
    if subprocess.run(["chattr", "+i", str(root / MODEL)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        r = faultkit.run(*_install_revert_args(command, root, good))
    finally:
        subprocess.run(["chattr", "-i", str(root / MODEL)], capture_output=True)
    assert r.returncode == 5, (r.returncode, r.stderr)
    assert MODEL.split("/")[-1] in r.stderr and "Traceback" not in r.stderr
    assert snapshot(root) == before, "a file was written although the run failed"
    assert faultkit.temp_files(root) == []
    ENV_FAULTS.append(f"one immutable target / {command}")


@pytest.mark.parametrize("command", ["install", "revert"])
def test_target_replaced_by_directory(command, setup):
    root, good, _, _, _ = setup
    if command == "revert":
        assert faultkit.run(*_install_revert_args("install", root, good)).returncode == 0
    (root / MODEL).unlink()
    (root / MODEL).mkdir()
    (root / MODEL / "keep.txt").write_text("not m3fuse's to touch")
    before = snapshot(root)
    r = faultkit.run(*_install_revert_args(command, root, good))
    assert r.returncode == 5, (r.returncode, r.stderr)
    assert str(root / MODEL) in r.stderr and "not a regular file" in r.stderr, r.stderr
    assert snapshot(root) == before
    v = faultkit.run("verify", "--no-wheels", "--vllm-root", str(root), "--patches", str(good))
    assert v.returncode == 5 and "not a regular file" in v.stderr
    ENV_FAULTS.append(f"target replaced by a directory / {command}")


@pytest.mark.parametrize("command", ["install", "revert"])
def test_disk_full_on_a_tiny_tmpfs(command, setup, tmp_path):
    """A real ENOSPC: the tree lives on a tmpfs with room for the first new file but not the
    second. The run must fail with exit 5 and leave every file as it was."""
    root0, good, _, _, _ = setup
    try:
        with faultkit.tmpfs(tmp_path / "mnt", 8 << 20) as mnt:
            root = mnt / "sp"
            shutil.copytree(root0, root)
            if command == "revert":
                assert faultkit.run(*_install_revert_args("install", root, good)).returncode == 0
            new_first = len(samplesets.patched_bytes(VERSION, HELPER))
            assert len(realvllm.read_member(VERSION, MODEL)) > new_first + 3 * 4096
            faultkit.fill_until(mnt / "filler", new_first + 2 * 4096)
            before = snapshot(root)
            r = faultkit.run(*_install_revert_args(command, root, good))
            assert r.returncode == 5, (r.returncode, r.stderr)
            assert "No space left on device" in r.stderr and "Traceback" not in r.stderr, r.stderr
            assert snapshot(root) == before, "disk full left the tree changed"
            assert faultkit.temp_files(root) == []
            # Space freed: the same command now finishes.
            (mnt / "filler").unlink()
            assert faultkit.run(*_install_revert_args(command, root, good)).returncode == 0
    except NotImplementedError as exc:
        pytest.skip(str(exc))
    ENV_FAULTS.append(f"disk full (tmpfs) / {command}")


@pytest.mark.parametrize("fail_on", ["write", "fsync"])
def test_disk_full_injected(fail_on, setup, monkeypatch):
    """The same fault without a mount: OSError(ENOSPC) from the second file's write/fsync."""
    from m3fuse.patching import atomic, engine
    from m3fuse.errors import EnvironmentProblem
    from m3fuse.patching.patchset import load_all
    from m3fuse.target import from_root

    root, good, _, _, _ = setup
    before = snapshot(root)
    real = getattr(os, fail_on)
    calls = {"n": 0}

    def flaky(fd, *a):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, *a)

    monkeypatch.setattr(atomic.os, fail_on, flaky)
    tree = engine.inspect(from_root(root), load_all(good))
    changes = engine.plan(tree, engine.PATCHED)
    with pytest.raises(EnvironmentProblem) as info:
        engine.execute(changes)
    monkeypatch.undo()
    assert info.value.exit_code == 5 and "No space left on device" in info.value.message
    assert snapshot(root) == before
    assert faultkit.temp_files(root) == []
    ENV_FAULTS.append(f"disk full (injected on {fail_on})")


def _not_pythons(tmp_path: Path) -> dict[str, Path]:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho not python\n")
    script.chmod(0o755)
    liar = tmp_path / "liar"
    liar.write_text("#!/bin/sh\necho '{\"locations\": 42'\n")
    liar.chmod(0o755)
    plain = tmp_path / "plain.txt"
    plain.write_text("print('hi')\n")
    return {"shell-script": script, "broken-json": liar, "not-executable": plain, "directory": tmp_path,
            "missing": tmp_path / "nope", "false": Path("/bin/false")}


@pytest.mark.parametrize("kind", ["shell-script", "broken-json", "not-executable", "directory", "missing", "false"])
def test_python_that_is_not_python(kind, tmp_path, setup):
    root, good, _, _, _ = setup
    bad = _not_pythons(tmp_path)[kind]
    before = snapshot(root)
    for cmd in (["install", "--no-wheels"], ["revert"], ["verify", "--no-wheels"], ["status"]):
        r = faultkit.run(*cmd, "--python", str(bad), "--patches", str(good))
        assert r.returncode == 5, (kind, cmd, r.returncode, r.stderr)
        assert str(bad) in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert re.search(r"Python|no such file|not executable|cannot run", r.stderr), r.stderr
    assert snapshot(root) == before
    ENV_FAULTS.append(f"--python {kind}")


# --- hostile wheel locks and wheels (the wheel half of `install`) ---------------------------

FLY_V = "0.1.9.dev1+abc"


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    import wheelkit

    base = tmp_path_factory.mktemp("hostile-wheels")
    venv = wheelkit.make_venv(base / "venv")
    with wheelkit.FaultServer() as srv:
        yield base, venv, srv


def _site(venv: Path) -> dict:
    sp = next((venv.parent.parent / "lib").glob("python*/site-packages"))
    return {str(p.relative_to(sp)): p.stat().st_size for p in sp.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def _fly_lock_entry(url: str, wheel_name: str, sha: str | None, extra: str = "") -> str:
    hashes = f'hashes = {{ sha256 = "{sha}" }}\n' if sha else ""
    return (f'lock-version = "1.0"\n\n[[packages]]\nname = "demo-fly"\nversion = "{FLY_V}"\n\n'
            f'[[packages.wheels]]\nname = "{wheel_name}"\nurl = "{url}"\n{hashes}{extra}')


LOCK_CASES = {
    "ftp-scheme": ("ftp://127.0.0.1/{name}", True, "", 2, r"has scheme 'ftp'; only https, file and loopback http"),
    "http-remote": ("http://example.invalid/{name}", True, "", 2, r"plain http to a host other than this machine"),
    "no-scheme": ("{name}", True, "", 2, r"has scheme '\(none\)'"),
    "javascript": ("javascript:alert(1)", True, "", 2, r"has scheme 'javascript'"),
    "file-remote-host": ("file://fileserver/srv/{name}", True, "", 2, r"names a remote host in a file:// URL"),
    "credentials": ("https://user:secret@127.0.0.1/{name}", True, "", 2, r"carries credentials"),
    "missing-hash": ("{url}", False, "", 2, r"hashes.sha256 is missing"),
    "md5-only": ("{url}", False, 'hashes = { md5 = "d41d8cd98f00b204e9800998ecf8427e" }\n', 2, r"hashes.sha256 is missing"),
    "short-hash": ("{url}", "short", "", 2, r"is not 64 hexadecimal digits"),
}


@pytest.mark.parametrize("case", sorted(LOCK_CASES))
def test_hostile_lock_entry_refused_untouched(case, wheel_env, setup, tmp_path):
    import wheelkit

    base, venv, srv = wheel_env
    root, good, _, _, _ = setup
    wheel = wheelkit.build_wheel(tmp_path / "w", "demo-fly", FLY_V)
    url = srv.add(wheel.name, wheel.read_bytes())
    template, with_hash, extra, code, pattern = LOCK_CASES[case]
    sha = wheelkit.sha256_of(wheel)
    sha = sha[:40] if with_hash == "short" else sha if with_hash else None
    lock = tmp_path / "hostile.lock"
    lock.write_text(_fly_lock_entry(template.format(name=wheel.name, url=url), wheel.name, sha, extra))
    cache = tmp_path / "cache"
    before = (snapshot(root), _site(venv))
    hits = len(srv.log)
    r = faultkit.run("install", "--python", str(venv), "--vllm-root", str(root), "--patches", str(good),
                     "--lock", str(lock), "--cache-dir", str(cache))
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert re.search(pattern, r.stderr), r.stderr
    assert str(lock) in r.stderr and "nothing was downloaded or installed" in r.stderr
    assert (snapshot(root), _site(venv)) == before
    assert len(srv.log) == hits, "the server was contacted for a refused lock"
    assert not cache.exists() or wheelkit.cache_is_clean(cache) == []
    REFUSED.append(f"lock:{case}")


MEMBER_CASES = {
    "dotdot": ("../evil.py", r"member '\.\./evil\.py' contains '\.\.'"),
    "nested-dotdot": ("demo_fly/../../../evil.py", r"contains '\.\.'"),
    "absolute": ("/tmp/m3fuse-evil.py", r"member '/tmp/m3fuse-evil\.py' is absolute"),
    "backslash-dotdot": ("..\\evil.py", r"contains '\.\.'"),
}


@pytest.mark.parametrize("case", sorted(MEMBER_CASES))
def test_wheel_member_escaping_its_root_refused(case, wheel_env, setup, tmp_path):
    import wheelkit

    base, venv, srv = wheel_env
    root, good, _, _, _ = setup
    member, pattern = MEMBER_CASES[case]
    wheel = wheelkit.build_wheel(tmp_path / "w", "demo-fly", FLY_V, raw_members={member: b"print('pwned')\n"})
    url = srv.add(wheel.name, wheel.read_bytes())
    lock = tmp_path / "evil.lock"
    lock.write_text(wheelkit.lock_text([("demo-fly", FLY_V, [(wheel, url)])]))
    cache = tmp_path / "cache"
    before = (snapshot(root), _site(venv))
    r = faultkit.run("install", "--python", str(venv), "--vllm-root", str(root), "--patches", str(good),
                     "--lock", str(lock), "--cache-dir", str(cache))
    assert r.returncode == 4, (r.returncode, r.stdout, r.stderr)
    assert re.search(pattern, r.stderr) and "outside the environment" in r.stderr, r.stderr
    assert (snapshot(root), _site(venv)) == before
    assert not Path("/tmp/m3fuse-evil.py").exists()
    assert [p for p in wheelkit.cache_is_clean(cache) if "temp file" in p] == []
    REFUSED.append(f"wheel-member:{case}")


@pytest.mark.parametrize("method", ["ro-bind-mount", "immutable"])
def test_cache_not_writable(method, wheel_env, setup, tmp_path):
    import wheelkit

    base, venv, srv = wheel_env
    root, good, _, _, _ = setup
    wheel = wheelkit.build_wheel(tmp_path / "w", "demo-fly", FLY_V)
    lock = tmp_path / "ok.lock"
    lock.write_text(wheelkit.lock_text([srv.pin("demo-fly", FLY_V, wheel)]))
    cache = tmp_path / "cache"
    cache.mkdir()
    before = (snapshot(root), _site(venv))
    try:
        with faultkit.read_only(cache, method):
            r = faultkit.run("install", "--python", str(venv), "--vllm-root", str(root), "--patches", str(good),
                             "--lock", str(lock), "--cache-dir", str(cache))
    except NotImplementedError as exc:
        pytest.skip(str(exc))
    assert r.returncode == 5, (r.returncode, r.stdout, r.stderr)
    assert str(cache) in r.stderr and "--cache-dir" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (snapshot(root), _site(venv)) == before
    assert list(cache.iterdir()) == []
    ENV_FAULTS.append(f"cache not writable ({method})")


def test_zz_record_figures():
    faultkit.record("hostile", refused=len(REFUSED), environment_faults=len(ENV_FAULTS),
                    refused_ids=REFUSED, environment_fault_ids=ENV_FAULTS)
