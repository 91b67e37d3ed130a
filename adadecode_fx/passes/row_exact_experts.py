"""row_exact_experts: a mixture-of-experts layer computes a block of decode rows as each row alone.

Why: plain decoding routes one position at a time, so each expert multiplies at most one row; a block of
deferred rows can send several rows to one expert, and a several-row matmul can round differently in low
precision (`adadecode_fx.ops.experts`). With `row_exact_attention` and `block_linear` this keeps bf16
MoE decoding bit-identical to plain greedy on a CPU.

Expects: the output of `deferred_batching`.
Returns: the same module with every grouped expert matmul inside a layer segment (``aten::_grouped_mm``
or ``transformers::grouped_mm_fallback``, as the capture recorded it) replaced by
``adadecode::row_exact_grouped_mm`` (one row per call in a block, the grouped call in a prefill).
Segments without one (dense models) are unchanged.
"""
from __future__ import annotations

from torch import fx

from ..ops.experts import ROW_EXACT_GROUPED, grouped_call
from .settings import PassSettings
from .split_layers import rewrite_layer_nodes


def _row_exact(node: fx.Node, layer: int) -> bool:
    fallback = grouped_call(node)
    if fallback is None:
        return False
    node.target, node.args = ROW_EXACT_GROUPED, (*node.args, fallback)
    return True


def row_exact_experts(gm: fx.GraphModule, settings: PassSettings) -> fx.GraphModule:
    return rewrite_layer_nodes(gm, _row_exact)
