"""row_exact_attention: make a block of decode rows attend exactly as each row would alone.

Why: AdaDecode runs deferred rows through the deep layers in blocks of T > 1, while plain decoding runs
each position alone (T = 1). In low precision the attention kernels round differently for a block than
for one row (measured on CPU, torch 2.13, bf16: the SDPA output of a 3-row block differs from three
1-row calls in the last bit), which flips near-ties and breaks token parity with plain greedy decoding
(SmolLM2 bf16: 2 of 6 HumanEval prompts diverged). Linear layers, norms and element-wise ops are
row-independent on that CPU (each output row is bit-identical whatever the block size), so attention
is the one op to fix.

Expects: the output of `deferred_batching` (layer segments labelled, K/V read at its exact length,
i.e. ``kv_bucket=1``).
Returns: the same module with every ``aten.scaled_dot_product_attention`` inside a layer segment
replaced by ``adadecode::row_exact_sdpa`` (and views of its output by reshapes, `_views_to_reshapes`):
for a block of T rows whose K/V ends at the block's last position, row ``i`` attends over exactly the
keys it sees when decoded alone (the first ``S - T + i + 1``), one SDPA call per row. In a batch each
row's keys also start at its first real slot: a left-padded row attends over its own slots only, as its
prompt alone does (SDPA over masked pad keys rounds differently). A prefill is the exception to the
per-row calls: plain decoding prefills the prompt as one block, so the runtime marks it
(`prefill_block`) and the op then runs the single block call over the prompt's slots, like HF does. A
layer with a sliding window or attention chunk (``settings.attention_windows``) passes it to the op,
whose rows then attend over the last ``window`` keys only, as HF's cache hands them to a one-row step.

The op is opaque to dynamo (a custom op), so compiled segments call it as an extern kernel and decide
at run time; ONNX export maps it back to plain SDPA (fp32 engines; see `lower.onnx_rewrite`).
"""
from __future__ import annotations

import torch
from torch import fx

from ..ops.attention import ROW_EXACT, SDPA, WINDOW
from .settings import PassSettings
from .split_layers import rewrite_layer_nodes


def _call_args(node: fx.Node) -> tuple:
    names = ("q", "k", "v", "attn_mask", "dropout_p", "is_causal")
    defaults = (None, 0.0, False)
    args = list(node.args) + [node.kwargs.get(n, d) for n, d in zip(names[len(node.args):],
                                                                   defaults[len(node.args) - 3:])]
    return tuple(args[:6])


_A = torch.ops.aten
# ops through which a tensor's layout carries on to a later view
_LAYOUT_OPS = (_A.transpose.int, _A.permute.default, _A.view.default, _A.reshape.default, _A.unsqueeze.default,
               _A.squeeze.dim, _A.slice.Tensor, _A.select.int)


def _views_to_reshapes(node: fx.Node) -> None:
    """SDPA's CPU kernels return a block as a transposed [B, T, H, D] buffer, so a model's
    ``out.transpose(1, 2).contiguous().view(...)`` was captured without the copy, as transpose -> view.
    The row-exact op returns a contiguous [B, H, T, D] block, on which that view fails: the views after it
    become reshapes (a copy where the layout needs one, as ``.contiguous()`` made in the model)."""
    todo = list(node.users)
    while todo:
        user = todo.pop()
        if user.op != "call_function" or user.target not in _LAYOUT_OPS:
            continue
        if user.target is torch.ops.aten.view.default:
            user.target = torch.ops.aten.reshape.default
        todo.extend(user.users)


def _row_exact(node: fx.Node, window: int) -> bool:
    if node.op != "call_function" or node.target is not SDPA:
        return False
    node.args = _call_args(node)
    kwargs = {"scale": node.kwargs.get("scale"), "enable_gqa": node.kwargs.get("enable_gqa", False)}
    node.kwargs = {**kwargs, WINDOW: window} if window else kwargs
    node.target = ROW_EXACT
    _views_to_reshapes(node)
    return True


def row_exact_attention(gm: fx.GraphModule, settings: PassSettings) -> fx.GraphModule:
    # a layer that reads another layer's K/V (`shared_kv`) attends over them as that layer does
    sources = gm.meta.get("kv_sources") or range(gm.meta["num_layers"])
    given = settings.attention_windows
    windows = [given[s] if s < len(given) else 0 for s in sources]
    return rewrite_layer_nodes(gm, lambda node, layer: _row_exact(node, windows[layer] if layer < len(windows)
                                                                  else 0))
