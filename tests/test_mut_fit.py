"""Whether an AITER/FlyDSL build meets a release's needs (m3fuse/wheels/fit.py), rule by rule: the
tests that kill its mutants (`make mutation MODULE=m3fuse/wheels/fit.py`).

The builds are real wheels and real installed trees made by tests/wheelkit.py (the shape of
AITER's custom_all_reduce.py); the lock facts are read through the real lock parser."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import wheelkit
from conftest import REPO
from m3fuse import pysource
from m3fuse.wheels import fit
from m3fuse.wheels.check import AITER_CAR
from m3fuse.wheels.fit import Provides, api_of, from_lock, from_tree, judge, wheel_facts
from m3fuse.wheels.lock import LockError, parse_lock
from m3fuse.wheels.needs import AITER, FLYDSL, DistNeeds, Needs

CAR_HEAD = "class CustomAllreduce:\n"


# ----------------------------------------------------------------------------- api_of
def test_api_of_lists_every_kind_of_parameter_and_marks_kwargs():
    src = (CAR_HEAD + "    def a(self, p, /, q, *args, r, s=1, **kw):\n        pass\n"
           "    async def b(self, *, t):\n        pass\n    def c(self):\n        pass\n    x = 1\n"
           "    class Inner:\n        def d(self):\n            pass\n")
    assert api_of(src) == {"CustomAllreduce.a": ("self", "p", "q", "r", "s", "**"),
                           "CustomAllreduce.b": ("self", "t"), "CustomAllreduce.c": ("self",)}


def test_api_of_without_the_class_or_unparseable():
    assert api_of("class Other:\n    def a(self):\n        pass\n") == {}
    assert api_of("def (:\n") is None
    # A nested CustomAllreduce counts (ast.walk), as AITER defines it at module level or in a guard.
    assert api_of("if True:\n    " + CAR_HEAD.replace("\n", "\n        ") + "def a(self):\n            pass\n") \
        == {"CustomAllreduce.a": ("self",)}


# ----------------------------------------------------------------------------- judge
def need(**kw) -> DistNeeds:
    return DistNeeds(**kw)


def test_kwargs_accept_any_keyword():
    prov = Provides("0.1.15", "t", {}, {"CustomAllreduce.f": ("self", "**")})
    v = judge(need(calls={"CustomAllreduce.f": ("use_1stage", "gemma_norm")}), prov, dist=AITER, vllm="0.34.0")
    assert v.ok and v.unmet == [] and v.unknown == []
    prov = Provides("0.1.15", "t", {}, {"CustomAllreduce.f": ("self", "use_1stage")})
    v = judge(need(calls={"CustomAllreduce.f": ("use_1stage", "gemma_norm", "eps")}), prov, dist=AITER, vllm="0.34.0")
    assert not v.ok and v.unmet == ["its CustomAllreduce.f takes no gemma_norm, eps (vLLM 0.34.0 passes it)"]


def test_kwargs_from_a_real_source_meet_a_call():
    src = wheelkit.aiter_source(use_1stage=False).replace("        registered: bool = False,\n", "        **kwargs,\n")
    api = api_of(src)
    assert api["CustomAllreduce.fused_ar_rms"][-1] == "**"
    v = judge(need(calls={"CustomAllreduce.fused_ar_rms": ("registered", "anything")}),
              Provides("1", "t", {}, api), dist=AITER, vllm="x")
    assert v.ok


def test_a_missing_method_and_unknown_api():
    n = need(calls={"CustomAllreduce.g": ("a",)})
    v = judge(n, Provides("1", "t", {}, {}), dist=AITER, vllm="0.33.0")
    assert v.unmet == ["it has no CustomAllreduce.g (vLLM 0.33.0 calls it)"] and v.unknown == []
    v = judge(n, Provides("1", "t", {}, None), dist=AITER, vllm="0.33.0")
    assert v.ok and v.unknown == ["CustomAllreduce.g"]
    v = judge(need(calls={"CustomAllreduce.g": ("a",), "CustomAllreduce.h": ()}),
              Provides("1", "t", {}, None), dist=AITER, vllm="0.33.0")
    assert v.unknown == ["CustomAllreduce.g", "CustomAllreduce.h"]


def test_modules():
    n = need(modules=("a.b", "c", "d"))
    v = judge(n, Provides("1", "t", {"a.b": True, "c": False}, {}), dist=AITER, vllm="0.30.0")
    assert v.unmet == ["it has no module c (vLLM 0.30.0's M3 model imports it)"] and v.unknown == ["module d"]
    v = judge(n, Provides("1", "t", None, {}), dist=AITER, vllm="0.30.0")
    assert v.unmet == [] and v.unknown == ["module a.b", "module c", "module d"]


@pytest.mark.parametrize("have,ok", [("0.1.15", True), ("0.1.14", False), ("0.1.15.post1", True), ("0.1.16", True),
                                     ("0.1.15rc1", False)])
def test_min_version(have, ok):
    n = need(min_version="0.1.15", min_version_source="vllm/x.py:3")
    v = judge(n, Provides(have, "t"), dist=AITER, vllm="0.34.0")
    assert v.ok is ok
    if not ok:
        assert v.unmet == ["it is older than 0.1.15, the AITER vLLM 0.34.0's sources say they were built against "
                           "(vllm/x.py:3)"]


@pytest.mark.parametrize("have", [None, "", "not-a-version"])
def test_an_unreadable_version_is_unmet_when_a_minimum_is_named(have):
    v = judge(need(min_version="0.1.15", min_version_source="s:1"), Provides(have, "t"), dist=AITER, vllm="0.34.0")
    assert v.unmet == [f"its version {have!r} cannot be compared with 0.1.15, the AITER vLLM 0.34.0's sources name "
                       f"(s:1)"]
    assert judge(need(), Provides(have, "t"), dist=AITER, vllm="0.34.0").ok


def test_content_problems_count_even_without_needs():
    prov = Provides("1", "t", content_problems=["p1", "p2"])
    assert judge(None, prov, dist=AITER, vllm="x").unmet == ["p1", "p2"]
    assert not judge(None, prov, dist=AITER, vllm="x").ok
    assert judge(need(modules=("m",)), Provides("1", "t", {"m": False}, content_problems=["p"]), dist=AITER,
                 vllm="x").unmet[0] == "p"
    assert judge(None, Provides("1", "t"), dist=AITER, vllm="x").ok


def test_needs_helpers():
    d = need(modules=("a", "b"))
    n = Needs(None, ("0.33.0", "0.34.0"), {AITER: d})
    assert fit.needs_of(n, AITER) is d and fit.needs_of(n, FLYDSL) is None and fit.needs_of(None, AITER) is None
    assert fit.wanted(n, AITER) == ("a", "b") and fit.wanted(n, FLYDSL) == () and fit.wanted(None, AITER) == ()
    assert fit.release_name(n) == "0.33.0/0.34.0"
    assert fit.release_name(Needs(None, (), {}), "fb") == "fb" and fit.release_name(None) == "this release"


# ----------------------------------------------------------------------------- from_lock
def pkg(tool: str, version: str = "0.1.15") -> object:
    text = (f'lock-version = "1.0"\ncreated-by = "t"\n[[packages]]\nname = "amd-aiter"\nversion = "{version}"\n'
            f"{tool}\n[[packages.wheels]]\nname = \"amd_aiter-{version}-py3-none-any.whl\"\n"
            f'url = "https://e.invalid/a.whl"\nhashes = {{ sha256 = "{"a" * 64}" }}\n')
    return parse_lock(text, Path("/l/wheels.lock"), spec=False).packages[0]


def test_from_lock_reads_valid_facts():
    p = pkg('[packages.tool.m3fuse]\nversion = "0.1.15.0"\nsource = "ROCm/aiter v0.1.15"\n'
            'modules = { "a.b" = true, c = false }\napi = { "CustomAllreduce.f" = ["self", "x"] }\n')
    prov = from_lock(p, Path("/l/wheels.lock"))
    assert prov == Provides("0.1.15", "pinned in wheels.lock (ROCm/aiter v0.1.15)", {"a.b": True, "c": False},
                            {"CustomAllreduce.f": ("self", "x")})
    prov = from_lock(pkg('[packages.tool.m3fuse]\nversion = "0.1.15"\nsource = "s"\n'), Path("/l/w"))
    assert prov.modules == {} and prov.api == {}


def test_from_lock_without_facts_or_for_another_version():
    assert from_lock(pkg(""), Path("/l")) is None
    assert from_lock(pkg('[packages.tool.other]\nx = 1\n'), Path("/l")) is None
    assert from_lock(pkg('[packages.tool.m3fuse]\nversion = "0.1.14"\nsource = "s"\n'), Path("/l")) is None


@pytest.mark.parametrize("tool,problem", [
    ("[packages.tool]\nm3fuse = 3\n", "it is not a table"),
    ('[packages.tool.m3fuse]\nsource = "s"\n', "version None is not a PEP 440 version"),
    ('[packages.tool.m3fuse]\nversion = 1\nsource = "s"\n', "version 1 is not a PEP 440 version"),
    ('[packages.tool.m3fuse]\nversion = "x y"\nsource = "s"\n', "version 'x y' is not a PEP 440 version"),
    ('[packages.tool.m3fuse]\nversion = "0.1.15"\nsource = "s"\nmodules = 3\n', "modules must be a table"),
    ('[packages.tool.m3fuse]\nversion = "0.1.15"\nsource = "s"\nmodules = { a = 1 }\n', "modules must be a table"),
    ('[packages.tool.m3fuse]\nversion = "0.1.15"\nsource = "s"\napi = 3\n', "api must be a table"),
    ('[packages.tool.m3fuse]\nversion = "0.1.15"\nsource = "s"\napi = { f = "x" }\n', "api must be a table"),
    ('[packages.tool.m3fuse]\nversion = "0.1.15"\nsource = "s"\napi = { f = [1] }\n', "api must be a table"),
    ('[packages.tool.m3fuse]\nversion = "0.1.15"\n', "source (where these facts were read) is missing"),
    ('[packages.tool.m3fuse]\nversion = "0.1.15"\nsource = ""\n', "source (where these facts were read) is missing"),
])
def test_from_lock_refuses_malformed_facts(tool, problem):
    with pytest.raises(LockError) as exc:
        from_lock(pkg(tool), Path("/l/wheels.lock"))
    e = exc.value
    assert e.headline == ("/l/wheels.lock: package amd-aiter, [packages.tool.m3fuse] is malformed; nothing was "
                          "downloaded or installed")
    assert e.details == (("file", "/l/wheels.lock"), ("problem", e.details[1][1]))
    assert e.details[1][1].startswith(problem), e.details[1][1]


# ----------------------------------------------------------------------------- from_tree
def test_from_tree_finds_modules_in_every_form(tmp_path):
    root = tmp_path / "sp"
    (root / "aiter" / "ops").mkdir(parents=True)
    (root / "aiter" / "mod.py").write_text("")
    (root / "aiter" / "pkg").mkdir()
    (root / "aiter" / "pkg" / "__init__.py").write_text("")
    (root / "aiter" / "ext.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (root / "aiter" / "notso.txt").write_text("")
    wanted = ("aiter.mod", "aiter.pkg", "aiter.ops", "aiter.ext", "aiter.notso", "aiter.none", "nodir.x")
    prov = from_tree(root, "0.1.15", FLYDSL, wanted)
    assert prov.modules == {"aiter.mod": True, "aiter.pkg": True, "aiter.ops": True, "aiter.ext": True,
                            "aiter.notso": False, "aiter.none": False, "nodir.x": False}
    assert prov.api is None and prov.content_problems == [] and prov.version == "0.1.15"
    assert prov.source == f"installed in {root}"


def test_from_tree_reads_aiters_api_and_content(tmp_path):
    root = tmp_path / "sp"
    (root / AITER_CAR).parent.mkdir(parents=True)
    (root / AITER_CAR).write_text(wheelkit.aiter_source())
    prov = from_tree(root, "0.1.15", AITER, ())
    assert prov.api["CustomAllreduce.fused_ar_rms"][-1] == "use_1stage" and prov.content_problems == []
    (root / AITER_CAR).write_text(wheelkit.aiter_source(use_1stage=False, pool=False))
    prov = from_tree(root, "0.1.15", AITER, ())
    assert len(prov.content_problems) == 2 and "use_1stage" in prov.content_problems[0]
    (root / AITER_CAR).write_text("def (:\n")
    prov = from_tree(root, "0.1.15", AITER, ())
    assert prov.api == {} and "does not parse" in prov.content_problems[0]


def test_from_tree_reports_an_unreadable_aiter_source(tmp_path):
    root = tmp_path / "sp"
    prov = from_tree(root, "0.1.15", AITER, ())
    assert prov.api == {} and len(prov.content_problems) == 1
    assert prov.content_problems[0].startswith(f"{AITER_CAR} cannot be read (")
    (root / AITER_CAR).parent.mkdir(parents=True)
    (root / AITER_CAR).write_bytes(b"\xff\xfe")
    prov = from_tree(root, "0.1.15", AITER, ())
    assert prov.api == {} and "cannot be read" in prov.content_problems[0]
    with open(root / AITER_CAR, "wb") as f:
        f.truncate(fit.MAX_SOURCE + 1)
    prov = from_tree(root, "0.1.15", AITER, ())
    assert prov.api == {} and "cannot be read" in prov.content_problems[0]
    src = wheelkit.aiter_source().encode()
    (root / AITER_CAR).write_bytes(src + b"#" * (fit.MAX_SOURCE - len(src)))
    assert from_tree(root, "0.1.15", AITER, ()).content_problems == []


# ----------------------------------------------------------------------------- wheel_facts
def test_wheel_facts_of_an_aiter_wheel(tmp_path):
    mods = wheelkit.needed_modules("vllm-0.34.0")
    whl = wheelkit.aiter_build(tmp_path, "0.1.19", mods[:-1] if mods else [])
    facts = wheel_facts(whl, "AMD_Aiter", "0.1.19", "f" * 64, REPO / "patches")
    assert facts["version"] == "0.1.19"
    assert facts["source"] == f"wheel {whl.name} (sha256 {'f' * 64}), read by m3fuse lock add"
    assert set(facts["api"]) == {"CustomAllreduce.fused_ar_rms", "CustomAllreduce.custom_fused_ar_rms",
                                 "CustomAllreduce.all_gather_unreg"}
    assert facts["api"]["CustomAllreduce.custom_fused_ar_rms"][-1] == "gemma_norm"
    assert all(isinstance(v, list) for v in facts["api"].values())
    from m3fuse.wheels.needs import known_modules

    known = known_modules(REPO / "patches", AITER)
    assert set(facts["modules"]) == set(known)
    if mods:
        assert facts["modules"][mods[-1]] is (mods[-1] in mods[:-1] or any(m.startswith(mods[-1] + ".") for m in mods[:-1]))
        assert all(facts["modules"][m] for m in mods[:-1])


def test_wheel_facts_module_forms_in_a_wheel(tmp_path):
    from m3fuse.wheels.needs import known_modules

    known = known_modules(REPO / "patches", AITER)
    assert known, "the shipped sets need AITER modules"
    m = next(m for m in known if "." in m)
    rel = m.replace(".", "/")
    base = {"aiter/__init__.py": "", AITER_CAR: wheelkit.aiter_source()}
    for files, want in [({f"{rel}.py": ""}, True), ({f"{rel}/__init__.py": ""}, True), ({f"{rel}/x/y.py": ""}, True),
                        ({f"{rel}/y.py": ""}, True),  # a namespace folder holding one plain module
                        ({f"{rel}.cpython-311-x86_64-linux-gnu.so": ""}, True), ({f"{rel}.so.txt": ""}, False),
                        ({f"{rel}.x/y.so": ""}, False), ({f"{rel}x.py": ""}, False), ({}, False)]:
        whl = wheelkit.build_wheel(tmp_path / str(len(list(tmp_path.iterdir()))), "amd-aiter", "1.0", {**base, **files})
        assert wheel_facts(whl, AITER, "1.0", "0" * 64, REPO / "patches")["modules"][m] is want, files


def test_wheel_facts_of_an_aiter_wheel_without_the_module(tmp_path):
    whl = wheelkit.aiter_wheel(tmp_path, "1.0", include_module=False)
    assert wheel_facts(whl, AITER, "1.0", "0" * 64, REPO / "patches")["api"] == {}


def test_wheel_facts_of_a_distribution_no_set_needs(tmp_path):
    whl = wheelkit.build_wheel(tmp_path, "other", "1.0")
    assert wheel_facts(whl, "other", "1.0", "0" * 64, REPO / "patches") is None
    # AITER is always described, even with no set needing a module of it.
    empty = tmp_path / "nopatches"
    empty.mkdir()
    facts = wheel_facts(wheelkit.aiter_wheel(tmp_path / "a", "1.0"), AITER, "1.0", "0" * 64, empty)
    assert facts["modules"] == {} and "CustomAllreduce.fused_ar_rms" in facts["api"]
    assert "api" not in (wheel_facts(wheelkit.build_wheel(tmp_path / "f", "flydsl", "1.0"), FLYDSL, "1.0", "0" * 64,
                                     REPO / "patches") or {"x": 1})


def test_constants():
    # The AITER source bound is the bounded parser's (issue 25, V3): 1 MiB, ~17x the real file.
    assert fit.TOOL == "m3fuse" and fit.MAX_SOURCE == pysource.MAX_PARSE == 1 << 20


def test_every_call_is_judged_after_a_missing_method_or_a_kwargs_method():
    api = {"CustomAllreduce.kw": ("self", "**"), "CustomAllreduce.h": ("self", "a")}
    calls = {"CustomAllreduce.gone": ("a",), "CustomAllreduce.kw": ("z",), "CustomAllreduce.h": ("a", "b")}
    v = judge(need(calls=calls), Provides("1", "t", {}, api), dist=AITER, vllm="0.34.0")
    assert v.unmet == ["it has no CustomAllreduce.gone (vLLM 0.34.0 calls it)",
                       "its CustomAllreduce.h takes no b (vLLM 0.34.0 passes it)"]


def test_a_top_level_namespace_folder_is_a_module_and_a_bare_file_is_not(tmp_path):
    """`aiter` with no `aiter/__init__.py`, only files two folders down: the folder itself is
    there (a namespace package). A member named exactly like a module, without `.py`, is not it."""
    whl = wheelkit.build_wheel(tmp_path / "a", "amd-aiter", "1.0", {"aiter/x/y.py": ""})
    assert wheel_facts(whl, AITER, "1.0", "0" * 64, REPO / "patches")["modules"]["aiter"] is True
    m = "aiter.ops.shuffle"
    whl = wheelkit.build_wheel(tmp_path / "b", "amd-aiter", "1.0", {"aiter/__init__.py": "", "aiter/ops/shuffle": ""})
    assert wheel_facts(whl, AITER, "1.0", "0" * 64, REPO / "patches")["modules"][m] is False


def test_from_tree_names_why_the_aiter_source_was_not_read(tmp_path):
    root = tmp_path / "sp"
    (root / AITER_CAR).parent.mkdir(parents=True)
    os.mkfifo(root / AITER_CAR)  # a FIFO is never opened: a read would block
    prov = from_tree(root, "0.1.15", AITER, ())
    assert prov.api == {}
    assert prov.content_problems == [f"{AITER_CAR} cannot be read ({root / AITER_CAR} is a FIFO, not a regular file)"]
    (root / AITER_CAR).unlink()
    (root / AITER_CAR).write_bytes(b"\xff\xfe")
    assert from_tree(root, "0.1.15", AITER, ()).content_problems == [
        f"{AITER_CAR} cannot be read ({root / AITER_CAR} is not UTF-8 text (byte 0 is b'\\xff'))"]
    other = tmp_path / "sp2"
    other.mkdir()
    (other / "aiter").write_text("a file where the package folder belongs")
    prov = from_tree(other, "0.1.15", AITER, ())
    assert prov.api == {} and prov.content_problems == [f"{AITER_CAR} cannot be read (NotADirectoryError: Not a directory)"]


def test_wheel_facts_refuses_an_aiter_source_that_is_not_utf8(tmp_path):
    from m3fuse.wheels.check import WheelCheckError

    whl = wheelkit.build_wheel(tmp_path, "amd-aiter", "1.0", {"aiter/__init__.py": "", AITER_CAR: b"x = 1\n\xff\n"})
    with pytest.raises(WheelCheckError) as exc:
        wheel_facts(whl, AITER, "1.0", "0" * 64, REPO / "patches")
    assert exc.value.headline == f"the wheel {whl.name} failed the AITER API check; nothing was installed"
    assert ("problem", f"{AITER_CAR} is not UTF-8 text (byte 6 is b'\\xff')") in exc.value.details
