"""Writing a report as JSON and, when asked, as a PNG plot (matplotlib is optional: the `bench` extra)."""
from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from typing import Callable

from .errors import AdaDecodeError

PLOT_EXTRA_HINT = "pip install 'adadecode-fx[bench]'  (or: pip install matplotlib)"


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def check_writable(path, flag: str, directory: bool = False) -> None:
    """Refuse, before a long run starts, an output ``path`` (a file, or a folder with ``directory``) that
    cannot be written: found at the end, the run's results would be lost. Writes nothing: the check is
    a temporary file in the nearest folder that exists, removed at once."""
    if not path:
        return
    target = Path(path)
    if not directory and target.is_dir():
        raise AdaDecodeError(f"{flag} {path} is a directory; give a file path such as {target / 'report.json'}")
    if directory and target.exists() and not target.is_dir():
        raise AdaDecodeError(f"{flag} {path} is a file; give a directory (it is created if missing)")
    existing = (target if directory else target.parent).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise AdaDecodeError(f"{flag} {path}: cannot write under {existing}, which is a file; give a path in a "
                             "writable directory")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".adadecode-write-check-"):
            pass
    except OSError as exc:
        raise AdaDecodeError(f"{flag} {path}: cannot write in {existing} ({exc.strerror or exc}); give a path in a "
                             "writable directory") from None


def write_report(rep: dict, json_path=None, png_path=None, *, plot: Callable[[dict, Path], None]) -> None:
    """The JSON always comes first, so a missing plotting library never costs the measured numbers. A JSON
    path that cannot be written after all (checked before the run, see `check_writable`) puts the report in
    the temporary directory instead, and the error says where."""
    if json_path:
        text = json.dumps(rep, indent=1)
        try:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(text)
        except OSError as exc:
            with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="adadecode-report-", delete=False) as f:
                f.write(text)
            raise AdaDecodeError(f"cannot write {json_path} ({exc.strerror or exc}); the report was saved to "
                                 f"{f.name} instead") from None
    if not png_path:
        return
    if not have_matplotlib():
        print(f"no plot written to {png_path}: matplotlib is not installed; {PLOT_EXTRA_HINT}", file=sys.stderr)
        return
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    plot(rep, Path(png_path))
