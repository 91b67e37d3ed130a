"""HumanEval-shaped prompts cut from Python source on this machine: the standard library, and the packages
this project installs.

HumanEval gives a function's signature and docstring and scores the body the model writes. MBPP's prompts
are one-line task statements, and exit heads distilled on what a model writes after them agree far less
with the final layer on HumanEval than on MBPP (docs/heads.md). Python source holds thousands of documented
functions in the HumanEval shape, on every machine: each prompt is one public top-level function up to the
end of its docstring, and the model writes the rest.

- ``stdlib-functions``: the running interpreter's standard library (829 functions on Python 3.11.7).
- ``package-functions``: the packages that installing adadecode-fx brings (`PACKAGES`: torch, transformers
  and their dependencies; ~7,600 functions with torch 2.13 and transformers 5.24).

Which functions there are depends on the installed versions; the records name them (``<task>/<module>.
<name>``) so a run can be traced, and the order is a seeded shuffle of the sorted list, so that "the first n"
spans the whole source instead of its alphabetically first modules.
"""
from __future__ import annotations

import ast
import importlib.util
import random
import re
import sysconfig
from pathlib import Path

from ..errors import AdaDecodeError

STDLIB_FUNCTIONS = "stdlib-functions"
PACKAGE_FUNCTIONS = "package-functions"
# what `pip install adadecode-fx` brings (directly or through torch and transformers); test and plot extras
# are left out so that the set does not depend on how the package was installed
PACKAGES = ("torch", "transformers", "numpy", "sympy", "networkx", "huggingface_hub", "accelerate", "jinja2",
            "fsspec", "mpmath")
# packages that are tests, GUIs, demos or vendored copies: not code a user asks a model to write
_SKIP_DIRS = {"test", "tests", "testing", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "venv",
              "site-packages", "dist-packages", "__pycache__", "pydoc_data", "third_party", "_vendor"}
MIN_DOC_CHARS = 40   # shorter docstrings ("Return x.") say too little to write a body from
MIN_BODY_LINES = 3   # the continuation should have a real body to learn from
MAX_PROMPT_CHARS = 1500  # HumanEval's longest prompts are ~1,300 characters; longer ones pad whole batches
_PUBLIC_DEF = re.compile(r"^(?:async )?def [^_]", re.M)  # parsing is the cost: skip files without one


def _functions(path: Path, module: str, task: str) -> list[dict]:
    try:
        src = path.read_text(encoding="utf-8")
        if not _PUBLIC_DEF.search(src):
            return []
        tree = ast.parse(src)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = src.splitlines(keepends=True)
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < MIN_DOC_CHARS or len(node.body) < 2:
            continue
        doc_end = node.body[0].end_lineno
        if node.end_lineno - doc_end < MIN_BODY_LINES:
            continue
        start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        prompt = "".join(lines[start - 1:doc_end])
        if len(prompt) > MAX_PROMPT_CHARS:
            continue
        out.append({"id": f"{task}/{module}.{node.name}", "prompt": prompt if prompt.endswith("\n") else prompt + "\n"})
    return out


def _tree_functions(root: Path, task: str, prefix: str = "") -> list[dict]:
    records = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        module = ".".join((prefix, *rel.with_suffix("").parts) if prefix else rel.with_suffix("").parts)
        records += _functions(path, module.removesuffix(".__init__"), task)
    return records


def _shuffled(records: list[dict], where: str) -> list[dict]:
    if not records:
        raise AdaDecodeError(f"no documented public functions found under {where}; use another --data source")
    random.Random(0).shuffle(records)
    return records


def stdlib_function_prompts(root: Path | None = None) -> list[dict]:
    """Every qualifying function of the standard library at ``root`` (default: this interpreter's), as
    ``[{"id", "prompt"}, ...]`` in a seeded shuffle of their sorted order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise AdaDecodeError(f"the standard library was not found at {root}; use another --data source")
    return _shuffled(_tree_functions(root, STDLIB_FUNCTIONS), str(root))


def package_function_prompts(packages: tuple[str, ...] = PACKAGES) -> list[dict]:
    """Every qualifying function of the installed ``packages`` (located without importing them), as
    `stdlib_function_prompts` gives them; a package that is not installed is skipped."""
    records, found = [], []
    for name in packages:
        spec = importlib.util.find_spec(name)
        for root in (spec.submodule_search_locations or []) if spec else []:
            found.append(name)
            records += _tree_functions(Path(root), PACKAGE_FUNCTIONS, prefix=name)
    if not found:
        raise AdaDecodeError(f"none of {', '.join(packages)} is installed; use another --data source")
    return _shuffled(records, ", ".join(found))
