"""``adadecode::row_exact_grouped_mm``: a mixture-of-experts layer multiplies each decode row alone.

Why: transformers runs an MoE layer's experts through one grouped matmul whose groups are the rows routed
to each expert (``aten::_grouped_mm`` where the CPU has it for the dtype, else
``transformers::grouped_mm_fallback``, one ``torch.mm`` per expert). Decoding one position, an expert
gets at most one row; a block of deferred positions gives an expert several, and a matmul of several
rows can round differently from one row's (CPU, torch 2.13, bf16, a 4864 x 896 down projection: a group
of 3 rows differs from 3 one-row calls in the last bit). So in a block each row is multiplied by its
expert's weight on its own, through the same op, as plain decoding does. A prompt's prefill is the
exception (`prefill_block`): plain decoding runs it as one block, so the op then makes the grouped call.
"""
from __future__ import annotations

import functools

import torch
from torch import fx

from .attention import in_prefill

GROUPED_MM = torch.ops.aten._grouped_mm.default


@functools.cache
def fallback_op():
    """transformers' grouped matmul for what ``aten::_grouped_mm`` does not take (registered when its MoE
    integration is imported), or None."""
    try:
        import transformers.integrations.moe  # noqa: F401  registers the op
    except ImportError:
        return None
    packet = getattr(torch.ops.transformers, "grouped_mm_fallback", None)
    return None if packet is None else packet.default


def _grouped(input, weight, offs, fallback: bool):
    return fallback_op()(input, weight, offs) if fallback else GROUPED_MM(input, weight, offs)


def row_exact_grouped(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor,
                      fallback: bool = False) -> torch.Tensor:
    """``input [S, in]`` sorted by expert, ``weight [E, in, out]``, ``offs [E]`` the groups' ends: each row
    times its group's weight in a group of its own (a prefill: the grouped call). ``fallback``: the
    grouped op is transformers' fallback rather than ATen's."""
    ends = offs.tolist()
    if in_prefill() or max(b - a for a, b in zip([0] + ends, ends)) <= 1:
        return _grouped(input, weight, offs, fallback)  # a prefill, or one position's rows: as plain decoding
    rows, start = [], 0
    one = offs.new_ones(1)
    for expert, end in enumerate(ends):
        for r in range(start, end):
            rows.append(_grouped(input[r:r + 1], weight[expert:expert + 1], one, fallback))
        start = end
    out = torch.cat(rows) if rows else input.new_zeros(0, weight.shape[2])
    if out.shape[0] < input.shape[0]:  # rows past the last group (none in HF's routing) stay zero
        out = torch.cat([out, out.new_zeros(input.shape[0] - out.shape[0], out.shape[1])])
    return out


@torch.library.custom_op("adadecode::row_exact_grouped_mm", mutates_args=())
def row_exact_grouped_mm(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor,
                         fallback: bool = False) -> torch.Tensor:
    return row_exact_grouped(input, weight, offs, fallback)


@row_exact_grouped_mm.register_fake
def _(input, weight, offs, fallback=False):
    return input.new_empty(input.shape[0], weight.shape[2])


ROW_EXACT_GROUPED = torch.ops.adadecode.row_exact_grouped_mm.default


def grouped_call(node: fx.Node) -> bool | None:
    """For a grouped matmul node this pass can rewrite: whether it is transformers' fallback (else ATen's);
    None for anything else (ATen's with a bias or an output dtype is left alone)."""
    if node.op != "call_function":
        return None
    if node.target is GROUPED_MM and len(node.args) == 3 and not node.kwargs:
        return False
    if node.target is not None and node.target is fallback_op() and len(node.args) == 3 and not node.kwargs:
        return True
    return None


def plain_experts(graph: fx.Graph) -> fx.Graph:
    """Undo the rewrite in ``graph``: the grouped call, one matmul per expert."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target in (ROW_EXACT_GROUPED, row_exact_grouped):
            fallback = node.args[3] if len(node.args) > 3 else node.kwargs.get("fallback", False)
            node.target = fallback_op() if fallback else GROUPED_MM
            node.args, node.kwargs = node.args[:3], {}
    return graph
