"""A canonical form of marshalled code, computed without unmarshalling it.

`marshal.loads` is not safe on untrusted bytes: a 21-byte .pyc declaring a list of 2**28
items makes CPython allocate 2.1 GB before it reads one item, and mutated input raises
SystemError or MemoryError. A .pyc in a vLLM tree is untrusted (anyone who could write the
tree could plant it), and the stale-bytecode check runs in `status`, `verify`, `install` and
in the guard of every vLLM process. So m3fuse never hands a .pyc's body to `marshal.loads`.

Instead this module walks the marshal stream itself, in pure Python, and writes a canonical
byte string of what it describes: every value and every field of every code object (argument
counts, co_stacksize, flags, bytecode, constants, names, local names *and their kinds*,
qualified name, first line, line and exception tables), recursively; only co_filename is left
out (a .pyc compiled elsewhere names another path). What marshal writes differently for the
same value is normalised: reference flags and back-references (they depend on reference
counts), interned vs plain and ASCII vs UTF-8 string codes, small vs big integer codes, set
order (it follows string hashing, which is randomised per process). Two streams with equal
canonical forms unmarshal to code objects equal in every field `compile` sets.

The walk is bounded: it reads each input byte once, a container may declare no more items
than there are bytes left (every item takes at least one), nesting stops at MAX_DEPTH, and the
output stops at `budget` bytes (the caller passes the size of the trusted side's canonical
form, so a stream of back-references cannot blow up). Anything it cannot follow raises Bad:
the caller reports such a .pyc instead of skipping it.

The stream layout of a code object is the running interpreter's (a .pyc is only judged when
its magic number is this interpreter's): Python 3.11+ and 3.8-3.10 are known.
"""

from __future__ import annotations

import struct
import sys

MAX_DEPTH = 200  # real code nests code -> consts -> code ... a few tens of levels at most
_FLAG_REF = 0x80


class Bad(Exception):
    """The stream is not marshalled data this walk can follow (or is past a bound)."""


class OverBudget(Bad):
    """The canonical form grew past `budget`: it cannot equal the form it is compared with."""


def _code_layout() -> tuple[int, tuple[str, ...]]:
    """(number of leading int32 fields, then the fields in stream order: 'o' an object,
    'f' co_filename (read, not part of the canonical form), 'l' an int32)."""
    if sys.version_info >= (3, 11):
        # argcount, posonlyargcount, kwonlyargcount, stacksize, flags; code, consts, names,
        # localsplusnames, localspluskinds, filename, name, qualname, firstlineno, linetable,
        # exceptiontable (Python/marshal.c, w_object's code branch).
        return 5, ("o", "o", "o", "o", "o", "f", "o", "o", "l", "o", "o")
    # argcount, posonlyargcount, kwonlyargcount, nlocals, stacksize, flags; code, consts, names,
    # varnames, freevars, cellvars, filename, name, firstlineno, lnotab/linetable.
    return 6, ("o", "o", "o", "o", "o", "o", "f", "o", "l", "o")


_LAYOUT = _code_layout()


