"""The download loop of m3fuse/wheels/fetch.py, called in process against tests/wheelkit.py's
FaultServer on 127.0.0.1: retries and their backoff, Range resume and its refusals, the
restart after a resumed transfer whose hash is wrong, the overall deadline, the content-encoded
reader, write errors. Each test takes well under a second, so that every mutant of
`make mutation MODULE=m3fuse/wheels/fetch.py` is judged in seconds."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from m3fuse.errors import EnvironmentProblem, IntegrityError, UsageProblem
from m3fuse.wheels import fetch
from m3fuse.wheels.fetch import DEADLINE_VAR, FetchConfig, download

from wheelkit import FaultServer

NAME = "loop_pkg-1.0-py3-none-any.whl"
# Half of it (where a "drop" cuts) is no multiple of the decoding reader's chunk, so a resume
# offset tells which reader kept the partial read.
DATA = os.urandom(1_600_001)
HALF = len(DATA) // 2
SHA = hashlib.sha256(DATA).hexdigest()


def cfg(tmp_path: Path, **kw) -> FetchConfig:
    lines: list[str] = []
    for key, value in (("retries", 3), ("deadline", 60.0), ("read_timeout", 0.3), ("progress", False),
                       ("backoff", 0.01)):
        kw.setdefault(key, value)
    c = FetchConfig(cache_dir=tmp_path / "cache", connect_timeout=2, echo=lines.append, **kw)
    c.lines = lines  # type: ignore[attr-defined]
    return c


def fetch_plan(tmp_path: Path, plan: list[str], *, range_ok: bool = True, gzip: bool = False,
               data: bytes = DATA, **kw) -> tuple[tuple[str, int], list, list[str], Path]:
    """download() of a file served with `plan`'s faults: (its result, the server's log, the
    echoed lines, the destination)."""
    c = cfg(tmp_path, **kw.pop("config", {}))
    dest = tmp_path / "d.part"
    with FaultServer(range_ok=range_ok, stall_s=1.0, gzip=gzip) as srv:
        got = download(srv.add(NAME, data, plan), dest, c, label="L", **kw)
        log = [(rng, status) for _, rng, _, status in srv.log]
    return got, log, c.lines, dest


def fail_plan(tmp_path: Path, plan: list[str], exc: type = EnvironmentProblem, **kw):
    c = cfg(tmp_path, **kw.pop("config", {}))
    with FaultServer(range_ok=kw.pop("range_ok", True), stall_s=1.0, gzip=kw.pop("gzip", False)) as srv:
        url = srv.add(NAME, kw.pop("data", DATA), plan)
        with pytest.raises(exc) as ei:
            download(url, tmp_path / "d.part", c, label="L", **kw)
        log = [(rng, status) for _, rng, _, status in srv.log]
    return ei.value, log, c.lines, url


# ---------------------------------------------------------------------------- the happy path
def test_a_clean_download(tmp_path):
    (sha, size), log, lines, dest = fetch_plan(tmp_path, [], expected_size=len(DATA), expected_sha256=SHA)
    assert (sha, size) == (SHA, len(DATA)) and dest.read_bytes() == DATA
    assert log == [(None, 200)]
    assert lines[0].startswith("L: downloading http://127.0.0.1:") and len(lines) == 1
    assert (dest.stat().st_mode & 0o777) == 0o600


def test_an_unsized_download_without_a_hash(tmp_path):
    assert fetch_plan(tmp_path, ["nolength"])[0] == (SHA, len(DATA))


def test_the_label_defaults_to_the_url(tmp_path):
    c = cfg(tmp_path)
    with FaultServer() as srv:
        url = srv.add(NAME, DATA)
        download(url, tmp_path / "d", c)
    assert c.lines == [f"{url}: downloading {url}"]


# ------------------------------------------------------------------------------ resuming
def test_a_dropped_body_is_resumed_exactly_where_it_broke(tmp_path):
    """http.client's readinto keeps the partial read of a dropped connection: the retry asks
    for the byte after the last one received, not the start of a lost chunk."""
    (sha, size), log, lines, dest = fetch_plan(tmp_path, ["drop"], expected_size=len(DATA), expected_sha256=SHA)
    assert (sha, size) == (SHA, len(DATA)) and dest.read_bytes() == DATA
    assert log == [(None, 200), (f"bytes={HALF}-", 206)]
    assert lines[1] == f"L: truncated body: {HALF} of {len(DATA)} bytes; retry 1/3 in 0.01s, resuming at byte {HALF}"


def test_a_server_ignoring_range_is_read_again_from_byte_0(tmp_path):
    (sha, size), log, lines, dest = fetch_plan(tmp_path, ["drop"], range_ok=False, expected_size=len(DATA))
    assert (sha, size) == (SHA, len(DATA)) and dest.read_bytes() == DATA
    assert log == [(None, 200), (f"bytes={HALF}-", 200)]
    assert "L: server ignored the Range request; restarting from byte 0" in lines


def test_416_on_resume_starts_over(tmp_path):
    (sha, size), log, lines, dest = fetch_plan(tmp_path, ["drop", "416"], expected_size=len(DATA))
    assert (sha, size) == (SHA, len(DATA)) and dest.read_bytes() == DATA
    assert log == [(None, 200), (f"bytes={HALF}-", 416), (None, 200)]
    assert lines[2] == "L: HTTP 416 on resume; starting over; retry 2/3 in 0.02s, from the start"


def test_416_without_a_range_is_an_error(tmp_path):
    e, log, _, _ = fail_plan(tmp_path, ["416"])
    assert e.headline == "downloading L failed with HTTP 416 (Requested Range Not Satisfiable)" and len(log) == 1


def test_a_wrong_content_range_starts_over(tmp_path):
    (sha, size), log, lines, _ = fetch_plan(tmp_path, ["drop", "badrange"], expected_size=len(DATA))
    assert (sha, size) == (SHA, len(DATA))
    assert log == [(None, 200), (f"bytes={HALF}-", 206), (None, 200)]
    assert lines[2].startswith(f"L: unexpected Content-Range 'bytes {HALF + 1}-{len(DATA) - 1}/{len(DATA)}' on resume; "
                               "starting over; retry 2/3")


def test_a_body_cut_without_content_length_is_resumed(tmp_path):
    """No Content-Length: only the pinned size tells that the body ended early."""
    (sha, size), log, lines, _ = fetch_plan(tmp_path, ["cut"], expected_size=len(DATA))
    assert (sha, size) == (SHA, len(DATA))
    assert log == [(None, 200), (f"bytes={HALF}-", 206)]
    assert lines[1].startswith(f"L: truncated body: {HALF} of {len(DATA)} bytes; retry 1/3")


def test_an_unsized_cut_body_is_taken_as_it_is(tmp_path):
    """Neither a Content-Length nor a pinned size: the end of the body is the end of the file
    (the hash check is the caller's)."""
    got, log, _, _ = fetch_plan(tmp_path, ["cut"])
    assert got == (hashlib.sha256(DATA[:HALF]).hexdigest(), HALF) and len(log) == 1


def test_a_short_body_with_its_length_is_not_retried(tmp_path):
    got, log, _, _ = fetch_plan(tmp_path, ["short"], expected_size=len(DATA))
    assert got == (hashlib.sha256(DATA[:HALF]).hexdigest(), HALF) and len(log) == 1


def test_a_reset_connection_is_retried(tmp_path):
    (sha, size), log, lines, _ = fetch_plan(tmp_path, ["reset"], expected_size=len(DATA), expected_sha256=SHA)
    assert (sha, size) == (SHA, len(DATA)) and len(log) == 2
    assert "transfer broke after" in lines[1] and "Connection reset by peer" in lines[1]


def test_a_stalled_body_is_retried(tmp_path):
    (sha, size), log, lines, _ = fetch_plan(tmp_path, ["stall"], expected_size=len(DATA))
    assert (sha, size) == (SHA, len(DATA)) and log == [(None, 200), (None, 200)]
    assert "transfer broke after 0 bytes" in lines[1] and lines[1].endswith("from the start")


# --------------------------------------------------------------------- the hash restart
def test_a_resumed_transfer_with_a_wrong_hash_is_fetched_once_more_from_0(tmp_path):
    """The file changed on the server between attempts: the spliced file is wrong, the whole
    file fetched again is right."""
    (sha, size), log, lines, dest = fetch_plan(tmp_path, ["drop", "wrong"], expected_size=len(DATA),
                                               expected_sha256=SHA)
    assert (sha, size) == (SHA, len(DATA)) and dest.read_bytes() == DATA
    assert log == [(None, 200), (f"bytes={HALF}-", 206), (None, 200)]
    assert lines[2] == ("L: hash mismatch after a resumed transfer; downloading once more from byte 0; retry 2/3 in "
                        "0.02s, from the start")


def test_the_hash_restart_happens_once(tmp_path):
    wrong = bytes(b ^ 0x5A for b in DATA)
    got, log, _, _ = fetch_plan(tmp_path, ["drop", "wrong", "wrong", "drop"], expected_size=len(DATA),
                                expected_sha256=SHA)
    assert got == (hashlib.sha256(wrong).hexdigest(), len(DATA))
    # drop, resume (spliced: wrong), restart (whole wrong file): returned as it is, for the caller to refuse.
    assert [s for _, s in log] == [200, 206, 200]
    # The restart breaks and resumes into a wrong splice again: no second restart.
    spliced = DATA[:HALF] + wrong[HALF:]
    got, log, _, _ = fetch_plan(tmp_path, ["drop", "wrong", "drop", "wrong"], expected_size=len(DATA),
                                expected_sha256=SHA)
    assert got == (hashlib.sha256(spliced).hexdigest(), len(DATA)) and [s for _, s in log] == [200, 206, 200, 206]


def test_no_restart_without_a_pinned_hash_or_after_a_whole_transfer(tmp_path):
    spliced = DATA[:HALF] + bytes(b ^ 0x5A for b in DATA)[HALF:]
    got, log, _, _ = fetch_plan(tmp_path, ["drop", "wrong"], expected_size=len(DATA))
    assert got == (hashlib.sha256(spliced).hexdigest(), len(DATA)) and len(log) == 2
    wrong = bytes(b ^ 0x5A for b in DATA)
    got, log, _, _ = fetch_plan(tmp_path, ["wrong"], expected_size=len(DATA), expected_sha256=SHA)
    assert got == (hashlib.sha256(wrong).hexdigest(), len(DATA)) and len(log) == 1
    got, log, _, _ = fetch_plan(tmp_path, ["drop", "wrong"], range_ok=False, expected_size=len(DATA),
                                expected_sha256=SHA)  # restarted by the server, not resumed
    assert got == (hashlib.sha256(wrong).hexdigest(), len(DATA)) and len(log) == 2


def test_a_right_resumed_transfer_is_not_fetched_again(tmp_path):
    got, log, _, _ = fetch_plan(tmp_path, ["drop", "drop"], expected_size=len(DATA), expected_sha256=SHA)
    assert got == (SHA, len(DATA)) and len(log) == 3
    assert [r for r, _ in log] == [None, f"bytes={HALF}-", f"bytes={HALF + (len(DATA) - HALF) // 2}-"]


# ------------------------------------------------------------------------ statuses, retries
@pytest.mark.parametrize("fault,status", [("500", 500), ("503-then-ok", 503), ("429", 429)])
def test_server_errors_and_429_are_retried(tmp_path, fault, status):
    (sha, size), log, lines, _ = fetch_plan(tmp_path, [fault], expected_size=len(DATA))
    assert (sha, size) == (SHA, len(DATA)) and log == [(None, status), (None, 200)]
    assert lines[1] == f"L: HTTP {status} from the server; retry 1/3 in 0.01s, from the start"


@pytest.mark.parametrize("code,reason", [(428, "Precondition Required"), (499, "???"), (403, "Forbidden")])
def test_other_errors_are_not_retried(tmp_path, code, reason):
    e, log, _, url = fail_plan(tmp_path, [str(code)])
    assert e.headline == f"downloading L failed with HTTP {code} ({reason})"
    assert e.details == (("url", url),) and len(log) == 1


def test_retries_back_off_doubling_up_to_the_cap(tmp_path):
    e, log, lines, url = fail_plan(tmp_path, ["500"] * 5, config={"retries": 4, "backoff_max": 0.03})
    assert lines[1:] == [f"L: HTTP 500 from the server; retry {i}/4 in {d}s, from the start"
                         for i, d in ((1, "0.01"), (2, "0.02"), (3, "0.03"), (4, "0.03"))]
    assert len(log) == 5
    assert e.headline == ("downloading L failed after 5 attempts; the partial file was deleted and nothing was "
                          "installed")
    assert e.details == (("url", url), ("last error", "HTTP 500 from the server"))


def test_no_retries_means_one_attempt(tmp_path):
    e, log, _, _ = fail_plan(tmp_path, ["500"], config={"retries": 0})
    assert e.headline.startswith("downloading L failed after 1 attempts") and len(log) == 1


def test_the_wait_between_attempts_is_the_backoff(tmp_path):
    """Ten retries of 10 ms each: a wait of a second or more per retry would take ten seconds."""
    t0 = time.monotonic()
    got, log, _, _ = fetch_plan(tmp_path, ["500"] * 10, config={"retries": 10, "backoff_max": 0.01})
    assert got == (SHA, len(DATA)) and len(log) == 11
    assert time.monotonic() - t0 < 6


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_a_refused_connection_is_retried(tmp_path):
    c = cfg(tmp_path, retries=2)
    url = f"http://127.0.0.1:{_dead_port()}/{NAME}"
    with pytest.raises(EnvironmentProblem) as ei:
        download(url, tmp_path / "d", c, label="L")
    assert ei.value.headline.startswith("downloading L failed after 3 attempts")
    assert dict(ei.value.details)["last error"].startswith("connection failed: ")
    assert [ln.split("; retry ")[1] for ln in c.lines[1:]] == ["1/2 in 0.01s, from the start",
                                                               "2/2 in 0.02s, from the start"]


def test_a_server_that_never_answers_is_retried(tmp_path):
    """Accepted, then silent: the read timeout of the response headers (requests' Timeout)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    try:
        c = cfg(tmp_path, retries=1)
        with pytest.raises(EnvironmentProblem) as ei:
            download(f"http://127.0.0.1:{srv.getsockname()[1]}/{NAME}", tmp_path / "d", c, label="L")
    finally:
        srv.close()
    assert ei.value.headline.startswith("downloading L failed after 2 attempts")
    assert "timed out" in dict(ei.value.details)["last error"]


def test_a_silent_server_past_the_deadline_is_the_deadline_even_without_retries(tmp_path):
    """No response at all, so no cut: the clock alone says the deadline passed, and that is what
    is reported, not "failed after 1 attempts"."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    try:
        c = cfg(tmp_path, retries=0, deadline=0.3, read_timeout=30)
        with pytest.raises(EnvironmentProblem) as ei:
            download(f"http://127.0.0.1:{srv.getsockname()[1]}/{NAME}", tmp_path / "d", c, label="L")
    finally:
        srv.close()
    assert "0.3-second deadline" in ei.value.headline
    assert dict(ei.value.details)["last error"].startswith("connection failed: ")


def test_a_host_name_that_does_not_resolve_is_not_retried(tmp_path):
    c = cfg(tmp_path, retries=3)
    with pytest.raises(EnvironmentProblem) as ei:
        download(f"http://m3fuse-test.invalid/{NAME}", tmp_path / "d", c, label="L")
    assert ei.value.headline == "downloading L failed: the host name in its URL does not resolve"
    assert len(c.lines) == 1  # no retry


def test_name_resolution_error_walks_causes_contexts_reasons_and_args():
    gai = socket.gaierror(-2, "Name or service not known")

    class Wrapped(Exception):
        def __init__(self, *args, reason=None):
            super().__init__(*args)
            self.reason = reason

    find = fetch._name_resolution_error
    assert find(gai) == str(gai)
    assert find(Wrapped("x", Wrapped("y", gai))) == str(gai)  # in args, two levels down
    assert find(Wrapped("x", reason=gai)) == str(gai)
    caused = Wrapped("outer")
    caused.__cause__ = gai
    assert find(caused) == str(gai)
    ctx = Wrapped("outer")
    ctx.__context__ = Wrapped("mid", reason=gai)
    assert find(ctx) == str(gai)
    a, b = Wrapped("a"), Wrapped("b")
    a.__context__, b.__context__ = b, a  # a cycle without a resolver error ends
    assert find(a) is None
    assert find(Wrapped("x", "not an exception", 3)) is None
    assert find(ConnectionRefusedError(111, "refused")) is None


def test_an_invalid_url_is_an_environment_problem(tmp_path):
    with pytest.raises(EnvironmentProblem) as ei:
        download("http://", tmp_path / "d", cfg(tmp_path), label="L")
    assert ei.value.headline == "downloading L failed"
    assert ei.value.details[0] == ("url", "http://") and ei.value.details[1][0] == "error"


# -------------------------------------------------------------------- size limits
def test_a_pinned_size_stops_the_read_past_it(tmp_path):
    """A body far longer than the pin is read one chunk past the pin, not to its end."""
    got, log, _, _ = fetch_plan(tmp_path, [], expected_size=10)
    assert got[1] == fetch.CHUNK and len(log) == 1


def test_the_read_stops_one_chunk_past_a_pin_a_byte_short_of_it(tmp_path):
    got, _, _, _ = fetch_plan(tmp_path, [], expected_size=fetch.CHUNK - 1)
    assert got == (hashlib.sha256(DATA[:fetch.CHUNK]).hexdigest(), fetch.CHUNK)


def test_a_resumed_read_stops_one_chunk_past_the_pin(tmp_path):
    """After a resume the bound counts the bytes already there: a body far past the pin is read
    one chunk into the rest, not to its end."""
    big = os.urandom(4 << 20)
    half = len(big) // 2
    got, log, _, _ = fetch_plan(tmp_path, ["drop"], data=big, expected_size=half + 10)
    assert log == [(None, 200), (f"bytes={half}-", 206)]
    assert got == (hashlib.sha256(big[:half + fetch.CHUNK]).hexdigest(), half + fetch.CHUNK)


def test_a_body_cut_short_of_its_length_at_the_pinned_size_is_not_taken_whole(tmp_path):
    """The body broke exactly at the pinned size, short of its Content-Length: a truncated
    transfer, retried, even though its bytes so far are what the pin names."""
    got, log, lines, _ = fetch_plan(tmp_path, ["drop"], expected_size=HALF,
                                    expected_sha256=hashlib.sha256(DATA[:HALF]).hexdigest())
    assert lines[1].startswith(f"L: truncated body: {HALF} of {len(DATA)} bytes; retry 1/3")
    assert len(log) > 1 and got[1] > HALF


def test_a_body_one_byte_past_a_pinned_chunk_is_read_whole(tmp_path):
    """The pin ends exactly at a chunk boundary: the read goes on, so the extra byte is seen."""
    data = DATA[:fetch.CHUNK + 1]
    got, log, _, _ = fetch_plan(tmp_path, [], data=data, expected_size=fetch.CHUNK)
    assert got == (hashlib.sha256(data).hexdigest(), fetch.CHUNK + 1) and len(log) == 1


def test_a_body_of_exactly_the_ceiling_is_taken(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch.CEILING_VAR, str(len(DATA)))
    assert fetch_plan(tmp_path, [])[0] == (SHA, len(DATA))
    monkeypatch.setenv(fetch.CEILING_VAR, str(len(DATA) - 1))
    e, log, _, url = fail_plan(tmp_path, [], exc=IntegrityError)
    assert e.headline == (f"downloading L stopped at the {len(DATA) - 1}-byte ceiling for a wheel whose lock entry "
                          "pins no size; the partial file was deleted")
    assert e.details == (("url", url),) and len(log) == 1


def test_the_ceiling_counts_the_resumed_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch.CEILING_VAR, str(len(DATA) - 1))
    _, log, _, _ = fail_plan(tmp_path, ["drop"], exc=IntegrityError)
    assert log == [(None, 200), (f"bytes={HALF}-", 206)]


