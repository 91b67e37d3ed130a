"""HumanEval-style prompts cut from the running interpreter's standard library.

HumanEval gives a function's signature and docstring and scores the body the model writes. MBPP's prompts
are one-line task statements, and exit heads distilled on what a model writes after them agree far less
with the final layer on HumanEval than on MBPP (docs/heads.md). The standard library holds hundreds of
documented functions in the HumanEval shape, on every machine, under a licence that allows this use: each
prompt is one public top-level function up to the end of its docstring, and the model writes the rest.

Which functions there are depends on the Python version; the records name them (``stdlib-functions/<module>.
<name>``) so a run can be traced, and the order is a seeded shuffle of the sorted list, so that "the first n"
spans the library instead of its alphabetically first modules.
"""
from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path

from ..errors import AdaDecodeError

TASK = "stdlib-functions"
# packages that are tests, GUIs, demos or vendored copies: not code a user asks a model to write
_SKIP_TOP = {"test", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "venv", "site-packages",
             "dist-packages", "__pycache__", "pydoc_data"}
MIN_DOC_CHARS = 40   # shorter docstrings ("Return x.") say too little to write a body from
MIN_BODY_LINES = 3   # the continuation should have a real body to learn from
MAX_PROMPT_CHARS = 1500  # HumanEval's longest prompts are ~1,300 characters; longer ones pad whole batches


def _functions(path: Path, module: str) -> list[dict]:
    try:
        src = path.read_text(encoding="utf-8")
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
        out.append({"id": f"{TASK}/{module}.{node.name}", "prompt": prompt if prompt.endswith("\n") else prompt + "\n"})
    return out


def stdlib_function_prompts(root: Path | None = None) -> list[dict]:
    """Every qualifying function of the standard library at ``root`` (default: this interpreter's), as
    ``[{"id", "prompt"}, ...]`` in a seeded shuffle of their sorted order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise AdaDecodeError(f"the standard library was not found at {root}; use another --data source")
    records = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in _SKIP_TOP or "tests" in rel.parts:
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        records += _functions(path, module)
    if not records:
        raise AdaDecodeError(f"no documented public functions found under {root}; use another --data source")
    random.Random(0).shuffle(records)
    return records
