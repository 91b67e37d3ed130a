"""The segments of a static program (backend ``cudagraphs``) and what its graphs must know about them.

`static_segment` rewrites a segment for fixed shapes: attention as one SDPA call per block over the whole
static capacity, experts as one grouped call, no metadata asserts. The others read a program's graphs:
which prologue outputs are only attention masks (made additive once per run), whether the layers read the
token ids beyond the embeddings (Gemma 4's per-layer inputs), and which layers read values back to the
host (which a CUDA graph cannot capture).
"""
from __future__ import annotations

import torch
from torch import fx

from ..ops.attention import SDPA, plain_attention
from ..ops.experts import fallback_op, plain_experts
from .eager import private_copy

_ASSERTS = (torch.ops.aten._assert_tensor_metadata.default,)


def static_segment(gm):
    """A private copy of a segment with attention as one SDPA call per block (and experts as one grouped
    call), and no metadata asserts (checks of what the capture fixed; inside a graph they only cost a
    launch at capture)."""
    if not isinstance(gm, fx.GraphModule):
        return gm
    gm = private_copy(gm)
    plain_attention(gm.graph)
    plain_experts(gm.graph)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def sdpa_mask_outputs(program) -> dict:
    """The prologue outputs that every layer uses only as an SDPA call's ``attn_mask``, by index, with the
    dtype of the queries they mask. SDPA turns a boolean mask into an additive one of that dtype on every
    call, in every layer: three small kernels each time, which a run does once for all its layers
    instead (`StaticRunner._body`). Outputs whose query dtype is unknown or differs between layers are
    left to SDPA."""
    def query_dtype(node, use):
        mask = use.args[3] if len(use.args) > 3 else use.kwargs.get("attn_mask")
        if use.op != "call_function" or use.target is not SDPA or mask is not node or node in use.args[:3]:
            return None
        val = getattr(use.args[0], "meta", {}).get("val")
        return getattr(val, "dtype", None)

    dtypes: dict = {}
    for fn, recipe in zip(program.layer_fns, program.layer_recipes):
        if not isinstance(fn, fx.GraphModule):
            return {}
        placeholders = [n for n in fn.graph.nodes if n.op == "placeholder"]
        for node, item in zip(placeholders, recipe):
            if item[0] in ("shared", "positional") and item[1][0] == "pro":
                found = {query_dtype(node, use) for use in node.users} or {None}
                dtypes.setdefault(item[1][1], set()).update(found)
    return {i: d.pop() for i, d in dtypes.items() if len(d) == 1 and None not in d}


def layers_read_token_ids(program) -> bool:
    """Whether a prologue output that the layers read, other than the embeddings, depends on the token ids
    (Gemma 3n / Gemma 4's per-layer inputs): then a run past layer 0 must hand the prologue its rows' real
    ids, not placeholders. Shapes alone (``sym_size``) do not count."""
    gm = program.prologue_fn
    if not isinstance(gm, fx.GraphModule) or "input_ids" not in program.prologue_args:
        return False
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"][program.prologue_args.index("input_ids")]
    reached, todo = set(), [ph]
    while todo:
        node = todo.pop()
        for user in node.users:
            if user not in reached and user.target is not torch.ops.aten.sym_size.int:
                reached.add(user)
                todo.append(user)
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    read = {item[1][1] for recipe in program.layer_recipes for item in recipe
            if item[0] in ("positional", "shared") and item[1][0] == "pro"}
    return any(i != program.embedding_index and i in read and outputs[i] in reached for i in range(len(outputs)))


def host_reading_layers(program) -> list[str]:
    """Layers that read device values back to the host, which a CUDA graph cannot capture: transformers'
    grouped-matmul fallback (its MoE experts where ``aten::_grouped_mm`` does not take the dtype, float32)
    reads the group sizes back to loop over them."""
    op = fallback_op()
    return [f"layer_{i}" for i, f in enumerate(program.layer_fns)
            if op is not None and isinstance(f, fx.GraphModule) and any(n.target is op for n in f.graph.nodes)]