# ------------------------------------------------------------------ the content-encoded reader
def test_a_gzip_body_is_decoded(tmp_path):
    """Sent encoded although asked for identity: its Content-Length counts the gzip bytes (more
    than the file's, the file being random) and says nothing of the file's length."""
    got, log, _, dest = fetch_plan(tmp_path, [], gzip=True, range_ok=False, expected_size=len(DATA),
                                   expected_sha256=SHA)
    assert got == (SHA, len(DATA)) and dest.read_bytes() == DATA and len(log) == 1
    got, log, _, _ = fetch_plan(tmp_path, [], gzip=True, range_ok=False)
    assert got == (SHA, len(DATA)) and len(log) == 1


@pytest.mark.parametrize("fault,why", [("drop", "IncompleteRead"), ("stall", "timed out"),
                                       ("garbled", "Received response with content-encoding: gzip")])
def test_a_broken_gzip_body_is_retried(tmp_path, fault, why):
    got, log, lines, _ = fetch_plan(tmp_path, [fault], gzip=True, range_ok=False, expected_size=len(DATA))
    assert got == (SHA, len(DATA)) and len(log) == 2
    assert "transfer broke after" in lines[1] and why in lines[1], lines


# ------------------------------------------------------------------------- the deadline
def test_a_trickle_is_ended_by_the_deadline(tmp_path):
    """One byte every 0.2 s never trips the read timeout; the deadline shuts the socket at 0.5 s,
    long before the trickle's 6 s."""
    t0 = time.monotonic()
    e, log, _, url = fail_plan(tmp_path, ["drip"], config={"deadline": 0.5, "read_timeout": 5})
    assert time.monotonic() - t0 < 4
    assert e.headline == ("downloading L did not finish within its 0.5-second deadline; the partial file was deleted"
                          " and nothing was installed")
    rows = dict(e.details)
    assert rows["url"] == url and rows["received"].endswith(" bytes") and "last error" not in rows
    assert f"--download-deadline (or {DEADLINE_VAR})" in e.hint and len(log) == 1


