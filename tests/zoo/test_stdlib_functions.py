"""HumanEval-shaped prompts from the standard library: what qualifies, where a prompt ends, the split."""
import pytest

from adadecode_fx.errors import AdaDecodeError
from adadecode_fx.zoo import data
from adadecode_fx.zoo.stdlib_functions import stdlib_function_prompts

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
