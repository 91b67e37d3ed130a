"""Text corpora for exit-head training (``adadecode train-heads --corpus``), as fixed-length token windows.

The teacher of self-distillation is the final layer's distribution, which exists at every position of
any text, not only of the model's own continuations; so heads can learn from as much text as there is,
teacher-forced, at the cost of one forward pass per token and no generation. Corpora that every machine
has offline: the Python sources of the standard library (``python-stdlib``) and of the installed
packages (``python-packages``), or any path, glob or ``.jsonl`` file.

Files are read in an order shuffled by the seed (so a budget smaller than the corpus samples all of
it, not the alphabetically first package) until the budget is filled; documents are tokenized, joined
with the tokenizer's EOS, and cut into windows of ``window`` tokens. Nothing here writes a file: every
error is raised before training writes anything.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import math
import random
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdaDecodeError

TEXT_FIELDS = ("text", "prompt", "question", "document", "content")  # first string field found wins
IDS_FIELD = "input_ids"   # pre-tokenized records: token ids for the model's own tokenizer
_SNIFF = 8192             # a NUL byte in the first 8 KiB marks a binary file
_JSONL = (".jsonl", ".jsonl.gz")


def _python_files(key: str):
    """Python sources under a sysconfig path (the standard library without its site-packages)."""
    root = Path(sysconfig.get_paths()[key])
    return root, [p for p in sorted(root.rglob("*.py"))
                  if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)]


NAMED = {"python-stdlib": "stdlib", "python-packages": "purelib"}  # --corpus NAME -> sysconfig path

HELP = ("text to distil on, teacher-forced (repeatable): python-stdlib | python-packages (the .py files of "
        "this Python's standard library / installed packages) | a file | a directory (every file under it) | "
        "a glob such as '/usr/lib/python3*/**/*.py' | a .jsonl file whose records have a string field "
        f"{', '.join(repr(f) for f in TEXT_FIELDS)} (the first one present is used) or '{IDS_FIELD}' "
        "(ids from this model's tokenizer). Binary and empty files are skipped and counted")


@dataclass
class Corpus:
    windows: list          # list[list[int]], each ``window`` tokens long
    record: dict           # what the heads' metadata keeps: sources, counts, a digest of the ids


def corpus_files(specs) -> list[Path]:
    """The files ``specs`` name, in order, without repeats; an error for a spec that names none."""
    files, seen = [], set()
    for spec in specs:
        spec = str(spec)
        if spec in NAMED:
            root, matched = _python_files(NAMED[spec])
            if not matched:
                raise AdaDecodeError(f"--corpus {spec}: no .py files under {root}")
        elif glob.has_magic(spec):
            matched = sorted(Path(p) for p in glob.glob(str(Path(spec).expanduser()), recursive=True)
                             if Path(p).is_file())
            if not matched:
                raise AdaDecodeError(f"--corpus {spec!r}: the glob matches no files (quote it so the shell "
                                     "does not expand it; '**' matches across directories)")
        else:
            path = Path(spec).expanduser()
            if path.is_file():
                matched = [path]
            elif path.is_dir():
                matched = sorted(p for p in path.rglob("*") if p.is_file())
                if not matched:
                    raise AdaDecodeError(f"--corpus {spec!r}: the directory holds no files")
            else:
                raise AdaDecodeError(f"--corpus {spec!r}: no such file or directory (give a path, a glob, a "
                                     f".jsonl file, or one of {', '.join(NAMED)})")
        for p in matched:
            if p not in seen:
                seen.add(p)
                files.append(p)
    return files


def read_corpus(specs, tokenizer, vocab_size: int, budget: int, window: int, seed: int = 0,
                progress: bool = True, log=None) -> Corpus:
    """``ceil(budget / window)`` windows of ``window`` token ids from the files ``specs`` name.

    Errors (`AdaDecodeError`) for: a spec naming no file, no usable text, fewer tokens than the budget
    (the message says how many there are), a ``.jsonl`` record without a text field, and token ids
    outside the model's vocabulary (a corpus or tokenizer made for another model)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise AdaDecodeError(f"--corpus-tokens must be a positive integer, got {budget!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise AdaDecodeError(f"--corpus-window must be an integer >= 2, got {window!r}")
    files = corpus_files(specs)
    order = list(files)
    random.Random(seed).shuffle(order)
    n_windows = math.ceil(budget / window)
    need = n_windows * window
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    stats = Counter()
    fields: Counter = Counter()
    used: list[Path] = []
    windows: list[list[int]] = []
    buf: list[int] = []
    bar = _bar(need, progress)
    try:
        for path in order:
            if len(windows) >= n_windows:
                break
            stats["files_read"] += 1
            docs = _documents(path, tokenizer, vocab_size, stats, fields)
            if docs:
                used.append(path)
            for ids in docs:
                buf.extend(ids)
                if eos is not None:
                    buf.append(int(eos))
            take = min(n_windows - len(windows), len(buf) // window)
            windows.extend(buf[i * window:(i + 1) * window] for i in range(take))
            buf = buf[take * window:]
            bar.update(take * window)
    finally:
        bar.close()
    skipped = f"{stats['binary']} binary or not UTF-8 and {stats['empty']} empty skipped"
    if not used:
        raise AdaDecodeError(f"--corpus {' '.join(map(str, specs))}: no usable text in {len(files)} file(s) "
                             f"({skipped})")
    if len(windows) < n_windows:
        found = len(windows) * window + len(buf)
        raise AdaDecodeError(
            f"--corpus {' '.join(map(str, specs))} holds {found:,} tokens ({len(windows)} whole windows of "
            f"{window}) in {len(used)} usable file(s) of {len(files)} ({skipped}), fewer than --corpus-tokens "
            f"{budget:,}: lower --corpus-tokens to at most {len(windows) * window:,} or add text")
    digest = hashlib.sha256()
    for w in windows:
        digest.update(json.dumps(w).encode())
    record = {"specs": [str(s) for s in specs], "files_matched": len(files), "files_read": stats["files_read"],
              "files_used": len(used), "skipped_binary": stats["binary"], "skipped_empty": stats["empty"],
              "text_fields": dict(fields), "window": window, "windows": len(windows), "tokens": need,
              "tokens_requested": budget, "seed": seed, "ids_sha256": digest.hexdigest(),
              "files_sample": [str(p) for p in used[:20]]}
    (log or (lambda m: None))(f"corpus: {need:,} tokens in {len(windows)} windows of {window} from {len(used)} "
                              f"of {len(files)} files ({stats['files_read']} read; {skipped})")
    return Corpus(windows, record)


def _documents(path: Path, tokenizer, vocab_size: int, stats: Counter, fields: Counter) -> list[list[int]]:
    """Token ids of each document in one file; [] (counted in ``stats``) for a binary or empty file."""
    raw = path.read_bytes()
    if str(path).endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError):
            stats["binary"] += 1
            return []
    if not raw.strip():
        stats["empty"] += 1
        return []
    if b"\0" in raw[:_SNIFF]:
        stats["binary"] += 1
        return []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        stats["binary"] += 1
        return []
    if not str(path).endswith(_JSONL):
        fields["(whole file)"] += 1
        return [_tokenize(text, tokenizer, vocab_size, path)]
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AdaDecodeError(f"{where} is not valid JSON ({exc.msg})") from None
        if isinstance(rec, dict) and IDS_FIELD in rec:
            docs.append(_check_ids(rec[IDS_FIELD], vocab_size, where))
            fields[IDS_FIELD] += 1
            continue
        field = next((f for f in TEXT_FIELDS if isinstance(rec, dict) and isinstance(rec.get(f), str)), None)
        if field is None:
            keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise AdaDecodeError(f"{where}: no text field in this corpus record (it has {keys}); each line must "
                                 f"be a JSON object with a string field {' / '.join(TEXT_FIELDS)} or "
                                 f"'{IDS_FIELD}' (token ids for this model's tokenizer)")
        if rec[field].strip():
            docs.append(_tokenize(rec[field], tokenizer, vocab_size, where))
            fields[field] += 1
    if not docs:
        stats["empty"] += 1
    return docs