def test_a_deadline_under_a_second_is_kept(tmp_path):
    """The cut comes at the deadline itself, also when less than a second is left: with a byte
    every 0.1 s (inside the read timeout, capped at the 0.3 s left) about 3 arrive, not 10."""
    c = cfg(tmp_path, deadline=0.3, read_timeout=5)
    with FaultServer(drip_s=0.1) as srv:
        url = srv.add(NAME, DATA, ["drip"])
        with pytest.raises(EnvironmentProblem) as ei:
            download(url, tmp_path / "d", c, label="L")
    assert "0.3-second deadline" in ei.value.headline
    assert int(dict(ei.value.details)["received"].split()[0]) < 7, ei.value.details


def test_a_gzip_trickle_is_ended_by_the_deadline(tmp_path):
    """The decoding reader fails (rather than ending) on the shut socket: still the deadline."""
    t0 = time.monotonic()
    e, log, _, _ = fail_plan(tmp_path, ["drip"], gzip=True, range_ok=False, config={"deadline": 0.5, "read_timeout": 5})
    assert time.monotonic() - t0 < 4
    assert "0.5-second deadline" in e.headline and len(log) == 1


def test_the_deadline_ends_the_waits_between_attempts(tmp_path):
    """A backoff that outlasts the deadline: the wait ends at it, with the last error named and no
    further request."""
    c = cfg(tmp_path, deadline=0.4, retries=4, backoff=30.0)
    with FaultServer() as srv:
        url = srv.add(NAME, DATA, ["500"] * 5)
        t0 = time.monotonic()
        with pytest.raises(EnvironmentProblem) as ei:
            download(url, tmp_path / "d", c, label="L")
        took = time.monotonic() - t0
        assert len(srv.log) == 1
    assert "0.4-second deadline" in ei.value.headline and took < 10
    assert dict(ei.value.details)["last error"] == "HTTP 500 from the server"
    assert c.lines[1] == "L: HTTP 500 from the server; retry 1/4 in 30s, from the start"


