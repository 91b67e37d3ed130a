"""explicit_kv: check and label the per-layer K/V state of a split graph.

Expects: the output of `split_layers` over a graph captured by `adadecode_fx.capture`, whose top-level
inputs include ``kv_{i}_0`` (keys) and ``kv_{i}_1`` (values) per layer ``i``: static buffers
``[1, H, S, D]`` that a layer writes in place at ``cache_position`` and then attends over.
Returns: the same module; every K/V placeholder inside ``layer_i`` gets ``meta["role"] = ("kv", i, j)``,
and ``gm.meta["kv_writes"][i]`` names the ops that write them. Raises if a layer reads another layer's
K/V or never writes its own (then deferring that layer would lose state), except for the layers that
`shared_kv` made read a producer's buffers under their own name: those must not write them.

The buffers stay plain tensors, so the same segments can be lowered to inductor, ONNX (after
functionalisation each write becomes a returned ``present`` tensor) or TensorRT.
"""
from __future__ import annotations

import torch
from torch import fx

from ..capture import KV_NAME
from ..errors import UnsupportedModelError
from .split_layers import segment_calls
from .settings import PassSettings

WRITES = {torch.ops.aten.index_copy_.default, torch.ops.aten.index_put_.default, torch.ops.aten.copy_.default}


def explicit_kv(gm: fx.GraphModule, settings: PassSettings) -> fx.GraphModule:
    calls = segment_calls(gm)
    writes = {}
    # layers that read another layer's buffers under their own name (`shared_kv`) write nothing
    readers = {l for l, s in enumerate(gm.meta.get("kv_sources") or ()) if s != l}
    for name, call in calls.items():
        sub = getattr(gm, name)
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        for arg, ph in zip(call.args, placeholders):
            m = KV_NAME.match(getattr(arg, "name", ""))
            if not m:
                continue
            layer, kind = int(m.group(1)), int(m.group(2))
            if name == "prologue":
                # the prologue may read a buffer's length (mask width); it must not touch the data
                if any(u.target is not torch.ops.aten.sym_size.int for u in ph.users):
                    raise UnsupportedModelError(f"the graph reads K/V buffer {arg.name} outside its layer")
                ph.meta["role"] = ("kv_size",)
                continue
            if name != f"layer_{layer}":
                raise UnsupportedModelError(
                    f"segment {name} reads the K/V of layer {layer}, not as a layer that shares an earlier layer's "
                    "K/V does (`shared_kv`); this model is not supported")
            ops = [u for u in ph.users if u.target in WRITES and u.args[0] is ph]
            if layer in readers:
                if ops:
                    raise UnsupportedModelError(f"layer {layer} writes the K/V buffer it shares with another layer")
                ph.meta["role"] = ("kv", layer, kind)
                continue
            if not ops:
                raise UnsupportedModelError(f"layer {layer} never writes its K/V buffer {arg.name}")
            ph.meta["role"] = ("kv", layer, kind)
            writes.setdefault(layer, []).extend(u.name for u in ops)
    if len(writes) + len(readers) != gm.meta["num_layers"]:
        missing = sorted(set(range(gm.meta["num_layers"])) - set(writes) - readers)
        raise UnsupportedModelError(f"layers {missing} keep no K/V state of their own in the captured graph, nor "
                                    "read an earlier layer's as `shared_kv` hands it to them")
    gm.meta["kv_writes"] = writes
    return gm
