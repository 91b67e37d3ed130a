"""RoPE variants whose frequencies depend on how long the sequence of one forward call is.

transformers' `dynamic_rope_update` recomputes the rotary frequencies on every call from that call's
largest position (``max(position_ids) + 1``), in two variants:

- ``longrope`` (Phi-3/3.5/4-mini): short factors up to ``original_max_position_embeddings`` positions,
  long factors beyond. The choice is made once per call, for all its rows. Plain decoding calls one row
  at a time, so a row's keys use the factors of its own position; a deferred block that held rows from
  both sides would give the earlier rows the long factors. So a step whose newest row is the last
  position before the switch never exits (`full_depth_positions`): every deferred row before the
  switch reaches the last layer in that step, and no later block straddles it.
- ``dynamic`` (NTK scaling): the default frequencies up to ``max_position_embeddings``, rescaled per
  call beyond. Within that range it equals the default RoPE, so it is captured as the default (the
  update's data-dependent branch cannot be exported), and decoding stops at ``max_position_embeddings``
  as it does for every model (`check_positions`). Past it, no block of several rows could match plain
  decoding's per-call rescaling.
"""
from __future__ import annotations

from contextlib import contextmanager


def _rope_parameters(config) -> list[dict]:
    """Every RoPE parameter dict of ``config``: one, or one per layer type."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return []
    if isinstance(params.get("rope_type", params.get("type")), str):
        return [params]
    return [p for p in params.values() if isinstance(p, dict)]


def full_depth_positions(config) -> frozenset[int]:
    """Positions ``p``: a step whose newest row is at ``p`` runs to the last layer (see the module doc)."""
    switches = set()
    for p in _rope_parameters(config):
        if p.get("rope_type", p.get("type")) == "longrope":
            original = p.get("original_max_position_embeddings",
                             getattr(config, "original_max_position_embeddings", None))
            if original:
                switches.add(int(original) - 1)
    return frozenset(switches)


def _is_dynamic(rope_type) -> bool:
    return isinstance(rope_type, str) and "dynamic" in rope_type


def _original_frequencies(module, prefix: str) -> None:
    """Undo a growth left by an earlier long call (as the update itself does on the next short one), so
    the graph binds the default frequencies."""
    cached = getattr(module, f"{prefix}max_seq_len_cached", None)
    original = getattr(module, f"{prefix}original_inv_freq", None)
    limit = getattr(module, "original_max_seq_len", None)
    if cached is not None and original is not None and limit is not None and cached > limit:
        module.register_buffer(f"{prefix}inv_freq", original.to(getattr(module, f"{prefix}inv_freq").device),
                               persistent=False)
        setattr(module, f"{prefix}max_seq_len_cached", limit)


@contextmanager
def default_frequencies_for_dynamic(model):
    """While capturing (or binding a cached capture): rotary modules of ``dynamic`` RoPE hold their
    default frequencies and skip their per-call update, whose branch on a device value cannot be
    exported. That is what the update computes up to ``max_position_embeddings``, the most that
    decoding allows."""
    changed = []
    for module in model.modules():
        kind = getattr(module, "rope_type", None)
        if _is_dynamic(kind):
            changed.append((module, kind))
            _original_frequencies(module, "")
            module.rope_type = "default"
        elif isinstance(kind, dict) and any(_is_dynamic(v) for v in kind.values()):
            changed.append((module, kind))
            for layer_type, v in kind.items():
                if _is_dynamic(v):
                    _original_frequencies(module, f"{layer_type}_")
            module.rope_type = {k: "default" if _is_dynamic(v) else v for k, v in kind.items()}
    try:
        yield
    finally:
        for module, kind in changed:
            module.rope_type = kind