class _Walk:
    def __init__(self, data: bytes, budget: int | None, copies: int | None) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.out = bytearray()
        self.budget = budget
        self.copies = copies  # bytes that back-references may still copy
        self.refs: list[bytes | None] = []

    # ------------------------------------------------------------------ input
    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise Bad(f"truncated at byte {self.pos}")
        b = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return b

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise Bad(f"truncated at byte {self.pos}")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def int32(self) -> int:
        return struct.unpack("<i", self.take(4))[0]

    def count(self, per_item: int = 1) -> int:
        """A declared length, refused when the bytes left cannot hold that many items."""
        n = self.int32()
        if n < 0 or n * per_item > len(self.data) - self.pos:
            raise Bad(f"declares {n} items with {len(self.data) - self.pos} bytes left")
        return n

    # ------------------------------------------------------------------ output
    def emit(self, b: bytes) -> None:
        self.out += b
        if self.budget is not None and len(self.out) > self.budget:
            raise OverBudget("larger than the code it is compared with")

    def emit_int(self, value: int) -> None:
        self.emit(b"i%d;" % value)

    def emit_str(self, value: str) -> None:
        try:
            raw = value.encode("utf-8", "surrogatepass")
        except UnicodeEncodeError:  # pragma: no cover - surrogatepass encodes every str
            raise Bad("a string that cannot be encoded") from None
        self.emit(b"u%d;" % len(raw) + raw)

    # ------------------------------------------------------------------ objects
    def obj(self, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise Bad(f"nested deeper than {MAX_DEPTH} levels")
        code = self.byte()
        flag, t = code & _FLAG_REF, chr(code & ~_FLAG_REF)
        if t == "r":
            idx = self.int32()
            if not 0 <= idx < len(self.refs) or self.refs[idx] is None:
                raise Bad(f"back-reference {idx} to nothing (or to an object still being read)")
            b = self.refs[idx]
            if self.copies is not None:
                self.copies -= len(b)
                if self.copies < 0:
                    raise Bad("back-references copy far more than the code it is compared with holds")
            self.emit(b)
            return
        slot = None
        if flag:
            slot = len(self.refs)
            self.refs.append(None)
        start = len(self.out)
        self._value(t, depth)
        if slot is not None:
            self.refs[slot] = bytes(self.out[start:])

    def _value(self, t: str, depth: int) -> None:
        if t in "NTFS.":  # None, True, False, StopIteration, Ellipsis
            self.emit(t.encode())
        elif t == "i":
            self.emit_int(self.int32())
        elif t == "I":  # int64 (older writers)
            self.emit_int(struct.unpack("<q", self.take(8))[0])
        elif t == "l":
            self._long()
        elif t == "g":
            self.emit(b"g" + self.take(8))
        elif t == "y":
            self.emit(b"y" + self.take(16))
        elif t == "f":
            self.emit(b"g" + struct.pack("<d", self._text_float()))
        elif t == "x":
            re_, im = self._text_float(), self._text_float()
            self.emit(b"y" + struct.pack("<dd", re_, im))
        elif t == "s":
            n = self.count()
            self.emit(b"s%d;" % n + self.take(n))
        elif t in "tu":
            n = self.count()
            try:
                self.emit_str(self.take(n).decode("utf-8", "surrogatepass"))
            except UnicodeDecodeError:
                raise Bad("a string that is not UTF-8") from None
        elif t in "aA":
            self.emit_str(self.take(self.count()).decode("latin-1"))
        elif t in "zZ":
            self.emit_str(self.take(self.byte()).decode("latin-1"))
        elif t in "([":
            n = self.count()
            self._items(t, n, depth)
        elif t == ")":
            self._items("(", self.byte(), depth)
        elif t in "<>":
            self._set(t, self.count(), depth)
        elif t == "{":
            self.emit(b"{")
            while True:
                if self.pos < len(self.data) and self.data[self.pos] & ~_FLAG_REF == ord("0"):  # NULL ends it
                    self.pos += 1
                    break
                self.obj(depth + 1)
                self.obj(depth + 1)
            self.emit(b"}")
        elif t == ":":  # slice (marshal version 5, Python 3.14)
            self.emit(b":")
            for _ in range(3):
                self.obj(depth + 1)
        elif t == "c":
            self._code(depth)
        else:
            raise Bad(f"type code {t!r} at byte {self.pos - 1}")

    def _long(self) -> None:
        n = self.int32()
        size = abs(n)
        if size * 2 > len(self.data) - self.pos:
            raise Bad(f"an integer of {size} digits with {len(self.data) - self.pos} bytes left")
        raw = self.take(size * 2)
        digits = struct.unpack(f"<{size}H", raw)
        if any(d >= 1 << 15 for d in digits) or (digits and digits[-1] == 0):
            raise Bad("an integer with a digit out of range or unnormalised")
        if size <= 8:  # small: by value, whatever code wrote it
            value = sum(d << (15 * i) for i, d in enumerate(digits))
            self.emit_int(-value if n < 0 else value)
        else:  # normalised digits are unique per value
            self.emit(b"l%d;" % n + raw)

    def _text_float(self) -> float:
        text = self.take(self.byte())
        try:
            return float(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise Bad("a float that is not a number") from None

    def _items(self, t: str, n: int, depth: int) -> None:
        self.emit(b"%s%d;" % (t.encode(), n))
        for _ in range(n):
            self.obj(depth + 1)

    def _set(self, t: str, n: int, depth: int) -> None:
        # Set order follows hashing: the items' canonical forms are sorted.
        start = len(self.out)
        spans = []
        for _ in range(n):
            a = len(self.out)
            self.obj(depth + 1)
            spans.append(bytes(self.out[a:]))
        del self.out[start:]
        self.emit(b"%s%d;" % (t.encode(), n) + b"".join(sorted(spans)))

    def _code(self, depth: int) -> None:
        ints, fields = _LAYOUT
        self.emit(b"c")
        for _ in range(ints):
            self.emit_int(self.int32())
        for kind in fields:
            if kind == "l":
                self.emit_int(self.int32())
            elif kind == "o":
                self.obj(depth + 1)
            else:  # co_filename: read (it may be referenced later), then dropped; not counted
                at, budget = len(self.out), self.budget  # against the budget (its length is the path's)
                self.budget = None
                try:
                    self.obj(depth + 1)
                finally:
                    self.budget = budget
                del self.out[at:]


def canonical(data: bytes, budget: int | None = None, *, whole: bool = False) -> bytes:
    """The canonical form of the one marshalled object at the start of `data` (what follows it
    is ignored, as marshal.loads ignores it; with `whole`, Bad unless it is all of `data`: a
    check that this interpreter's layout is the one known here). Bad when it cannot be followed
    or passes `budget` bytes; back-references may copy at most 16 times `budget` bytes in all."""
    w = _Walk(data, budget, None if budget is None else 16 * budget + (1 << 16))
    w.obj(0)
    if whole and w.pos != len(data):
        raise Bad(f"{len(data) - w.pos} bytes left after the object")
    return bytes(w.out)
