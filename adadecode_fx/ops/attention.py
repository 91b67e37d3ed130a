"""``adadecode::row_exact_sdpa``: a block of decode rows attends exactly as each row would alone.

Why one call per row: in low precision the attention kernels round differently for a block than for one
row (CPU, torch 2.13, bf16: a 3-row block's SDPA output differs from three 1-row calls in the last bit),
which flips near-ties and breaks token parity with plain greedy decoding. A prompt's prefill is the
exception: plain decoding prefills the prompt as one block, so the runtime wraps it in `prefill_block`
and the op then runs one call, as HF does.

Local layers (``window > 0``: a sliding window or attention chunk): HF's cache hands a one-row step only
the last ``window`` keys (it keeps ``window - 1`` rows and adds the new one), so each row attends over
exactly those, under the matching columns of the mask. Attending over every key under the window's mask
gives the same softmax in exact arithmetic, but the kernel blocks and sums a longer row differently
(bf16: 1 of 6 generations of a tiny Qwen2 with a 5-key window parted from HF, even at full depth).

The op is opaque to dynamo, so compiled segments call it as an extern kernel and decide at run time.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from typing import Optional

import torch
from torch import fx

# the op's own argument, which plain SDPA does not take (`plain_attention` drops it)
WINDOW = "window"
SDPA = torch.ops.aten.scaled_dot_product_attention.default
_STATE = threading.local()


_SWITCHES: list = []  # kernels that also run a prefill as ATen's one call: fn(on: bool)


def add_prefill_switch(fn) -> None:
    """Have `prefill_block` also call ``fn(True)`` on entry and ``fn(old)`` on exit (a kernel's own flag)."""
    if fn not in _SWITCHES:
        _SWITCHES.append(fn)


@contextlib.contextmanager
def prefill_block():
    """Within this context, attention (and the linear kernels) run blocks as one call (a prompt's prefill)."""
    old = getattr(_STATE, "prefill", False)
    _STATE.prefill = True
    for fn in _SWITCHES:
        fn(True)
    try:
        yield
    finally:
        _STATE.prefill = old
        for fn in _SWITCHES:
            fn(old)


def in_prefill() -> bool:
    """True inside `prefill_block` (a prompt's prefill, which plain decoding also runs as one block)."""
    return getattr(_STATE, "prefill", False)


def _sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return SDPA(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


def _last_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
               dropout_p: float, scale: Optional[float], enable_gqa: bool, window: int) -> torch.Tensor:
    """One row over the last ``window`` keys. Scripted, so that a trace of a one-row layer step
    (`adadecode_fx.lower.scripted_rows`) calls it and slices by each call's K/V length, not the traced one's."""
    n = k.size(-2)
    lo = max(0, n - window)
    if attn_mask is not None:
        attn_mask = attn_mask[..., lo:n]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k[..., lo:n, :], v[..., lo:n, :], attn_mask=attn_mask, dropout_p=dropout_p, is_causal=False,
        scale=scale, enable_gqa=enable_gqa)


@functools.cache
def _scripted_last_keys():
    with warnings.catch_warnings():
        # torch.jit is deprecated, but only a scripted call keeps its sizes dynamic inside a trace
        warnings.simplefilter("ignore")
        return torch.jit.script(_last_keys)


def row_exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False, window: int = 0) -> torch.Tensor:
    """The op's body as a plain function: eager segments call it directly (`adadecode_fx.lower.eager`),
    skipping the dispatcher round trip of a Python custom op (~0.1 ms per call on a 2-core CPU, once per
    layer and step). ``window``: the layer's sliding window or attention chunk (0: every key)."""
    T, S = q.shape[-2], k.shape[-2]
    if (T == 1 and window == 0) or in_prefill() or (attn_mask is None and not is_causal):
        # contiguous: the fake kernel below promises that layout to compilers
        return _sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa).contiguous()
    if T == 1:  # one row of a local layer
        return _scripted_last_keys()(q, k, v, attn_mask, dropout_p, scale, enable_gqa, window).contiguous()
    rows = []
    for i in range(T):
        n = S - T + i + 1  # row i's position is the (n-1)-th slot: it sees keys [0, n) when alone
        lo = max(0, n - window) if window > 0 else 0  # a local layer's cache holds only the last `window`
        mask = None
        if attn_mask is not None:
            mask = attn_mask[..., i:i + 1, lo:n] if attn_mask.shape[-2] > 1 else attn_mask[..., lo:n]
        rows.append(_sdpa(q[..., i:i + 1, :], k[..., lo:n, :], v[..., lo:n, :], mask, dropout_p, False, scale,
                          enable_gqa))
    return torch.cat(rows, dim=-2)


@torch.library.custom_op("adadecode::row_exact_sdpa", mutates_args=())
def row_exact_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False, window: int = 0) -> torch.Tensor:
    return row_exact(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, window)


@row_exact_sdpa.register_fake
def _(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, window=0):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


ROW_EXACT = torch.ops.adadecode.row_exact_sdpa.default


def plain_attention(graph: fx.Graph) -> fx.Graph:
    """Undo the rewrite in ``graph`` (for exporters that do not know the custom op), also where an eager
    lowering calls the op's body `row_exact` directly."""
    for node in graph.nodes:
        if node.op == "call_function" and (node.target is ROW_EXACT or node.target is row_exact):
            # plain SDPA reads every key under the mask, which holds the window: right, not bf16-exact
            node.target = SDPA
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != WINDOW}
    return graph
