"""shared_kv: give each layer that attends over another layer's K/V a K/V input of its own.

Expects: a graph captured by `adadecode_fx.capture` (before `split_layers`), whose ``kv_{i}_{j}``
placeholders are the K/V buffers of the layers that write K/V. In a model that shares K/V across layers
(``num_kv_shared_layers``: Gemma 3n, Gemma 4 E2B/E4B) the last layers compute no keys or values: they
attend over what an earlier layer of the same kind wrote, which the capture hands them as that layer's
``index_copy_`` into its buffer.
Returns: where there is such a read, a copy of the graph in which each reading layer ``l`` takes
placeholders ``kv_{l}_0`` / ``kv_{l}_1`` instead (the producer's buffers, handed in again under the
reader's name), so every layer reads K/V only through inputs of its own and `split_layers` cuts no K/V
edge between layers. ``gm.meta["kv_sources"][l]`` is the layer whose buffer layer ``l`` reads (``l``
itself where it writes its own), and ``gm.meta["kv_shapes"]`` gets an entry per decoder layer (a reader
gets its producer's): `KVState` makes one buffer per writing layer and hands a reader its producer's.
Without such a read the graph is returned as it is.

Deferral holds for a reader: a row that reaches it has passed its producer, as has every earlier row,
so the keys it reads are there; rollback moves the reader's fill length like any other layer's.
"""
from __future__ import annotations

import torch
from torch import fx

from ..capture import KV_NAME
from ..errors import UnsupportedModelError
from .settings import PassSettings
from .split_layers import copy_graph, find_layer_prefix, layer_of

_WRITE = torch.ops.aten.index_copy_.default


def _cross_reads(graph: fx.Graph, prefix: str) -> list[tuple[fx.Node, fx.Node, int, int, int]]:
    """(reading node, producer's write, reader layer, producer layer, K or V) for every read of an earlier
    layer's K/V. A read of a later one's (a module run again deeper, as HRM's loops do) is not sharing:
    `split_layers` refuses that graph, whose layers interleave."""
    found = []
    for write in graph.nodes:
        m = KV_NAME.match(getattr(write.args[0], "name", "")) if write.target is _WRITE else None
        if m is None:
            continue
        producer, kind = int(m.group(1)), int(m.group(2))
        for node in write.users:
            reader = layer_of(node, prefix) if node.op == "call_function" else None
            if reader is not None and reader > producer:
                found.append((node, write, reader, producer, kind))
    return found


def shared_kv(gm: fx.GraphModule, settings: PassSettings) -> fx.GraphModule:
    prefix, num_layers = find_layer_prefix(gm.graph)
    if not _cross_reads(gm.graph, prefix):
        return gm
    out = fx.GraphModule(gm, copy_graph(gm.graph))  # the captured graph may be cached: it stays as it was
    out.meta.update(gm.meta)
    graph = out.graph
    sources = list(range(num_layers))
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    taken, last_placeholder = {n.name for n in placeholders}, placeholders[-1]
    inputs: dict[tuple[int, int], fx.Node] = {}
    for node, write, reader, producer, kind in _cross_reads(graph, prefix):
        if sources[reader] not in (reader, producer):
            raise UnsupportedModelError(f"layer {reader} reads the K/V of layers {sources[reader]} and {producer}")
        key = (reader, kind)
        if key not in inputs and f"kv_{reader}_{kind}" in taken:
            raise UnsupportedModelError(f"layer {reader} writes K/V and also reads layer {producer}'s")
        sources[reader] = producer
        if key not in inputs:
            with graph.inserting_after(last_placeholder):
                inputs[key] = last_placeholder = graph.placeholder(f"kv_{reader}_{kind}")
            inputs[key].meta = dict(write.args[0].meta)
        node.replace_input_with(write, inputs[key])
    shapes = list(gm.meta["kv_shapes"])
    if len(shapes) + sum(s != i for i, s in enumerate(sources)) != num_layers:
        raise UnsupportedModelError(f"{len(shapes)} K/V buffers for {num_layers} layers, of which "
                                    f"{sum(s != i for i, s in enumerate(sources))} read another layer's")
    writers = [i for i, s in enumerate(sources) if s == i]
    own = dict(zip(writers, shapes))
    out.meta.update(kv_sources=sources, kv_shapes=[own[s] for s in sources], num_layers=num_layers)
    graph.lint()
    out.recompile()
    return out
