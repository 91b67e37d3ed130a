"""HumanEval-shaped prompts from Python source: what qualifies, where a prompt ends, the split, the packages."""
import importlib
import sys

import pytest

from adadecode_fx.errors import AdaDecodeError
from adadecode_fx.zoo import data
from adadecode_fx.zoo.python_functions import package_function_prompts, stdlib_function_prompts

MODULE = '''"""A module."""
import os


def documented(path, n=3):
    """Return the first n parts of path, split on the separator,
    dropping empty parts."""
    parts = path.split(os.sep)
    parts = [p for p in parts if p]
    return parts[:n]


@staticmethod
async def decorated(x):
    """An awaitable that doubles its argument, slowly and in three lines."""
    y = x
    y = y * 2
    return y


def _private(x):
    """Private helpers are not the public code a model is asked to write."""
    a = x
    b = a
    return b


def short_doc(x):
    """Too short."""
    a = x
    b = a
    return b


def short_body(x):
    """A docstring long enough to qualify, over a body that is too short."""
    return x


class Thing:
    def method(self):
        """Methods need their class around them, so they are left out here."""
        a = 1
        b = a
        return b
'''


def test_prompts_are_documented_public_functions_up_to_their_docstring(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text(MODULE)
    (tmp_path / "mod.py").write_text(MODULE)
    (tmp_path / "broken.py").write_text("def f(:\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_x.py").write_text(MODULE)
    recs = stdlib_function_prompts(tmp_path)
    assert sorted(r["id"] for r in recs) == sorted(f"stdlib-functions/{m}.{f}" for m in ("pkg", "mod")
                                                   for f in ("documented", "decorated"))
    doc = next(r["prompt"] for r in recs if r["id"].endswith("mod.documented"))
    assert doc.startswith("def documented(path, n=3):\n") and doc.endswith('dropping empty parts."""\n')
    assert "parts = " not in doc
    dec = next(r["prompt"] for r in recs if r["id"].endswith("mod.decorated"))
    assert dec.startswith("@staticmethod\nasync def decorated(x):")
    assert recs == stdlib_function_prompts(tmp_path)  # the shuffle is seeded


def test_a_library_without_functions_is_a_clear_error(tmp_path):
    with pytest.raises(AdaDecodeError, match="no documented public functions.*another --data"):
        stdlib_function_prompts(tmp_path)
    with pytest.raises(AdaDecodeError, match="not found"):
        stdlib_function_prompts(tmp_path / "missing")


def test_this_interpreters_library_splits_into_disjoint_halves():
    train, ev = (data.load_prompts("stdlib-functions", split=s) for s in ("train", "eval"))
    assert len(train) > 200 and len(ev) > 200
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in ev}
    assert all(r["prompt"].startswith(("def ", "async def ", "@")) and len(r["prompt"]) <= 1500 for r in train)
    records = data.prompt_sources(["stdlib-functions", "stdlib-functions:chat"], "train", n=2)
    assert [r["source"] for r in records] == ["stdlib-functions"] * 2 + ["stdlib-functions:chat"] * 2


def test_package_functions_come_from_the_named_installed_packages(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg_under_test"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "tests").mkdir()
    (pkg / "__init__.py").write_text(MODULE)
    (pkg / "sub" / "mod.py").write_text(MODULE)
    (pkg / "tests" / "helpers.py").write_text(MODULE)
    (pkg / "test_top.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    recs = package_function_prompts(("pkg_under_test", "no_such_package_here"))
    assert sorted(r["id"] for r in recs) == sorted(f"package-functions/pkg_under_test{m}.{f}" for m in ("", ".sub.mod")
                                                   for f in ("documented", "decorated"))
    assert "pkg_under_test" not in sys.modules  # located, never imported
    with pytest.raises(AdaDecodeError, match="none of no_such_package_here is installed.*another --data"):
        package_function_prompts(("no_such_package_here",))


@pytest.mark.parametrize("spec, parsed", [
    ("mbpp", ("mbpp", False, None)), ("gsm8k:chat", ("gsm8k", True, None)), ("mbpp:7", ("mbpp", False, 7)),
    ("gsm8k:chat:30", ("gsm8k", True, 30)), ("/data/p.jsonl", ("/data/p.jsonl", False, None)),
    ("C:/d/p.jsonl:chat:2", ("C:/d/p.jsonl", True, 2))])
def test_a_source_spec_names_task_chat_and_count(spec, parsed):
    assert data.parse_source(spec) == parsed


def test_a_count_per_source_replaces_n_for_that_source():
    records = data.prompt_sources(["mbpp:3", "mbpp"], "train", n=2)
    assert [r["source"] for r in records] == ["mbpp:3"] * 3 + ["mbpp"] * 2
    drawn = data.prompt_sources(["mbpp:3"], "eval", n=5, seed=1)
    assert [r["id"] for r in drawn] == [r["id"] for r in data.load_prompts("mbpp", n=3, split="eval", seed=1)]
    with pytest.raises(AdaDecodeError, match="at least 1"):
        data.prompt_sources(["mbpp:0"], "train", n=2)
