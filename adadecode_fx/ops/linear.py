"""``adadecode_kernels::block_linear``: ATen's one-row bf16 linear, bit for bit, for any block size.

The C++ kernel is built and self-checked by `adadecode_fx.kernels`; this module is what graphs and
exporters see of it.
"""
from __future__ import annotations

import torch
from torch import fx

from ..kernels import linear_backward, rows_alone, save_linear_inputs
from .attention import add_prefill_switch, in_prefill

LINEAR = torch.ops.aten.linear.default


def block_linear_kernel() -> tuple[object | None, str]:
    """(the checked op or None, why not): building it takes ~20 s the first time on a machine."""
    from ..kernels import block_linear_op, block_linear_status, prefill_switch
    op = block_linear_op()
    switch = prefill_switch()
    if switch is not None:
        add_prefill_switch(switch)
    return op, block_linear_status()


def block_linear_fits(weight: torch.Tensor) -> bool:
    """Whether the kernel reproduces plain decoding's one-row result for linears with this weight."""
    from ..kernels import block_linear_fits as fits
    return fits(weight)


def row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``aten.linear`` whose decode blocks are computed one row at a time, each exactly as plain decoding
    computes that row alone.

    Why: on CPUs with AVX-512 BF16, ATen sends bf16 matmuls to oneDNN, whose result for a row depends on
    how many rows the call has (torch 2.13, Qwen2.5's 896 x 4864 down projection: a 5-row block differs
    from the same rows alone in the last bit), and even a one-row call can take another path than the
    one ATen picks for a block. A deferred row must equal what HF's one-row decode step computed, so
    outside a prompt's prefill (`prefill_block`, which plain decoding runs as one block too) each row is
    its own call, and so is each row of a batch (one call over B rows rounds a row by B: SmolLM2's
    576 x 1536 down projection). Blocks and batches then cost one call per row; where the
    `block_linear` kernel is exact it is used instead (see the pass)."""
    if x.dim() < 2 or x.numel() == x.shape[-1] or in_prefill():
        return LINEAR(x, weight, bias)
    # one contiguous [1, K] row per call, not a length-1 slice of a block: such a slice keeps the block's
    # strides, and ATen then runs it as a batched matmul that repacks the weight on every call (~10x
    # slower; docs/kernels.md). A batch's rows are computed alone too, as each prompt alone is.
    return rows_alone(x, weight, bias)


@torch.library.custom_op("adadecode::row_linear", mutates_args=())
def row_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return row_linear(x, weight, bias)


@row_linear_op.register_fake
def _(x, weight, bias=None):
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))


row_linear_op.register_autograd(linear_backward, setup_context=save_linear_inputs)
ROW_LINEAR = torch.ops.adadecode.row_linear.default


def is_block_linear(target) -> bool:
    """The kernel op, or the one-row-at-a-time fallback (op or its eager body)."""
    return str(target).startswith("adadecode_kernels.block_linear") or target is ROW_LINEAR or target is row_linear


def plain_linear(graph: fx.Graph) -> fx.Graph:
    """Undo the rewrite in ``graph`` (for exporters that do not know the op)."""
    for node in graph.nodes:
        if node.op == "call_function" and is_block_linear(node.target):
            node.target = LINEAR
    return graph
