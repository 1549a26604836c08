"""Issue 25, items 1 and 2: one reader, bounded parsing, proven over m3fuse's own source.

Every read of a file m3fuse does not own goes through m3fuse/safeio.py (lstat first, regular
files only, O_NOFOLLOW, never blocking, bounded); every compile/ast.parse of text m3fuse does
not own goes through m3fuse/pysource.py (size first, every parser failure a clean error); no
byte is unmarshalled. This test walks the AST of every module of the package and fails on any
other file read or parse. The allowlist is short, and each entry says why it is not a read of
a file someone else controls.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "m3fuse"
READERS = {"m3fuse/safeio.py"}  # the one reader
PARSERS = {"m3fuse/pysource.py"}  # the one bounded parser

# (module, function, what) -> why it is allowed. Nothing else may read, parse or unmarshal.
ALLOWED = {
    ("m3fuse/patching/atomic.py", "_checkpoint", "open"):
        "the test-only log named by M3FUSE_TEST_CHECKPOINTS (the crash suite's), never set in use",
    ("m3fuse/wheels/install.py", "probe", "compile"): "_PROBE_CODE: m3fuse's own code, compiled to run in-process",
    ("m3fuse/wheels/install.py", "probe", "exec"): "_PROBE_CODE: m3fuse's own code, run in-process",
    ("m3fuse/patching/engine.py", "_locked_flags", "os.open"):
        "opened (O_NOFOLLOW|O_NONBLOCK) for an FS_IOC_GETFLAGS ioctl: no byte is read",
    ("m3fuse/ownedpaths.py", "owned_fd", "os.open"):
        "'/' opened as a directory descriptor (O_DIRECTORY) to walk down with openat: no byte is read",
    ("m3fuse/wheels/fetch.py", "_writer_alive", "os.open"):
        "a .part in m3fuse's own cache, opened (O_NOFOLLOW|O_NONBLOCK) to test its flock: no byte is read",
    ("m3fuse/wheels/fetch.py", "_download", "open"):
        "the download's own .part in m3fuse's cache, opened to append or write (mode 'ab'/'wb')",
    ("m3fuse/wheels/fetch.py", "_from_local", "os.fdopen"):
        "wraps the descriptor safeio.open_regular checked; reads stop one byte past the pinned size",
}

READ_ATTRS = {"read_bytes", "read_text"}  # pathlib reads
# Importing these is reading (marshal.dumps of m3fuse's own code and zipfile's types are fine:
# their reading calls are banned below).
BANNED_MODULES = {"importlib.metadata", "importlib_metadata", "pickle", "shelve", "tarfile"}
BANNED_CALLS = {("marshal", "loads"), ("marshal", "load"), ("pickle", "loads"), ("pickle", "load"),
                ("json", "load"), ("tomllib", "load"), ("os", "read"), ("os", "open"), ("os", "fdopen"),
                ("ast", "parse"), ("zipfile", "ZipFile")}
ZIP_READS = {"read", "open", "extract", "extractall"}  # on an archive object (zf, self._zip, ...)
# os.open for writing or for a directory descriptor is not a read.
NOT_A_READ = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_DIRECTORY"}


def _flags_say_not_a_read(call: ast.Call) -> bool:
    names = {n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", "") for a in call.args[1:2]
             for n in ast.walk(a)}
    return bool(names & NOT_A_READ)


def _writes(call: ast.Call, at: int = 1) -> bool:
    """open(path, "w"/"a"/"x"...), os.fdopen(fd, "wb") or path.open("w") (mode at `at`): a write."""
    mode = call.args[at] if len(call.args) > at else next((k.value for k in call.keywords if k.arg == "mode"), None)
    return (isinstance(mode, ast.Constant) and isinstance(mode.value, str)
            and any(c in mode.value for c in "wax+"))


def findings() -> list[tuple[str, str, str, int]]:
    """(module, enclosing function, what, line) of every read or parse outside the one reader."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        out += scan(path.read_text(), path.relative_to(REPO).as_posix())
    return out


