"""The CLI contract that cuts across commands: exit codes, no tracebacks, help text."""

from __future__ import annotations

from conftest import run_cli


def test_wheel_commands_map_errors_to_exit_codes(tmp_path):
    for args in (["fetch", "--dest", str(tmp_path / "d"), "--lock", str(tmp_path / "none.lock")],
                 ["lock", "check", "--lock", str(tmp_path / "none.lock")]):
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and str(tmp_path / "none.lock") in r.stderr


def test_help_documents_exit_codes():
    for cmd in ("install", "verify", "revert", "status"):
        r = run_cli(cmd, "--help")
        assert r.returncode == 0
        for code in ("0  ok", "2  usage", "3  source drift", "4  artifact integrity", "5  environment"):
            assert code in r.stdout, (cmd, code)


def test_bad_option_is_usage_error():
    r = run_cli("verify", "--expect", "sideways")
    assert r.returncode == 2 and "sideways" in r.stderr


def test_verify_no_wheels_imports_none_of_the_wheel_half(vllm_tree):
    """`verify --no-wheels` runs in every CI job: it must not pay for the lock, packaging's
    PEP 751 code, tomlkit or requests (and still give its verdict)."""
    import json
    import subprocess
    import sys

    root = vllm_tree("0.26.0")
    code = ("import sys\nfrom m3fuse.cli import main\n"
            "try:\n    main(['verify', '--no-wheels', '--expect', 'pristine', '--vllm-root', sys.argv[1]])\n"
            "except SystemExit as e:\n    code = e.code\n"
            "import json\nprint(json.dumps([code, sorted(sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, check=True)
    exit_code, modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert exit_code == 0, out.stderr
    loaded = {m for m in modules if m.startswith(("m3fuse.wheels", "m3fuse.cli.wheels", "packaging.pylock",
                                                   "tomlkit", "requests", "urllib3"))}
    assert loaded == set()
