"""deferred_batching: make every layer segment run on its own block of positions.

Expects: the output of `explicit_kv`. After a plain split, layer segments receive symbolic sizes
(the block length T, the KV width S) computed once in the prologue, so every layer would have to run
on the same T. AdaDecode needs layer ``l`` to process its own block: the early tokens still pending at
``l`` plus the current token, ``T_l`` rows, while another layer runs a different ``T``.
Returns: the same module where
- every SymInt input of a layer/epilogue segment is re-derived inside the segment from one of its own
  tensor inputs (``aten.sym_size``), and removed from the segment's signature;
- every remaining input of a layer segment is labelled in ``meta["role"]``:
  ``("residual",)`` the hidden state flowing layer to layer, ``("kv", i, j)``, ``("positional", dim)``
  a per-position tensor (mask rows, rotary cos/sin, cache_position) the runtime slices to the block's
  last ``T_l`` entries along ``dim``, or ``("shared",)`` used as is.
Raises if a layer consumes anything from an earlier layer other than the residual stream.
"""
from __future__ import annotations

import operator

import sympy
import torch
from torch import fx

from ..errors import UnsupportedModelError
from .split_layers import segment_calls
from .settings import PassSettings


def _expr(v):
    return v.node.expr if isinstance(v, torch.SymInt) else None


def _carrier(tensors: list, expr):
    """(placeholder, dim) of a tensor input whose size there is ``expr``, or None."""
    for t in tensors:
        for d, size in enumerate(t.meta["val"].shape):
            if _expr(size) == expr:
                return t, d
    return None


_ARITHMETIC = {sympy.Mul: operator.mul, sympy.Add: operator.add}


def _derive(graph: fx.Graph, tensors: list, expr):
    """An FX value computing the size ``expr`` from the segment's own tensor inputs: a size one of them
    carries, or a sum or product of such sizes and integers (an MoE layer's routed rows are
    ``batch x T x top_k``, computed once in the prologue). None if it cannot be derived."""
    if expr.is_Integer:
        return int(expr)
    source = _carrier(tensors, expr)
    if source is not None:
        node = graph.call_function(torch.ops.aten.sym_size.int, source)
        node.meta["val"] = source[0].meta["val"].shape[source[1]]
        return node
    op = _ARITHMETIC.get(type(expr))
    if op is None:
        return None
    parts = [_derive(graph, tensors, a) for a in expr.args]
    if any(p is None for p in parts):
        return None
    value = parts[0]
    for part in parts[1:]:
        vals = [v.meta["val"] if isinstance(v, fx.Node) else v for v in (value, part)]
        value = graph.call_function(op, (value, part))
        value.meta["val"] = op(*vals)
    return value


def _rebind_symints(sub: fx.GraphModule, call: fx.Node, top: fx.Graph) -> None:
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    tensors = [p for p in placeholders if isinstance(p.meta.get("val"), torch.Tensor)]
    keep_args = []
    for arg, ph in zip(call.args, placeholders):
        val = ph.meta.get("val")
        if not isinstance(val, torch.SymInt):
            keep_args.append(arg)
            continue
        body = next(n for n in sub.graph.nodes if n.op != "placeholder")
        with sub.graph.inserting_before(body):  # in order: a derived size's parts come before it
            size = _derive(sub.graph, tensors, _expr(val))
        if not isinstance(size, fx.Node):
            raise UnsupportedModelError(
                f"segment {call.target} uses size {val} that none of its own inputs carries")
        size.meta.update({k: v for k, v in ph.meta.items() if k != "val"})
        ph.replace_all_uses_with(size)
        sub.graph.erase_node(ph)
    call.args = tuple(keep_args)
    sub.recompile()


_SIZE_ARITHMETIC = (torch.ops.aten.sym_size.int, operator.mul, operator.add, operator.floordiv)


def _drop_unread_outputs(sub: fx.GraphModule, call: fx.Node, top: fx.Graph) -> None:
    """Drop the outputs beyond the residual stream that nothing reads any more: sizes a layer computed
    for the next one, which now derives them itself (`_rebind_symints`)."""
    if any(u.target is not operator.getitem for u in call.users):
        return
    out = next(n for n in sub.graph.nodes if n.op == "output")
    values = list(out.args[0])
    getitems = {u.args[1]: u for u in call.users}
    keep = [i for i in range(len(values)) if i == 0 or (i in getitems and getitems[i].users)]
    if len(keep) == len(values):
        return
    for i, g in getitems.items():
        if i in keep:
            g.args = (call, keep.index(i))
        else:
            top.erase_node(g)
    out.args = (tuple(values[i] for i in keep),)
    dead = [values[i] for i in range(len(values)) if i not in keep]
    while dead:  # the size arithmetic that only fed them
        node = dead.pop()
        if isinstance(node, fx.Node) and not node.users and node.target in _SIZE_ARITHMETIC:
            dead.extend(a for a in node.args if isinstance(a, fx.Node))
            sub.graph.erase_node(node)
    sub.recompile()