def test_a_stall_past_the_deadline_is_the_deadline(tmp_path):
    """The read timeout is capped by the time left: a stall longer than the deadline ends at the
    deadline, reported as such, not as a broken transfer retried."""
    e, log, _, _ = fail_plan(tmp_path, ["stall"], config={"deadline": 0.3, "read_timeout": 30})
    assert "0.3-second deadline" in e.headline and len(log) == 1


def test_the_deadline_defaults_to_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(DEADLINE_VAR, "0.4")
    e, _, _, _ = fail_plan(tmp_path, ["drip"], config={"deadline": None, "read_timeout": 5})
    assert "0.4-second deadline" in e.headline
    monkeypatch.setenv(DEADLINE_VAR, "0")
    with pytest.raises(UsageProblem):
        download("http://127.0.0.1:9/x", tmp_path / "d", cfg(tmp_path, deadline=None))


def test_deadline_seconds():
    assert fetch.DEFAULT_DEADLINE_S == 3600.0
    assert fetch.deadline_seconds(0.5) == 0.5 and isinstance(fetch.deadline_seconds(2), float)
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(UsageProblem) as ei:
            fetch.deadline_seconds(bad)
        assert ei.value.headline == (f"--download-deadline {bad:g}: the download deadline is a positive number of "
                                     "seconds (e.g. 1800).")


