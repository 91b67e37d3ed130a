"""Eager lowering: the FX segments as they are, with Python custom ops called as plain functions, and
one-row layer steps run as TorchScript traces of the same ATen calls (`adadecode_fx.lower.scripted_rows`).

Why: `adadecode::row_exact_sdpa` is a custom op so that dynamo and exporters treat it as one opaque call.
Eager segments do not need that, and every call through the dispatcher into a Python kernel costs
~0.1 ms on a 2-core CPU (docs/lowering.md), once per layer and step. Eager layers get
private copies that call the op's body directly; the shared segments keep the op for other lowerings.
"""
from __future__ import annotations

import torch
from torch import fx

from ..ops.attention import ROW_EXACT, row_exact
from ..ops.linear import ROW_LINEAR, block_linear_fits, block_linear_kernel, row_linear
from ..passes.insert_exit_probes import ExitProbe
from ..passes.split_layers import copy_graph
from .eager_attention_rows import SOFTMAX_OPS, eager_attention_rows
from .scripted_rows import script_decode_rows

# custom op -> the plain function with the same signature and result
_PLAIN = {ROW_EXACT: row_exact, ROW_LINEAR: row_linear}
# export's dtype/device assertions: checks of what the capture already fixed, ~10 us each, 4 per layer
_ASSERTS = (torch.ops.aten._assert_tensor_metadata.default,)


def private_copy(gm: fx.GraphModule, edit=None) -> fx.GraphModule:
    """A copy of a segment that only the caller holds (weights stay shared). Segments are shared between
    decoders of one model, and every new decoder's ``recompile()`` regenerates their code, which would
    invalidate what a lowering did to them. ``edit(graph)`` changes the copied graph before its code is
    generated (once per copy: a layer's code takes a few ms to generate)."""
    graph = copy_graph(gm.graph)
    if edit is not None:
        edit(graph)
    copy_ = fx.GraphModule(gm, graph)
    copy_.meta.update(gm.meta)
    return copy_


def _whole_slice(node) -> bool:
    """``x[..., 0:]`` along one dim: a no-op view that torch 2.11's export leaves in ``repeat_kv``."""
    return (isinstance(node, fx.Node) and node.target is torch.ops.aten.slice.Tensor and len(node.args) >= 3
            and node.args[2] == 0 and (len(node.args) < 4 or node.args[3] is None or node.args[3] >= 2 ** 62)
            and (len(node.args) < 5 or node.args[4] == 1))


def _repeat_chain(node) -> list | None:
    """The nodes of HF's ``repeat_kv(kv)`` from ``node`` down to ``kv`` (reshape <- expand <- [no-op
    slices] <- unsqueeze <- kv), or None if ``node`` is not one."""
    if not (isinstance(node, fx.Node) and node.target is torch.ops.aten.reshape.default):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.target is torch.ops.aten.expand.default):
        return None
    chain, below = [node, expand], expand.args[0]
    while _whole_slice(below):
        chain.append(below)
        below = below.args[0]
    unsqueeze = torch.ops.aten.unsqueeze.default
    if not (isinstance(below, fx.Node) and below.target is unsqueeze and below.args[1] == 2):
        return None
    return chain + [below, below.args[0]]


def _unrepeat_kv(graph: fx.Graph) -> None:
    """Attention reads the K/V heads as they are (``enable_gqa``, as HF's decode does) instead of a copy of
    the whole K/V repeated per query head: bit-identical on CPU (tests/passes/test_row_exact_attention.py),
    and ~80 us less per layer and step for Qwen2.5's 14/2 heads at 264 positions. Without the copy a
    segment also sizes nothing by the K/V length, so its one-row steps can be scripted."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not row_exact or len(node.args) < 3:
            continue
        k_chain, v_chain = _repeat_chain(node.args[1]), _repeat_chain(node.args[2])
        if k_chain is None or v_chain is None:
            continue
        node.args = (node.args[0], k_chain[-1], v_chain[-1], *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        for chain in (k_chain, v_chain):  # the repeat chain, now unused (kv itself stays)
            for n in chain[:-1]:
                if not n.users:
                    graph.erase_node(n)


def _plain_calls(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _PLAIN:
            node.target = _PLAIN[node.target]
        elif node.op == "call_function" and node.target in _ASSERTS and not node.users:
            graph.erase_node(node)
    _unrepeat_kv(graph)


def lower_eager(program, config):
    layer_fns = list(program.layer_fns)
    for i, layer in enumerate(layer_fns):
        if not isinstance(layer, fx.GraphModule) or not any(n.target in _PLAIN or n.target in _ASSERTS or
                                                            n.target in SOFTMAX_OPS for n in layer.graph.nodes):
            continue
        layer = private_copy(layer, _plain_calls)
        eager_attention_rows(layer)
        layer_fns[i] = layer
    program = program.replace(layer_fns=layer_fns, probe_fns=_kernel_adapters(program), backend="eager")
    return script_decode_rows(program) if config.script_rows else program


def _kernel_adapters(program) -> dict:
    """The probes, each bf16 CPU adapter through the block kernel where the kernel fits it.

    Why: ATen's one-row bf16 matmul reads Qwen2.5's 896 x 896 adapter at ~4 GB/s, a third of the kernel's
    rate and a third of the probe's time (docs/heads.md). A probe only proposes a token and verification
    decides it, so the probe's rounding need not match anything."""
    probes = dict(program.probe_fns)
    for layer, probe in probes.items():
        adapter = probe.adapter if isinstance(probe, ExitProbe) and probe.linear is None else None
        if adapter is None or adapter.dtype != torch.bfloat16 or adapter.device.type != "cpu":
            continue
        op, _ = block_linear_kernel()  # built and checked already by the block_linear pass
        if op is not None and block_linear_fits(adapter):
            probes[layer] = ExitProbe(adapter.data, probe.epilogue, probe.vocab, linear=op)
    return probes
