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
