"""Lowering: run a `DecodeProgram`'s segments somewhere other than eager PyTorch.

A lowering swaps the program's segment callables (``prologue_fn``, ``layer_fns[i]``, ``epilogue_fn``,
``probe_fns[l]``) for compiled ones with the *same call signature*, so the decode loop never knows
which backend runs. Every lowering has the signature ``(program, config) -> program``.

- ``eager``: `adadecode_fx.lower.eager` (the FX segments, custom ops called as plain functions).
- ``inductor``: `adadecode_fx.lower.inductor` (torch.compile per segment, shared across identical layers).
- ``onnxruntime``: `adadecode_fx.lower.onnxrt` (segments exported to ONNX, run by ORT sessions).
- ``tensorrt``: `adadecode_fx.lower.tensorrt` (torch-tensorrt; needs CUDA).
"""
from __future__ import annotations

import torch

from ..errors import AdaDecodeError


def lower(program, config):
    """Lower ``program`` for ``config.backend``; returns the (possibly new) program."""
    backend = config.backend
    if backend == "eager":
        from .eager import lower_eager
        return lower_eager(program, config)
    if backend == "inductor":
        from .inductor import lower_inductor
        return lower_inductor(program, config)
    if backend == "onnxruntime":
        from .onnxrt import lower_onnxruntime
        return lower_onnxruntime(program, config)
    if backend == "tensorrt":
        from .tensorrt import lower_tensorrt
        return lower_tensorrt(program, config)
    raise AdaDecodeError(f"unknown backend {backend!r}")


@torch.no_grad()
def warm_up(program, kv_shapes, dtype, device, batch: int = 1) -> None:
    """Run every segment on each shape class a generation meets, so compilation happens here:
    (T=1, S=1) a one-token prefill, (T=1, S>1) a decode step, (T>1, S>1) a prefill or a deferred block.
    Without duck sizing, a prefill (T == S) shares the graph of a deferred block (T < S).
    ``batch > 1``: the same classes for a batch, and a prompt prefilled alone in row 1 of it (K/V views
    that start inside the buffers, see `KVState.row`)."""
    import torch.fx.experimental._config as fx_config

    from ..runtime.kv_state import KVState

    state = KVState(kv_shapes, 8, dtype, device, 1, pad=[0] * batch)
    with fx_config.patch(use_duck_shape=False):
        _run_shape_classes(program, state)
        if batch > 1:
            _run_shape_classes(program, state.row(1))


def _run_shape_classes(program, state) -> None:
    for ids, start in (([0], 0), ([0], 1), ([0, 0], 2)):
        kv = state.views(start + len(ids))
        top = program.top_inputs([ids] * state.batch, start, kv, state.mask(start + len(ids)))
        pro = program.prologue(top)
        hidden = program.embeddings(pro, len(ids))
        for i in range(program.num_layers):
            hidden = program.layer(i, hidden, pro, top, kv)
            if i in program.probe_fns and len(ids) == 1:
                program.probe(i, hidden[:, -1:])
        program.epilogue(hidden)


__all__ = ["lower", "warm_up"]