def test_deadline_seconds_from_the_variable(monkeypatch):
    for raw, want in (("", 3600.0), ("  ", 3600.0), ("0.5", 0.5), (" 12 ", 12.0)):
        monkeypatch.setenv(DEADLINE_VAR, raw)
        assert fetch.deadline_seconds() == want, raw
    monkeypatch.delenv(DEADLINE_VAR)
    assert fetch.deadline_seconds() == 3600.0
    for raw in ("0", "-1", "-0.5", "soon", "inf"):
        monkeypatch.setenv(DEADLINE_VAR, raw)
        with pytest.raises(UsageProblem) as ei:
            fetch.deadline_seconds()
        assert ei.value.headline.startswith(f"{DEADLINE_VAR}={raw!r}: the download deadline"), raw
    monkeypatch.setenv(DEADLINE_VAR, "5")
    assert fetch.deadline_seconds(7) == 7.0  # the option wins


# -------------------------------------------------------------------------- descriptors
def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_download_closes_only_the_descriptor_it_opened(tmp_path):
    with FaultServer() as srv:
        url = srv.add(NAME, DATA)
        c = cfg(tmp_path)
        download(url, tmp_path / "warm", c)  # requests' imports and pools are in place
        before = _open_fds()
        download(url, tmp_path / "own", c)
        assert _open_fds() == before
        fd = os.open(tmp_path / "given", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            assert download(url, tmp_path / "ignored", c, fd=fd) == (SHA, len(DATA))
            assert os.fstat(fd).st_size == len(DATA)  # still open: the caller's to close
        finally:
            os.close(fd)
    assert (tmp_path / "given").read_bytes() == DATA and not (tmp_path / "ignored").exists()


def test_a_longer_old_file_is_cut_to_the_download(tmp_path):
    dest = tmp_path / "d"
    dest.write_bytes(b"x" * (len(DATA) + 100))
    with FaultServer() as srv:
        assert download(srv.add(NAME, DATA), dest, cfg(tmp_path)) == (SHA, len(DATA))
    assert dest.read_bytes() == DATA


def test_an_unwritable_destination_is_named(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(EnvironmentProblem) as ei:
        download("http://127.0.0.1:9/x", link, cfg(tmp_path), label="L")
    assert ei.value.headline == "cannot write the download of L"
    assert ei.value.details == (("file", str(link)), ("error", "Too many levels of symbolic links"))
    assert not (tmp_path / "elsewhere").exists()


def test_a_write_error_is_not_retried(tmp_path):
    """The disk refuses the bytes (here a file-size limit: EFBIG): a problem of the cache, named
    as such at once, not a network fault retried four times."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    c = cfg(tmp_path)
    dest = tmp_path / "d"
    with FaultServer() as srv:
        url = srv.add(NAME, DATA)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, old_limit[1]))
        try:
            with pytest.raises(EnvironmentProblem) as ei:
                download(url, dest, c, label="L")
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
            signal.signal(signal.SIGXFSZ, old_handler)
        assert len(srv.log) == 1
    assert ei.value.headline == "writing the download of L failed"
    assert ei.value.details[0] == ("file", str(dest)) and "File too large" in ei.value.details[1][1]


def test_the_pump_reraises_a_write_error_after_the_reads(tmp_path):
    import io

    with open("/dev/full", "wb", buffering=0) as f:
        pump = fetch._Pump(f, hashlib.sha256())
        with pytest.raises(OSError) as ei:
            pump.run(io.BytesIO(DATA).readinto, None, None)
    assert ei.value.errno == 28 and pump.done == 0


def test_the_pump_counts_what_it_wrote_before_a_read_error(tmp_path):
    chunks = [b"a" * 10, b"b" * 5]

    def readinto(buf):
        if not chunks:
            raise ConnectionResetError("gone")
        b = chunks.pop(0)
        buf[:len(b)] = b
        return len(b)

    h = hashlib.sha256()
    with open(tmp_path / "out", "wb") as f:
        pump = fetch._Pump(f, h)
        with pytest.raises(ConnectionResetError):
            pump.run(readinto, None, None)
    assert pump.done == 15 and (tmp_path / "out").read_bytes() == b"a" * 10 + b"b" * 5
    assert h.hexdigest() == hashlib.sha256(b"a" * 10 + b"b" * 5).hexdigest()


# ---------------------------------------------------------------------------- progress
@pytest.fixture
def tty_stderr(monkeypatch):
    """sys.stderr on a real terminal (a pty); yields a function returning what it showed."""
    master, slave = os.openpty()
    out = bytearray()

    def drain():
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            out.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    term = open(slave, "w", closefd=True)  # noqa: SIM115 - closed below

    class Tty:
        def install(self) -> None:
            # In the test's own phase: pytest points sys.stderr at its capture at each phase.
            monkeypatch.setattr("sys.stderr", term)

        def shown(self) -> str:
            term.flush()
            time.sleep(0.2)
            return out.decode("utf-8", "replace")

    yield Tty()
    term.close()
    # The reader ends on the closed terminal (EIO) before the master goes: a reader still blocked
    # on a closed master's number would read the next test's terminal once that number is reused.
    reader.join(5)
    assert not reader.is_alive()
    os.close(master)


def test_the_bar_is_drawn_on_a_terminal_only(tty_stderr, monkeypatch):
    tty_stderr.install()
    bar = fetch._bar("a" * 50, 1000, 250, None)
    assert bar is not None and bar.pos == 250 and bar.length == 1000 and bar.show_percent
    assert bar.label == "  " + "a" * 40 and bar.width == 30
    bar.__exit__(None, None, None)
    shown = tty_stderr.shown()
    assert "25%" in shown and "250" not in shown  # a percentage, not a count of bytes
    unknown = fetch._bar("b", None, 0, True)
    assert unknown is not None and unknown.pos == 0 and not unknown.show_percent
    unknown.__exit__(None, None, None)
    assert fetch._bar("c", 10, 0, False) is None
    monkeypatch.setattr("sys.stderr", open(os.devnull, "w"))  # noqa: SIM115
    assert fetch._bar("c", 10, 0, None) is None and fetch._bar("c", 10, 0, True) is None


def test_a_resumed_download_draws_its_bar_to_100_percent(tmp_path, tty_stderr):
    tty_stderr.install()
    got, _, _, _ = fetch_plan(tmp_path, ["drop"], config={"progress": None}, expected_size=len(DATA))
    shown = tty_stderr.shown()
    assert got == (SHA, len(DATA))
    percents = [int(p) for p in __import__("re").findall(r"(-?\d+)%", shown)]
    assert percents and min(percents) >= 0 and max(percents) == 100 and percents[-1] == 100, shown
    assert "  L  [##############----------------]   49%" in shown, shown  # resumed where it broke


def test_a_bar_of_unknown_length(tmp_path, tty_stderr):
    """Neither a Content-Length nor a pinned size: a bar without a percentage (click refuses a
    bar with neither a length nor an iterable)."""
    tty_stderr.install()
    got, _, _, _ = fetch_plan(tmp_path, ["nolength"], config={"progress": None})
    shown = tty_stderr.shown()
    assert got == (SHA, len(DATA)) and "  L  [" in shown and "%" not in shown, shown


def test_an_unsized_bar_takes_the_pinned_size(tmp_path, tty_stderr):
    tty_stderr.install()
    got, _, _, _ = fetch_plan(tmp_path, ["nolength"], config={"progress": None}, expected_size=len(DATA))
    shown = tty_stderr.shown()
    assert got == (SHA, len(DATA)) and "100%" in shown, shown


def _response(conn_sock=None, fp_sock=None, close=None):
    """The attribute paths _cut follows into urllib3 and http.client, holding real sockets."""
    from types import SimpleNamespace as NS

    raw = NS(_connection=NS(sock=conn_sock), _fp=NS(fp=NS(raw=NS(_sock=fp_sock))))
    return NS(raw=raw, close=close or (lambda: None))


def test_cut_shuts_the_first_socket_that_can_be_shut():
    dead, _ = socket.socketpair()
    dead.close()  # shutdown() fails on it: the next one is tried
    mine, peer = socket.socketpair()
    closed = []
    cut = threading.Event()
    try:
        fetch._cut(_response(dead, mine, close=lambda: closed.append(1)), cut)
        assert cut.is_set() and not closed
        peer.settimeout(2)
        assert peer.recv(1) == b""  # shut down: the peer reads the end at once
        mine.settimeout(2)
        assert mine.recv(1) == b""
    finally:
        mine.close()
        peer.close()


def test_cut_closes_the_response_when_no_socket_is_found():
    closed = []
    cut = threading.Event()
    fetch._cut(_response(close=lambda: closed.append(1)), cut)
    assert cut.is_set() and closed == [1]

    def fails():
        raise RuntimeError("already closed")

    fetch._cut(_response(close=fails), threading.Event())  # best effort: nothing escapes the timer
