"""``adadecode export``: write a model's AdaDecode program to disk for a runtime without the torch model.

The program is built as for decoding (`adadecode_fx.build.build_program`, eager lowering), then
`adadecode_fx.lower.onnx_export.write_program` writes its segments; `adadecode_fx.lower.onnxrt.load_exported`
decodes from the directory alone.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from .build import build_program
from .config import AdaDecodeConfig
from .errors import AdaDecodeError
from .heads.format import model_fingerprint
from .lower.onnx_export import MANIFEST, write_program
from .lower.onnx_session import check_dtype, require_onnx


def export_onnx(model, heads=None, config=None, out_dir=None, log=None) -> Path:
    """Export ``model`` (+ exit ``heads``) as an AdaDecode program to ONNX in ``out_dir``; see module doc.

    ``config`` (an `AdaDecodeConfig`) fixes the exit layers, threshold and max_pending stored in the
    manifest (the defaults `load_exported` decodes with). Returns the directory.
    """
    require_onnx()
    if out_dir is None:
        raise AdaDecodeError("export_onnx needs out_dir: the directory to write the ONNX files to")
    check_dtype(model.get_input_embeddings().weight.dtype)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise AdaDecodeError(f"{out} exists and is not an adadecode ONNX export: choose an empty or new --out directory")
    program = build_program(model, heads, dataclasses.replace(config or AdaDecodeConfig(), backend="eager"))
    cfg = program.config
    eos = program.eos_token_id
    eos = [int(eos)] if isinstance(eos, int) else (None if eos is None else [int(e) for e in eos])
    meta = {"fingerprint": model_fingerprint(model), "eos_token_id": eos,
            "config": {"exit_layers": list(cfg.exit_layers), "threshold": cfg.threshold,
                       "max_pending": cfg.max_pending, "kv_bucket": cfg.kv_bucket, "dtype": cfg.dtype},
            "heads": None}
    if heads is not None:
        if (out / "heads").exists():
            shutil.rmtree(out / "heads")
        heads.save(out / "heads")
        meta["heads"] = "heads"
    write_program(program, out, meta, log=log)
    return out


__all__ = ["export_onnx"]
