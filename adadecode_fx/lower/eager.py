"""Eager lowering: the FX segments as they are, with Python custom ops called as plain functions.

Why: `adadecode::row_exact_sdpa` is a custom op so that dynamo and exporters treat it as one opaque call.
Eager segments do not need that, and every call through the dispatcher into a Python kernel costs
~0.1 ms on a 2-core CPU (measured quiet, session 5), once per layer and step. Eager layers get
private copies that call the op's body directly; the shared segments keep the op for other lowerings.
"""
from __future__ import annotations

import copy

from torch import fx

from ..passes.row_exact_attention import ROW_EXACT, row_exact

# custom op -> the plain function with the same signature and result
_PLAIN = {ROW_EXACT: row_exact}


def private_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a segment that only the caller holds (weights stay shared). Segments are shared between
    decoders of one model, and every new decoder's ``recompile()`` regenerates their code, which would
    invalidate what a lowering did to them."""
    copy_ = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    copy_.meta.update(gm.meta)
    return copy_


def lower_eager(program, config):
    for i, layer in enumerate(program.layer_fns):
        if not isinstance(layer, fx.GraphModule) or not any(n.target in _PLAIN for n in layer.graph.nodes):
            continue
        layer = private_copy(layer)
        for node in layer.graph.nodes:
            if node.op == "call_function" and node.target in _PLAIN:
                node.target = _PLAIN[node.target]
        layer.recompile()
        program.layer_fns[i] = layer
    program.backend = "eager"
    return program
