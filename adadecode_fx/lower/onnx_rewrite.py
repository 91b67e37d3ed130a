"""FX graph rewrites that make the decode segments exportable to ONNX (used by `onnx_export`).

K/V in the exported layers. The FX layer writes its new K/V rows into the K/V buffer *in place*
(``index_copy_`` at ``cache_position``); ONNX has no in-place update of a graph input, and the exporter
silently drops one. So before export each layer graph is rewritten (`present_kv_layer`):

- each K/V input is the *whole* K/V buffer of the generation (``[1, H, C, D]``, C = capacity), passed
  zero-copy; a ``kv_len`` input of shape ``[S]`` (only its length is read) says how much of it attention
  reads, as the view ``[:, :, :S]`` did;
- the write becomes the out-of-place ``index_copy`` that attention reads, and the rows written
  (``[1, H, T, D]``) are returned as extra outputs ``present_{i}_0`` / ``present_{i}_1``.

The ORT layer wrapper (`adadecode_fx.lower.onnxrt.OrtLayer`) then copies those T rows into the caller's
K/V views at the block's positions, so every layer callable behaves exactly like the FX segment (returns
``(hidden,)``, K/V updated in place) and the decode loop is unchanged. Returning only the new rows (not
the updated ``[1, H, S, D]`` buffer) keeps the copy-back O(T) instead of O(S) per layer.

The prologue gets the same treatment for its K/V inputs (`slim_prologue`): it only reads their length.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..errors import UnsupportedModelError
from ..ops import plain_attention, plain_experts, plain_linear

aten = torch.ops.aten


def node_role(node) -> tuple:
    return tuple(node.meta.get("role") or ("",))


def onnx_ready_copy(sub: fx.GraphModule) -> tuple[fx.Graph, tuple]:
    """The nodes of ``sub`` but its output, with the custom ops replaced by plain ATen; returns the graph and
    the values the output returned."""
    graph = fx.Graph()
    env: dict = {}
    out = graph.graph_copy(sub.graph, env)
    plain_experts(plain_linear(plain_attention(graph)))  # ONNX knows none of them; its engines run fp32
    return graph, (tuple(out) if isinstance(out, (tuple, list)) else (out,))


def present_kv_layer(sub: fx.GraphModule) -> tuple[fx.GraphModule, dict]:
    """The layer graph with its in-place K/V writes made out-of-place (see the module doc).

    Returns the new GraphModule (inputs: the layer's inputs, each K/V one now the whole buffer, plus
    ``kv_len``; outputs: ``(hidden, rows of K, rows of V)``) and ``info``: for each K/V input, its
    position in the layer's arguments, its kind j, and the argument position of the write index.
    """
    graph, outs = onnx_ready_copy(sub)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    kv = [p for p in placeholders if node_role(p)[0] == "kv"]
    if not kv:
        raise UnsupportedModelError("layer segment has no K/V inputs labelled by explicit_kv")
    with graph.inserting_after(placeholders[-1]):
        kv_len = graph.placeholder("kv_len")
    with graph.inserting_after(kv_len):
        s = graph.call_function(aten.sym_size.int, (kv_len, 0))
    rows, info = [], []
    cursor = s
    for ph in sorted(kv, key=lambda p: node_role(p)[2]):
        with graph.inserting_after(cursor):
            full_len = graph.call_function(aten.sym_size.int, (ph, 2))
        with graph.inserting_after(full_len):
            fits = graph.call_function(operator.le, (s, full_len))
        with graph.inserting_after(fits):
            check = graph.call_function(torch._check, (fits,))
        with graph.inserting_after(check):
            view = graph.call_function(aten.slice.Tensor, (ph, 2, 0, s))
        cursor = view
        ph.replace_all_uses_with(view, delete_user_cb=lambda u: u not in (view, full_len))
        writes = [u for u in view.users if u.op == "call_function" and u.args and u.args[0] is view
                  and u.target in (aten.index_copy_.default, aten.index_put_.default, aten.copy_.default)]
        if len(writes) != 1 or writes[0].target is not aten.index_copy_.default or writes[0].args[1] not in (2, -2):
            raise UnsupportedModelError(
                f"layer K/V input {ph.name} is written by {[w.target for w in writes]}; the ONNX export "
                "supports exactly one index_copy_ along the sequence dim (what adadecode_fx.capture produces)")
        write = writes[0]
        index = write.args[2]
        if index.op != "placeholder":
            raise UnsupportedModelError(f"the K/V write index of {ph.name} is computed inside the layer; "
                                        "expected the cache_position input")
        with graph.inserting_before(write):
            new = graph.call_function(aten.index_copy.default, tuple(write.args))
        order = {n: k for k, n in enumerate(graph.nodes)}
        for user in list(view.users):  # reads after the write see the written buffer
            if user is not write and user is not new and order[user] > order[write]:
                user.replace_input_with(view, new)
        rows.append(write.args[3])
        write.replace_all_uses_with(new)
        graph.erase_node(write)
        info.append({"arg": placeholders.index(ph), "kind": node_role(ph)[2], "index_arg": placeholders.index(index)})
    if any(not isinstance(r, fx.Node) for r in rows):
        raise AssertionError("lost a K/V write source")
    graph.output(tuple(outs) + tuple(rows))
    graph.eliminate_dead_code()
    gm = fx.GraphModule(sub, graph)
    gm.graph.lint()
    return gm, {"kv": info}


def slim_prologue(sub: fx.GraphModule, keep: list[int]) -> tuple[fx.GraphModule, dict]:
    """The prologue reading only the *length* of K/V (``kv_len [S]`` instead of a K/V buffer) and returning
    only the outputs in ``keep`` (layers never read its SymInt outputs; ONNX cannot return them)."""
    graph, outs = onnx_ready_copy(sub)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    sized = [p for p in placeholders if node_role(p)[0] == "kv_size"]
    info = {"kv_size_args": [placeholders.index(p) for p in sized]}
    if sized:
        with graph.inserting_before(sized[0]):
            kv_len = graph.placeholder("kv_len")
        ids = next(p for p in placeholders if p.name == "input_ids")
        for ph in sized:
            for user in list(ph.users):
                if user.target is not aten.sym_size.int or user.args[1] not in (0, 2, -2):
                    raise UnsupportedModelError(f"the prologue reads K/V buffer {ph.name} other than its sizes")
                user.args = (ids, 0) if user.args[1] == 0 else (kv_len, 0)  # batch size, or K/V length
            graph.erase_node(ph)
    graph.output(tuple(outs[k] for k in keep))
    graph.eliminate_dead_code()
    gm = fx.GraphModule(sub, graph)
    gm.graph.lint()
    return gm, info


__all__ = ["onnx_ready_copy", "node_role", "present_kv_layer", "slim_prologue"]
