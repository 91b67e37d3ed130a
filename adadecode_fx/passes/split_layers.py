"""split_layers: cut a captured decoder graph at decoder-layer boundaries.

Expects: a flat FX graph (from `adadecode_fx.capture` or a dynamo/export graph) whose nodes carry
``meta["nn_module_stack"]``; weights may be ``get_attr`` nodes or placeholders.
Returns: a GraphModule whose graph calls, in order, ``prologue`` (embeddings, positions, masks),
``layer_0`` ... ``layer_{L-1}`` (one per decoder layer) and ``epilogue`` (final norm + LM head).
Every segment returns a tuple; ``get_attr`` weights are copied into the segment that reads them.

The decoder layers are found from the graph alone: the module path prefix with the most numbered
children of one class (``model.layers.N``, ``transformer.h.N``, ``gpt_neox.layers.N``...).
"""
from __future__ import annotations

import operator
import re
from collections import defaultdict

import torch
from torch import fx, nn

from ..errors import UnsupportedModelError
from .settings import PassSettings

NUMBERED = re.compile(r"^(.*)\.(\d+)$")


def _stack(node):
    return list((node.meta.get("nn_module_stack") or {}).values())


def find_layer_prefix(graph: fx.Graph) -> tuple[str, int]:
    """Return (module path prefix of the decoder layer list, number of layers)."""
    indices: dict[str, set[int]] = defaultdict(set)
    types: dict[str, set[str]] = defaultdict(set)
    for node in graph.nodes:
        for path, cls in _stack(node):
            m = NUMBERED.match(str(path))
            if m:
                indices[m.group(1)].add(int(m.group(2)))
                types[m.group(1)].add(str(cls))
    candidates = [(len(ix), p) for p, ix in indices.items() if len(types[p]) == 1 and ix == set(range(len(ix)))]
    if not candidates:
        raise UnsupportedModelError(
            "could not find repeated decoder layers in the captured graph (no numbered module list of one "
            "class in nn_module_stack); capture with torch.export or dynamo so nodes keep their module stack")
    count, prefix = max(candidates)
    return prefix, count


def layer_of(node, prefix: str) -> int | None:
    pat = re.compile(re.escape(prefix) + r"\.(\d+)$")
    for path, _ in reversed(_stack(node)):
        m = pat.match(str(path))
        if m:
            return int(m.group(1))
    return None


def assign_partitions(graph: fx.Graph, prefix: str, num_layers: int) -> dict[fx.Node, int]:
    """Partition ids: 0 = prologue, 1 + i = layer i, num_layers + 1 = epilogue. -1 = top level."""
    tagged = {}
    for node in graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            i = layer_of(node, prefix)
            if i is not None:
                tagged[node] = 1 + i
    if not tagged:
        raise UnsupportedModelError("no graph node belongs to a decoder layer")
    order = list(graph.nodes)
    last_layer_pos = max(k for k, n in enumerate(order) if n in tagged)
    part: dict[fx.Node, int] = {}
    pending = []  # untagged compute nodes waiting for the next tagged node
    current = 0
    for k, node in enumerate(order):
        if node.op in ("placeholder", "output", "get_attr"):
            part[node] = -1
            continue
        if node in tagged:
            pid = tagged[node]
            if pid < current:
                raise UnsupportedModelError(
                    f"decoder layers interleave in the graph (node {node.name} of layer {pid - 1} after layer "
                    f"{current - 1}); the graph cannot be cut into sequential layer segments")
            for p in pending:
                part[p] = pid if current > 0 else 0
            pending.clear()
            current = pid
            part[node] = pid
        elif k > last_layer_pos:
            part[node] = num_layers + 1
        elif current == 0:
            part[node] = 0
        else:
            pending.append(node)
    _hoist_shared(graph, part, num_layers)
    return part


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


def _hoist_shared(graph: fx.Graph, part: dict, num_layers: int) -> None:
    """Move to the prologue what a layer computes from the prologue's values alone (no weight, K/V or
    hidden state of its own) when another layer reads it too. DeepSeek-V2 and Llama 4 move their rotary
    table to the device inside the first layer's attention, and the capture hands every later layer that
    first layer's node; the prologue, which every layer reads, computes it instead."""
    free: set[fx.Node] = set()
    for node in graph.nodes:
        if not 1 <= part.get(node, -1) <= num_layers or node.op != "call_function" or _mutates(node):
            continue
        inputs = node.all_input_nodes
        if inputs and all(part.get(i) == 0 or i in free
                          or (i.op == "placeholder" and not str(i.target).startswith("kv_")) for i in inputs):
            free.add(node)
    shared = [n for n in free if any(part.get(u, -1) not in (part[n], -1) for u in n.users)]
    while shared:
        node = shared.pop()
        if part[node] != 0:
            part[node] = 0
            shared.extend(i for i in node.all_input_nodes if i in free)