def _source(arg: fx.Node):
    """(segment name, output index) for a getitem of a segment call, else ("top", name)."""
    if arg.op == "call_function" and arg.target is operator.getitem and arg.args[0].op == "call_module":
        return arg.args[0].target, arg.args[1]
    return "top", arg.name


def _is_stream(arg: fx.Node, calls: dict, layer_out) -> bool:
    """Is this prologue output the hidden stream entering layer 0? It has the layer output's shape and
    dtype and feeds no other layer (masks and rotary tables feed many, and have other shapes)."""
    val = arg.meta.get("val")
    if not isinstance(val, torch.Tensor) or not isinstance(layer_out, torch.Tensor):
        return False
    same = val.dtype == layer_out.dtype and len(val.shape) == len(layer_out.shape) and all(
        _expr(a) == _expr(b) if isinstance(a, torch.SymInt) else a == b for a, b in zip(val.shape, layer_out.shape))
    others = [c for name, c in calls.items() if name.startswith("layer_") and name != "layer_0"]
    return same and not any(arg in c.args for c in others)


def deferred_batching(gm: fx.GraphModule, settings: PassSettings) -> fx.GraphModule:
    calls = segment_calls(gm)
    num_layers = gm.meta["num_layers"]
    for name, call in calls.items():
        if name != "prologue":
            _rebind_symints(getattr(gm, name), call, gm.graph)
    for name, call in calls.items():
        if name.startswith("layer_"):
            _drop_unread_outputs(getattr(gm, name), call, gm.graph)
    ids_shape = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "input_ids").meta["val"].shape
    T = _expr(ids_shape[1])
    gm.meta["block_symbol"] = str(T)
    gm.meta["batch_symbol"] = str(_expr(ids_shape[0]) or ids_shape[0])

    for i in range(num_layers):
        name = f"layer_{i}"
        sub, call = getattr(gm, name), calls[name]
        prev = "prologue" if i == 0 else f"layer_{i - 1}"
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        out_val = next(n for n in sub.graph.nodes if n.op == "output").args[0][0].meta.get("val")
        residual = []
        for arg, ph in zip(call.args, placeholders):
            if "role" in ph.meta:  # kv, labelled by explicit_kv
                continue
            seg, idx = _source(arg)
            val = ph.meta.get("val")
            pos_dims = [d for d, s in enumerate(getattr(val, "shape", ())) if _expr(s) == T]
            if seg == prev and (i > 0 or _is_stream(arg, calls, out_val)):
                residual.append(ph)
                ph.meta["role"] = ("residual",)
            elif seg.startswith("layer_"):
                raise UnsupportedModelError(
                    f"{name} reads a value produced by {seg} other than the residual stream; "
                    "cross-layer connections are not supported")
            elif len(pos_dims) > 1:
                raise UnsupportedModelError(f"{name} input {ph.name} has several position dims {pos_dims}")
            elif pos_dims:
                ph.meta["role"] = ("positional", pos_dims[0])
            else:
                ph.meta["role"] = ("shared",)
        if len(residual) != 1:
            raise UnsupportedModelError(
                f"{name} has {len(residual)} residual inputs; expected exactly one hidden-state stream")
        shape = getattr(residual[0].meta.get("val"), "shape", ())
        if len(shape) != 3 or _expr(shape[1]) != T:
            # the runtime cuts, parks and joins blocks of rows along dim 1 of a [batch, tokens, width] state
            raise UnsupportedModelError(
                f"the hidden state entering {name} has shape {list(shape)}, not [batch, tokens, width] (several "
                "residual streams, as Gemma 3n's AltUp keeps?); AdaDecode defers rows of one [batch, tokens, "
                "width] stream, so this model is not supported: decode it with model.generate")
        if len(placeholders) != len(call.args):
            raise AssertionError("segment signature and call site disagree")
    return gm
