"""Per-layer K/V buffers where deeper layers may lag behind shallower ones.

Layer ``l`` holds a contiguous filled prefix ``[0, fill[l])`` of its static buffer. Fill lengths never
increase with depth. Positions in ``[fill[l+1], fill[l])`` have passed layer ``l`` but not ``l+1``: their
layer-``l`` outputs wait in ``parked[l]`` until the next pass through layer ``l+1`` takes them along.
Rollback only moves fill lengths: stale rows past ``fill`` are masked by position and overwritten later,
so memory stays flat however often we roll back. A layer that reads another layer's K/V (cross-layer
sharing) is handed that layer's buffers and keeps a fill length of its own, like every layer.

A batch of ``B`` rows shares the fill lengths (rows advance in lockstep). Row ``b``'s prompt is
left-padded to start at slot ``pad[b]``: its positions are ``slot - pad[b]`` and ``attention_mask``
(``[B, capacity]``, static for the whole generation) hides its pad slots from every query.
"""
from __future__ import annotations

import torch


def kv_buffers(kv_shapes, batch: int, capacity: int, dtype, device, sources=None) -> list:
    """Zeroed ``(keys, values)`` buffers ``[batch, heads, capacity, dim]`` per layer. ``sources[l]``: the
    layer whose buffers layer ``l`` reads (`passes.shared_kv`); such a layer gets that layer's, not its own.
    Default: every layer its own."""
    own = [(torch.zeros(batch, ks[1], capacity, ks[3], dtype=dtype, device=device),
            torch.zeros(batch, vs[1], capacity, vs[3], dtype=dtype, device=device))
           if sources is None or sources[l] == l else None for l, (ks, vs) in enumerate(kv_shapes)]
    return own if sources is None else [own[s] for s in sources]


class KVState:
    def __init__(self, kv_shapes, capacity: int, dtype, device, bucket: int, pad=(0,), sources=None):
        """``sources``: which layer's buffers each layer reads (`kv_buffers`)."""
        self.capacity = capacity
        self.bucket = bucket
        self.pad = [int(p) for p in pad]
        batch = len(self.pad)
        self.buffers = kv_buffers(kv_shapes, batch, capacity, dtype, device, sources)
        self.attention_mask = torch.ones(batch, capacity, dtype=torch.long, device=device)
        for b, p in enumerate(self.pad):
            self.attention_mask[b, :p] = 0
        self.fill = [0] * len(kv_shapes)
        self.parked: dict[int, torch.Tensor] = {}
        self.whole = False  # `views` gives the buffers themselves (a state `over` a static program's)

    @classmethod
    def over(cls, buffers, attention_mask: torch.Tensor, pad=(0,)) -> "KVState":
        """A state over buffers that outlive it (a static program's, which its captured graphs read at
        fixed addresses). Attention reads the whole capacity: the mask hides what the positions may not
        see, including rows left from earlier generations, so the buffers are not cleared."""
        state = cls.__new__(cls)
        state.capacity = buffers[0][0].shape[2]
        state.bucket = state.capacity
        state.pad = [int(p) for p in pad]
        state.buffers = list(buffers)
        state.attention_mask = attention_mask
        state.fill = [0] * len(state.buffers)
        state.parked = {}
        state.whole = True
        return state

    @property
    def batch(self) -> int:
        return len(self.pad)

    def row(self, b: int) -> "KVState":
        """Row ``b`` alone, sharing its buffers, with nothing filled before its first real slot: a
        prompt is prefilled one row at a time, so no query is ever a pad slot (a fully masked query
        row gives NaN in eager attention, which the next layer's K/V would spread to every row)."""
        view = KVState.__new__(KVState)
        view.capacity, view.bucket, view.pad = self.capacity, self.bucket, [self.pad[b]]
        view.buffers = [(k[b:b + 1], v[b:b + 1]) for k, v in self.buffers]
        view.attention_mask = self.attention_mask[b:b + 1]
        view.fill = [self.pad[b]] * len(self.fill)
        view.parked = {}
        view.whole = self.whole
        return view

    def views(self, upto: int):
        """Buffers cut to ``upto`` positions rounded up to the bucket (attention reads only that much)."""
        if upto > self.capacity:
            raise RuntimeError(f"KV capacity {self.capacity} exceeded ({upto})")
        if self.whole:  # a static program reads its whole buffers: no slice to make per layer and step
            return self.buffers
        s = self._width(upto)
        return [(k[:, :, :s], v[:, :, :s]) for k, v in self.buffers]

    def mask(self, upto: int) -> torch.Tensor:
        """``attention_mask`` cut like `views`."""
        return self.attention_mask[:, :self._width(upto)]

    def _width(self, upto: int) -> int:
        return min(self.capacity, -(-upto // self.bucket) * self.bucket)

    def park(self, layer: int, hidden: torch.Tensor) -> None:
        if self.whole:  # a static program's output buffer, which the next call of its graph overwrites
            hidden = hidden.clone()
        old = self.parked.get(layer)
        self.parked[layer] = hidden if old is None else torch.cat([old, hidden], dim=1)

    def take_parked(self, layer: int):
        return self.parked.pop(layer, None)

    def rollback(self, length: int) -> None:
        """Forget every position >= length in every layer. Called after a full-depth pass, when no
        hidden state is parked (a parked row would be lost)."""
        assert not self.parked, "rollback with parked rows"
        self.fill = [min(f, length) for f in self.fill]

    def pending_rows(self) -> int:
        return self.fill[0] - self.fill[-1]
