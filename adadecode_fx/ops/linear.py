"""``adadecode_kernels::block_linear``: ATen's one-row bf16 linear, bit for bit, for any block size.

The C++ kernel is built and self-checked by `adadecode_fx.kernels`; this module is what graphs and
exporters see of it.
"""
from __future__ import annotations

import torch
from torch import fx

LINEAR = torch.ops.aten.linear.default


def block_linear_kernel() -> tuple[object | None, str]:
    """(the checked op or None, why not): building it takes ~20 s the first time on a machine."""
    from ..kernels import block_linear_op, block_linear_status
    op = block_linear_op()
    return op, block_linear_status()


def is_block_linear(target) -> bool:
    return str(target).startswith("adadecode_kernels.block_linear")


def plain_linear(graph: fx.Graph) -> fx.Graph:
    """Undo the rewrite in ``graph`` (for exporters that do not know the op)."""
    for node in graph.nodes:
        if node.op == "call_function" and is_block_linear(node.target):
            node.target = LINEAR
    return graph
