"""Lowering: run a `DecodeProgram`'s segments somewhere other than eager PyTorch.

A lowering returns a new program (`DecodeProgram.replace`) whose segment callables (``prologue_fn``,
``layer_fns[i]``, ``epilogue_fn``, ``probe_fns[l]``) are compiled ones with the *same call signature*,
so the decode loop never knows which backend runs. Every lowering has the signature
``(program, config) -> program`` and leaves the program it is given as it was.

- ``eager``: `adadecode_fx.lower.eager` (the FX segments, custom ops called as plain functions).
- ``inductor``: `adadecode_fx.lower.inductor` (torch.compile per segment, shared across identical layers).
- ``onnxruntime``: `adadecode_fx.lower.onnxrt` (segments exported to ONNX, run by ORT sessions).
- ``tensorrt``: `adadecode_fx.lower.tensorrt` (torch-tensorrt; needs CUDA).
- ``cudagraphs``: `adadecode_fx.lower.cudagraphs` (static K/V, runs of layers as CUDA graphs per block
  length; uncaptured on a CPU). It also fills the program's ``runner`` (`DecodeProgram.run_layers`).
"""
from __future__ import annotations

import importlib

from ..errors import AdaDecodeError


# backend -> (module, function); imported on use, so a missing optional package only matters when chosen
LOWERINGS = {"eager": ("eager", "lower_eager"), "inductor": ("inductor", "lower_inductor"),
             "onnxruntime": ("onnxrt", "lower_onnxruntime"), "tensorrt": ("tensorrt", "lower_tensorrt"),
             "cudagraphs": ("cudagraphs", "lower_cudagraphs")}


def lower(program, config):
    """``program`` lowered for ``config.backend`` (a new program; the given one is left as it was)."""
    if config.backend not in LOWERINGS:
        raise AdaDecodeError(f"unknown backend {config.backend!r}: choose one of {', '.join(LOWERINGS)}")
    module, function = LOWERINGS[config.backend]
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)(program, config)


__all__ = ["LOWERINGS", "lower"]
