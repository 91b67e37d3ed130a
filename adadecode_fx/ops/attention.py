"""``adadecode::row_exact_sdpa``: a block of decode rows attends exactly as each row would alone.

Why one call per row: in low precision the attention kernels round differently for a block than for one
row (CPU, torch 2.13, bf16: a 3-row block's SDPA output differs from three 1-row calls in the last bit),
which flips near-ties and breaks token parity with plain greedy decoding. A prompt's prefill is the
exception: plain decoding prefills the prompt as one block, so the runtime wraps it in `prefill_block`
and the op then runs one call, as HF does.

Batches: each row attends over its own slots only, from its first real one. A left-padded row's pad
slots are masked, but SDPA over a longer, partly masked key row rounds differently in bf16 (a prefill
of 20 queries after 5 masked slots parts from the same 20 alone), so a batch row would part from its
prompt decoded alone.

Local layers (``window``: a sliding window W > 0, or an attention chunk C given as -C): HF's cache hands
a one-row step only the last W (or C) keys (it keeps W - 1 rows and adds the new one), so each row
attends over exactly those, under the matching columns of the mask. Attending over every key under the
window's mask gives the same softmax in exact arithmetic, but the kernel blocks and sums a longer row
differently (bf16: 1 of 6 generations of a tiny Qwen2 with a 5-key window parted from HF, even at full
depth).

The op is opaque to dynamo, so compiled segments call it as an extern kernel and decide at run time.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from typing import List, Optional

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


def first_keys(attn_mask: Optional[torch.Tensor], masked_below: float) -> List[int]:
    """Per batch row of the mask (one entry where it broadcasts over the batch): the first key slot that
    any query of the row may see. A left-padded row's pad slots come before it."""
    if attn_mask is None or attn_mask.dim() != 4:
        return [0]
    seen = attn_mask if attn_mask.dtype == torch.bool else attn_mask > masked_below
    seen = seen.reshape(seen.size(0), -1, seen.size(-1))
    seen = seen.select(1, 0) if seen.size(1) == 1 else seen.any(1)
    firsts: List[int] = seen.to(torch.uint8).argmax(-1).tolist()
    return firsts


def _alone(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
           dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool, window: int,
           block: bool, pads: bool, masked_below: float) -> torch.Tensor:
    """Each batch row's queries over exactly the keys the row has when its prompt is decoded alone: from
    its first visible slot (after a left-padded row's pads) and, in a local layer (``window != 0``), only
    the last ``window`` (an attention chunk comes as ``-C``: the last ``C``). ``pads``: read each row's
    first visible slot from the mask (else every row starts at slot 0). A chunked layer's one-row mask
    starts at its chunk, not its pads, and HF's cache still hands it the last ``C`` keys: there the
    mask cannot tell pads from chunk, so its rows keep slot 0 (a padded row younger than ``C`` then reads
    masked pads; `prefill_block` is exact, its first query's chunk starts at the row's first slot).
    ``block``: a prompt's prefill, whose queries go in one call as plain decoding prefills them;
    otherwise each query row is a call of its own. Rows with the same keys share a call
    (the kernel treats batch rows independently when no key is masked).

    Scripted, so that a trace of a one-row layer step (`adadecode_fx.lower.scripted_rows`) runs this
    logic on every call instead of freezing the traced K/V length and padding."""
    T, S = q.size(-2), k.size(-2)
    keep = abs(window)
    firsts = first_keys(attn_mask, masked_below) if pads and (block or window >= 0) else [0]
    shared = min(firsts) == max(firsts)
    groups = 1 if shared else q.size(0)
    out: List[torch.Tensor] = []
    for i in range(1 if block else T):
        n = S if block else S - T + i + 1  # query row i is slot n - 1: alone it sees keys [0, n)
        rows: List[torch.Tensor] = []
        for b in range(groups):
            lo = firsts[0] if shared else firsts[b]
            if keep > 0 and not block:
                lo = max(lo, n - keep)
            qb, kb, vb = q, k, v
            mask = attn_mask
            if not shared:
                qb, kb, vb = q[b:b + 1], k[b:b + 1], v[b:b + 1]
                if mask is not None and mask.size(0) > 1:
                    mask = mask[b:b + 1]
            if not block:
                qb = qb[:, :, i:i + 1]
                if mask is not None and mask.size(-2) > 1:
                    mask = mask[..., i:i + 1, :]
            if lo > 0 or n < S:  # a one-row step with no padding reads every key: no views to make
                kb, vb = kb[:, :, lo:n], vb[:, :, lo:n]
                if mask is not None:
                    mask = mask[..., lo:n]
            rows.append(torch.nn.functional.scaled_dot_product_attention(
                qb, kb, vb, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal and block, scale=scale,
                enable_gqa=enable_gqa))
        out.append(rows[0] if len(rows) == 1 else torch.cat(rows, dim=0))
    return out[0] if len(out) == 1 else torch.cat(out, dim=-2)


@functools.cache
def _scripted_alone():
    with warnings.catch_warnings():
        # torch.jit is deprecated, but only a scripted call keeps its sizes dynamic inside a trace
        warnings.simplefilter("ignore")
        return torch.jit.script(_alone)


def row_exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False, window: int = 0) -> torch.Tensor:
    """The op's body as a plain function: eager segments call it directly (`adadecode_fx.lower.eager`),
    skipping the dispatcher round trip of a Python custom op (~0.1 ms per call on a 2-core CPU, once per
    layer and step). ``window``: the layer's sliding window, or its attention chunk as ``-C`` (0: every
    key).

    On CUDA every row starts at slot 0, pads included: reading the padding back to the host would stall
    every layer, and its kernels are not bit-exact across row counts anyway (cuBLAS picks them by shape)."""
    if attn_mask is None and not is_causal:
        # contiguous: the fake kernel below promises that layout to compilers
        return _sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa).contiguous()
    float_mask = attn_mask is not None and attn_mask.dtype != torch.bool
    masked_below = torch.finfo(attn_mask.dtype).min / 2 if float_mask else 0.0
    return _scripted_alone()(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, window, in_prefill(),
                             not q.is_cuda, masked_below).contiguous()


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