def scan(text: str, rel: str) -> list[tuple[str, str, str, int]]:
    out = []
    tree = ast.parse(text, filename=rel)
    owner: dict[ast.AST, str] = {}
    # ast.walk is breadth first: an inner function comes later and wins for its own nodes.
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        for n in ast.walk(fn):
            if n is not fn:
                owner[n] = fn.name
    def hit(node: ast.AST, what: str) -> None:
        out.append((rel, owner.get(node, "<module>"), what, node.lineno))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in BANNED_MODULES and rel not in READERS:
                    hit(node, f"import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 0 and rel not in READERS and (
                    mod in BANNED_MODULES or any(f"{mod}.{a.name}" in BANNED_MODULES for a in node.names)):
                hit(node, f"from {mod} import")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name):
                if f.id == "open" and rel not in READERS and not _writes(node):
                    hit(node, "open")
                elif f.id in ("compile", "exec", "eval") and rel not in PARSERS:
                    hit(node, f.id)
                elif f.id == "ZipFile" and rel not in READERS:
                    hit(node, "ZipFile")
            elif isinstance(f, ast.Attribute):
                base = f.value.id if isinstance(f.value, ast.Name) else None
                receiver = ast.unparse(f.value).lower()
                if rel in READERS or (base == "ast" and rel in PARSERS):
                    continue
                if f.attr in READ_ATTRS and base != "safeio":
                    hit(node, f.attr)
                elif f.attr in ZIP_READS and ("zip" in receiver or receiver == "zf"):
                    hit(node, f"zip {f.attr}")
                elif f.attr == "open" and base not in ("os", "safeio") and not _writes(node, 0):
                    hit(node, "Path.open")  # pathlib's open (or any other object's) for reading
                elif (base, f.attr) in BANNED_CALLS:
                    if (base, f.attr) == ("os", "open") and _flags_say_not_a_read(node):
                        continue
                    if (base, f.attr) == ("os", "fdopen") and _writes(node):
                        continue
                    hit(node, f"{base}.{f.attr}")
    return out


def _allowed(rel: str, fn: str, what: str) -> bool:
    return (rel, fn, what) in ALLOWED or (rel, "*", what) in ALLOWED


def test_every_read_and_parse_of_foreign_bytes_goes_through_the_one_reader():
    bad = [f"{rel}:{line} in {fn}(): {what}" for rel, fn, what, line in findings() if not _allowed(rel, fn, what)]
    assert bad == [], "reads or parses outside m3fuse/safeio.py and m3fuse/pysource.py:\n  " + "\n  ".join(bad)


def test_the_allowlist_is_short_and_says_why():
    assert len(ALLOWED) <= 10 and all(len(why) > 20 for why in ALLOWED.values())


def test_the_walk_catches_each_kind_of_read():
    """The scanner itself: a module with one of each forbidden read is caught line by line."""
    planted = (
        "import marshal\nfrom importlib import metadata\nimport zipfile\nimport ast\nimport os\n"
        "def f(p):\n"
        "    open(p)\n    p.read_bytes()\n    p.read_text()\n    marshal.loads(b'')\n"
        "    zipfile.ZipFile(p)\n    self._zip.read('m')\n    ast.parse('')\n    compile('', 'x', 'exec')\n"
        "    os.open(p, os.O_RDONLY)\n    os.open(p, os.O_WRONLY | os.O_CREAT)\n"
        "    os.fdopen(3, 'rb')\n    os.fdopen(3, 'wb')\n    open(p, 'a')\n    safeio.read_text(p, 9)\n"
        "    p.open()\n    p.open('w')\n")
    got = [(what, line) for _, _, what, line in scan(planted, "m3fuse/planted.py")]
    assert sorted(got, key=lambda x: x[1]) == [
        ("from importlib import", 2), ("open", 7), ("read_bytes", 8), ("read_text", 9), ("marshal.loads", 10),
        ("zipfile.ZipFile", 11), ("zip read", 12), ("ast.parse", 13), ("compile", 14), ("os.open", 15),
        ("os.fdopen", 17), ("Path.open", 21)], got