def _tokenize(text: str, tokenizer, vocab_size: int, where) -> list[int]:
    if tokenizer is None:
        raise AdaDecodeError(f"{where}: a text corpus needs the model's tokenizer (the model was loaded without "
                             f"one); give '{IDS_FIELD}' records instead")
    # verbose=False: whole files are longer than the model's context on purpose; they are cut into windows
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise AdaDecodeError(f"{where}: the tokenizer gives id {bad[0]}, outside the model's vocabulary "
                             f"(0..{vocab_size - 1}): this tokenizer belongs to another model")
    return ids


def _check_ids(ids, vocab_size: int, where) -> list[int]:
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise AdaDecodeError(f"{where}: '{IDS_FIELD}' must be a list of integers")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise AdaDecodeError(f"{where}: token id {max(bad, key=abs)} is outside this model's vocabulary "
                             f"(0..{vocab_size - 1}): this corpus was tokenized for another tokenizer; give "
                             f"its text (a {TEXT_FIELDS[0]!r} field) or ids from this model's tokenizer")
    return ids


class _NoBar:
    def update(self, *a): ...
    def close(self): ...


def _bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="corpus", unit="tok", unit_scale=True)


__all__ = ["HELP", "NAMED", "TEXT_FIELDS", "Corpus", "corpus_files", "read_corpus"]
