"""block_linear: run the bf16 linears of layers and epilogue with a kernel whose blocks are cheap and exact.

Why: AdaDecode's deferred rows are supposed to ride along with the next token almost for free (a block
of a few rows costs what one row costs on memory-bound hardware). On CPU, torch 2.13's bf16 linears
either cost T rows for a block of T (AVX2: one dot product per row and output) or round a block's rows
differently from the same rows alone (AVX-512 BF16: oneDNN), which breaks parity with plain decoding.
`adadecode_fx.kernels` has a kernel per CPU kind that computes each output in exactly the order of
ATen's one-row call (bit-identical rows) while reading each weight tile once per block (docs/kernels.md).

Expects: the output of `deferred_batching`.
Returns: the same module where every ``aten.linear`` in a layer segment or the epilogue whose weight the
kernel fits (bf16 ``[N, K]``; K a multiple of 64 on AVX2, of 32 on AVX-512, where the matrix must also
be large enough for ATen to hand it to oneDNN) calls ``adadecode_kernels::block_linear`` instead, when
the kernel built and passed its self-check on this machine. Every other bf16/fp16 CPU linear there (and
all of them where the kernel is off) calls ``adadecode::row_linear``: decode blocks one row at a time,
exact but without the saving. ``gm.meta["block_linear"]`` records what happened.
"""
from __future__ import annotations

import torch
from torch import fx

from ..ops.linear import LINEAR, ROW_LINEAR, block_linear_fits, block_linear_kernel
from .settings import PassSettings
from .split_layers import fetch_attr, segment_calls


def _weight(sub: fx.GraphModule, node: fx.Node):
    w = node.args[1] if len(node.args) > 1 else None
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return None
    return fetch_attr(sub, w.target)


def _eligible(sub: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not LINEAR:
        return False
    w = _weight(sub, node)
    return (isinstance(w, torch.Tensor) and w.dtype in (torch.bfloat16, torch.float16) and w.device.type == "cpu"
            and w.dim() == 2 and w.is_contiguous())


def block_linear(gm: fx.GraphModule, settings: PassSettings) -> fx.GraphModule:
    segments = [name for name in segment_calls(gm) if name.startswith("layer_") or name == "epilogue"]
    nodes = [(getattr(gm, s), n) for s in segments for n in getattr(gm, s).graph.nodes if _eligible(getattr(gm, s), n)]
    if not nodes:
        gm.meta["block_linear"] = "no bf16 CPU linears"
        return gm
    op, status = block_linear_kernel()
    kernel = rows = 0
    for sub, node in nodes:
        w = _weight(sub, node)
        fits = op is not None and block_linear_fits(w)
        # otherwise still exact: a decode block's rows are computed one at a time
        node.target = op if fits else ROW_LINEAR
        node.args = (node.args + (None,))[:3]
        kernel, rows = kernel + fits, rows + (not fits)
    for sub in {id(s): s for s, _ in nodes}.values():
        sub.recompile()
    gm.meta["block_linear_rows"] = rows
    gm.meta["block_linear"] = f"{kernel} linears on the kernel, {rows} one row at a time in decode blocks" + (
        f" (kernel off: {status})" if op is None else "")
    return gm

