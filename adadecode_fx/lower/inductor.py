"""Inductor lowering: every segment through ``torch.compile``, one compiled graph per *kind* of layer.

Decoder layers are the same graph with different weights. We rewrite each layer segment so its weights
become leading graph inputs, group layers whose rewritten graphs are structurally equal, and compile
one template per group (gpt-fast style: the weights are arguments, the code is shared). SmolLM2's 30
layers and Qwen's 24 each compile once, not 30/24 times; Gemma-2's alternating sliding/full layers
give two templates.

Shapes: the block length T (1 for a plain step, more when deferred rows ride along or at prefill) and
the attended K/V length S are symbolic (``dynamic=True``); dynamo specialises size 1, so each template
compiles at most three times ((T, S) = (1, 1), (1, >1), (>1, >1)). `warm_up` runs them all, after which a generation triggers no
recompilation (tests assert this with dynamo's counters). K/V buffers are the runtime's static ones;
segments write them in place through the views they are given.
"""
from __future__ import annotations

import torch
from torch import fx

from ..passes.split_layers import fetch_attr
from .eager import private_copy


def structure_key(gm: fx.GraphModule) -> tuple:
    """A hashable description of ``gm``'s graph that ignores node names and weight values.

    Two layers with equal keys run the same computation on different weights."""
    index: dict[fx.Node, int] = {}
    items = []
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: ("%", index[n]))
        if node.op == "get_attr":
            t = fetch_attr(gm, node.target)
            target = ("weight", tuple(t.shape), str(t.dtype)) if isinstance(t, torch.Tensor) else ("attr", repr(t))
        elif node.op == "placeholder":
            target = "input"
        else:
            target = str(node.target)
        items.append((node.op, target, repr(args)))
    return tuple(items)


def weights_as_inputs(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """A copy of ``gm`` whose tensor attributes are leading placeholders; returns it and their targets
    in placeholder order."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    attrs = [n for n in gm.graph.nodes if n.op == "get_attr" and isinstance(fetch_attr(gm, n.target), torch.Tensor)]
    for k, node in enumerate(attrs):
        env[node] = graph.placeholder(f"w{k}")
        env[node].meta = dict(node.meta)
    for node in gm.graph.nodes:
        if node in env:
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(gm, graph), [n.target for n in attrs]


def _needs_copy(t: torch.Tensor) -> bool:
    """Dynamo guards on an input being a view (and on its base's sizes), on a storage offset of 0
    vs >= 2 and on the exact strides of size-1 dims. Rows we cut from larger tensors vary in all
    three from call to call, so they would trigger recompiles mid-generation: give them their own
    standard storage (they are a few rows of d values)."""
    if t._base is not None or t.storage_offset():
        return True
    expected = 1
    for size, stride in zip(reversed(t.shape), reversed(t.stride())):
        if stride != expected:
            return True
        expected *= size
    return False


class _Compiled:
    """A segment's entry point into a compiled template: prepends the segment's weights (if shared)
    and normalises the layout of its inputs (`_needs_copy`), except the K/V views at ``keep``: those
    are written in place and must stay views of the runtime's buffers (they are always views, of
    the same layout, so they never cause a recompile)."""

    def __init__(self, compiled, weights=(), keep=()):
        self.compiled = compiled
        self.weights = list(weights)
        self.keep = frozenset(keep)

    def __call__(self, *args):
        args = [a.clone(memory_format=torch.contiguous_format)
                if i not in self.keep and isinstance(a, torch.Tensor) and _needs_copy(a) else a
                for i, a in enumerate(args)]
        return self.compiled(*self.weights, *args)


class _SharedProbe(torch.nn.Module):
    """`ExitProbe` with the adapter as an input, so every exit layer runs one compiled graph."""

    def __init__(self, head: fx.GraphModule, vocab):
        super().__init__()
        self.head = head
        self.register_buffer("vocab", vocab, persistent=False)

    def forward(self, adapter, hidden):
        from ..passes.insert_exit_probes import ExitProbe
        return ExitProbe.apply(self.head, self.vocab, adapter, hidden)


def compile_segment(fn, config):
    options = {}
    if str(config.dtype) in ("bfloat16", "float16"):
        # Round after every op like eager does: fused fp32 intermediates flip near-ties vs HF greedy.
        options["emulate_precision_casts"] = True
    return torch.compile(fn, backend="inductor", dynamic=True, fullgraph=True, options=options or None)


def lower_inductor(program, config):
    """Replace the program's segment callables by inductor-compiled ones. Compilation happens on first
    call; `adadecode_fx.lower.warm_up` triggers every variant a generation needs."""
    return lower_with(program, config, compile_segment, name="inductor")


def lower_with(program, config, compile_fn, name: str):
    """Lower every segment with ``compile_fn(module, config)``, sharing one template per layer kind."""
    templates: dict[tuple, object] = {}
    layer_fns = []
    for i, layer in enumerate(program.layer_fns):
        key = structure_key(layer)
        template, targets = weights_as_inputs(layer)
        if key not in templates:
            templates[key] = compile_fn(template, config)
        kv = [j for j, item in enumerate(program.layer_recipes[i]) if item[0] == "kv"]
        layer_fns.append(_Compiled(templates[key], [fetch_attr(layer, t) for t in targets], kv))
    kv = [j for j, arg in enumerate(program.prologue_args) if arg.startswith("kv_")]
    probes, probe_fns = {}, {}
    for layer, probe in program.probe_fns.items():
        key = (id(probe.epilogue), id(probe.vocab))
        if key not in probes:  # exit layers share the probe head and differ only in their adapter
            probes[key] = compile_fn(_SharedProbe(private_copy(probe.epilogue), probe.vocab), config)
        probe_fns[layer] = _Compiled(probes[key], [probe.adapter])
    return program.replace(
        layer_fns=layer_fns, probe_fns=probe_fns, backend=name, needs_warm_up=True,
        prologue_fn=_Compiled(compile_fn(private_copy(program.prologue_fn), config), keep=kv),
        epilogue_fn=_Compiled(compile_fn(private_copy(program.epilogue_fn), config)),
        lowering={"compiled_templates": len(templates) + len(probes) + 2})
