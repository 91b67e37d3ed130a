"""Per-layer K/V buffers where deeper layers may lag behind shallower ones.

Layer ``l`` holds a contiguous filled prefix ``[0, fill[l])`` of its static buffer. Fill lengths never
increase with depth. Positions in ``[fill[l+1], fill[l])`` have passed layer ``l`` but not ``l+1``: their
layer-``l`` outputs wait in ``parked[l]`` until the next pass through layer ``l+1`` takes them along.
Rollback only moves fill lengths: stale rows past ``fill`` are masked by position and overwritten later,
so memory stays flat however often we roll back.
"""
from __future__ import annotations

import torch


class KVState:
    def __init__(self, kv_shapes, capacity: int, dtype, device, bucket: int):
        self.capacity = capacity
        self.bucket = bucket
        self.buffers = [
            (torch.zeros(ks[0], ks[1], capacity, ks[3], dtype=dtype, device=device),
             torch.zeros(vs[0], vs[1], capacity, vs[3], dtype=dtype, device=device))
            for ks, vs in kv_shapes]
        self.fill = [0] * len(kv_shapes)
        self.parked: dict[int, torch.Tensor] = {}

    def views(self, upto: int):
        """Buffers cut to ``upto`` positions rounded up to the bucket (attention reads only that much)."""
        if upto > self.capacity:
            raise RuntimeError(f"KV capacity {self.capacity} exceeded ({upto})")
        s = min(self.capacity, -(-upto // self.bucket) * self.bucket)
        return [(k[:, :, :s], v[:, :, :s]) for k, v in self.buffers]

    def park(self, layer: int, hidden: torch.Tensor) -> None:
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
