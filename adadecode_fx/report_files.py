"""Writing a report as JSON and, when asked, as a PNG plot (matplotlib is optional: the `bench` extra)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Callable

PLOT_EXTRA_HINT = "pip install 'adadecode-fx[bench]'  (or: pip install matplotlib)"


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_report(rep: dict, json_path=None, png_path=None, *, plot: Callable[[dict, Path], None]) -> None:
    """The JSON always comes first, so a missing plotting library never costs the measured numbers."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rep, indent=1))
    if not png_path:
        return
    if not have_matplotlib():
        print(f"no plot written to {png_path}: matplotlib is not installed; {PLOT_EXTRA_HINT}", file=sys.stderr)
        return
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    plot(rep, Path(png_path))
