"""Prompt batches: what `AdaDecoder.generate` accepts, checked once, as left-padded rows.

A batch is ``B`` rows of equal length; row ``b`` holds ``pad[b]`` pad slots and then its prompt. Inputs:
one prompt (a 1-D tensor or a list of ints), a ``[B, T]`` tensor with an optional ``attention_mask``
(left padding, as HF tokenizers produce with ``padding_side="left"``), or a list of token lists of any
lengths (padded here).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import AdaDecodeError


@dataclass
class PromptBatch:
    rows: list[list[int]]  # each left-padded to the same length
    pad: list[int]         # per row: pad slots before its prompt
    single: bool           # one prompt given as a flat sequence or a [1, T] batch: results come back flat

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        return len(self.rows[0])


def _ints(values, vocab: int, where: str) -> list[int]:
    values = list(values)
    if any(isinstance(t, bool) or not float(t).is_integer() for t in values):
        raise AdaDecodeError(f"token ids must be integers ({where})")
    bad = [t for t in values if not 0 <= int(t) < vocab]
    if bad:
        raise AdaDecodeError(f"token ids {bad[:5]} are outside the vocabulary (size {vocab}) ({where})")
    return [int(t) for t in values]


def _pad_slot(t, vocab: int, pad_id: int) -> int:
    return int(t) if not isinstance(t, bool) and float(t).is_integer() and 0 <= int(t) < vocab else pad_id


def _left_pad(row: list[int], mask: list[int], b: int) -> int:
    """Number of leading pad slots of ``row``; refuses right padding and holes."""
    pad = 0
    while pad < len(mask) and mask[pad] == 0:
        pad += 1
    if pad == len(mask):
        raise AdaDecodeError(f"prompt {b} is empty (its attention_mask is all zeros): give every row at least "
                             "one token")
    if any(m != 1 for m in mask[pad:]):
        raise AdaDecodeError(
            f"prompt {b} is not left-padded (attention_mask {mask}): pad on the left, e.g. "
            "tokenizer.padding_side = 'left', so every row's last token is its newest one")
    return pad


def prompt_batch(input_ids, attention_mask=None, *, vocab: int, pad_id: int = 0) -> PromptBatch:
    if not isinstance(input_ids, (torch.Tensor, list, tuple)) and hasattr(input_ids, "__array__"):
        input_ids = torch.as_tensor(input_ids)  # a NumPy array, as a tokenizer's return_tensors="np" gives
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() not in (1, 2):
            raise AdaDecodeError(f"input_ids must be [length] or [batch, length], got shape {tuple(input_ids.shape)}")
        single = input_ids.dim() == 1 or input_ids.shape[0] == 1
        rows = [input_ids.tolist()] if input_ids.dim() == 1 else input_ids.tolist()
        if attention_mask is None:
            masks = [[1] * len(r) for r in rows]
        else:
            mask = torch.as_tensor(attention_mask)
            if tuple(mask.shape) != tuple(torch.as_tensor(input_ids).reshape(len(rows), -1).shape):
                raise AdaDecodeError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has "
                                     f"{tuple(input_ids.shape)}: give one mask entry per token")
            masks = mask.reshape(len(rows), -1).tolist()
    else:
        rows = list(input_ids)
        if not rows:
            raise AdaDecodeError("the prompt is empty: give at least one token (e.g. the BOS token)")
        single = not isinstance(rows[0], (list, tuple, torch.Tensor))
        rows = [rows] if single else [list(r) for r in rows]
        if attention_mask is not None:
            raise AdaDecodeError("attention_mask goes with a [batch, length] tensor; for lists of token lists "
                                 "give the unpadded prompts and they are padded here")
        width = max(len(r) for r in rows)
        masks = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
        rows = [[pad_id] * (width - len(r)) + r for r in rows]
    if not rows or not rows[0]:
        raise AdaDecodeError("the prompt is empty: give at least one token (e.g. the BOS token)")
    pad = [_left_pad(r, m, b) for b, (r, m) in enumerate(zip(rows, masks))]
    # pad slots are never embedded, but logits processors read them as HF's loop does (n-grams, lengths):
    # keep the given ids there, except ids outside the vocabulary, which some tokenizers pad with
    rows = [[_pad_slot(t, vocab, pad_id) for t in r[:p]] + _ints(r[p:], vocab, f"prompt {b}")
            for b, (r, p) in enumerate(zip(rows, pad))]
    return PromptBatch(rows, pad, single)


def check_positions(prompt_len: int, max_new_tokens: int, max_positions: int | None) -> None:
    """Refuse a generation that would run past the positions the model was built for (its
    ``max_position_embeddings``): learned position tables have no row there, and rotary models were
    never trained there. Checked before any K/V is allocated."""
    if max_positions is None or prompt_len + max_new_tokens <= max_positions:
        return
    room = max_positions - prompt_len
    if room < 1:
        raise AdaDecodeError(f"the prompt has {prompt_len:,} tokens but this model handles at most {max_positions:,} "
                             "positions (max_position_embeddings): shorten the prompt")
    raise AdaDecodeError(f"the prompt ({prompt_len:,} tokens) plus max_new_tokens ({max_new_tokens:,}) is "
                         f"{prompt_len + max_new_tokens:,} positions, more than this model's {max_positions:,} "
                         f"(max_position_embeddings): lower max_new_tokens to at most {room:,} or shorten the prompt")


def check_switches(pad: list[int], length: int, max_new_tokens: int, full_depth_positions) -> None:
    """Refuse a batch whose rows would cross a switch of the model's computation (longrope's short to
    long factors, `adadecode_fx.rope_lengths`) at different steps: a step computes all rows with one
    factor set, chosen by the furthest row, while each row decoded alone switches at its own position.
    Rows of equal length cross together; prompts that all start past the switch never cross it."""
    if len(set(pad)) == 1 or not full_depth_positions:
        return
    first_long = min(full_depth_positions) + 1
    furthest = length - min(pad) + max_new_tokens - 1  # the last position the longest row reaches
    if length - max(pad) > first_long or furthest < first_long:
        return
    raise AdaDecodeError(
        f"this model switches its rotary factors at position {first_long:,} (longrope), and the rows of this "
        "batch would reach it at different steps, where a batch step uses one set of factors for all rows: "
        "decode these prompts one at a time or in batches of equal length, or keep every row under "
        f"{first_long:,} positions (lower max_new_tokens)")