def split_layers(gm: fx.GraphModule, settings: PassSettings) -> fx.GraphModule:
    prefix, num_layers = find_layer_prefix(gm.graph)
    part = assign_partitions(gm.graph, prefix, num_layers)
    names = ["prologue"] + [f"layer_{i}" for i in range(num_layers)] + ["epilogue"]
    nodes_of = defaultdict(list)
    for node in gm.graph.nodes:
        if part[node] >= 0:
            nodes_of[part[node]].append(node)

    # outputs of each partition: values used by a later partition or by the graph output
    used_later: dict[int, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        for inp in node.all_input_nodes:
            pid = part[inp]  # where the value is defined (-1: top-level placeholder or weight)
            if pid >= 0 and (node.op == "output" or part[node] != pid) and inp not in used_later[pid]:
                used_later[pid].append(inp)

    top = fx.Graph()
    top_env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            top_env[node] = top.placeholder(node.name)
            top_env[node].meta = dict(node.meta)
    root = nn.Module()
    for pid, name in enumerate(names):
        sub_graph = fx.Graph()
        sub_root = nn.Module()
        env: dict[fx.Node, fx.Node] = {}
        inputs: list[fx.Node] = []

        def load(n, env=env, sub_graph=sub_graph, sub_root=sub_root, inputs=inputs, pid=pid):
            if n in env:
                return env[n]
            if n.op == "get_attr":
                value = fetch_attr(gm, n.target)
                if isinstance(value, nn.Parameter):
                    sub_root.register_parameter(n.target, value)
                elif isinstance(value, torch.Tensor):
                    sub_root.register_buffer(n.target, value, persistent=False)
                else:
                    setattr(sub_root, n.target, value)
                env[n] = sub_graph.get_attr(n.target)
            else:
                env[n] = sub_graph.placeholder(n.name)
                inputs.append(n)
            env[n].meta = dict(n.meta)
            return env[n]

        # placeholders first (FX wants them at the top), then get_attr and compute nodes in order
        for node in nodes_of[pid]:
            for inp in node.all_input_nodes:
                if inp not in env and inp.op != "get_attr" and part[inp] != pid:
                    load(inp)
        for node in nodes_of[pid]:
            for inp in node.all_input_nodes:
                if inp not in env and inp.op == "get_attr":
                    load(inp)
            env[node] = sub_graph.node_copy(node, lambda n: env[n])
        outs = used_later[pid]
        sub_graph.output(tuple(env[o] for o in outs))
        sub = fx.GraphModule(sub_root, sub_graph, class_name=name)
        root.add_module(name, sub)
        call = top.call_module(name, tuple(top_env[i] for i in inputs))
        call.meta["segment"] = name
        for k, o in enumerate(outs):
            g = top.call_function(operator.getitem, (call, k))
            g.meta = dict(o.meta)
            top_env[o] = g
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    top.output(torch.fx.map_arg(out_node.args[0], lambda n: top_env[n]))
    result = fx.GraphModule(root, top)
    result.meta.update(gm.meta)
    result.meta.update(num_layers=num_layers, layer_prefix=prefix, segments=names)
    return result


def fetch_attr(module, target: str):
    """The object a ``get_attr`` node's dotted ``target`` names on ``module``."""
    return operator.attrgetter(target)(module)


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A new graph of the same nodes with their own meta dicts. The values in them (fake tensors) are
    shared, not deep-copied: a deep copy of a layer's fake values costs ~10 ms, and nothing mutates them."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        env[node] = new.node_copy(node, lambda n: env[n])
    return new


def segment_calls(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.target: n for n in gm.graph.nodes if n.op == "call_module"}


def rewrite_layer_nodes(gm: fx.GraphModule, rewrite) -> fx.GraphModule:
    """Call ``rewrite(node, layer) -> bool`` (True: it changed the node) on every node of every layer
    segment (``layer``: the decoder layer's index), and regenerate the code of the segments it changed."""
    for name in segment_calls(gm):
        if name.startswith("layer_"):
            sub, layer = getattr(gm, name), int(name.removeprefix("layer_"))
            changed = [rewrite(node, layer) for node in list(sub.graph.nodes)]  # every node, not up to the first
            if any(changed):
                sub.recompile()
    return gm
