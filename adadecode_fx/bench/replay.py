"""Exit schedules: recorded on the real model, replayed on a model of the same shape with random weights.

The work of an AdaDecode generation (which steps exit where, how many rows each block carries, which
verifications roll back) is fixed by its sequence of exit-probe outcomes. A *schedule* records, for
every probe call in order, ``[layer, output slot, exits (0/1), right (0/1)]``: whether the probe was
confident enough, and whether its token equals the final greedy token at that slot (what verification
will say). `ReplayDecoder` runs its real probes (their cost is part of the work) and then answers with
the recorded outcome, on a decisive shape-only model (`adadecode_fx.zoo.shapes.random_model`) whose
final prediction for a slot is the token before it: a recorded "right" early token is that token, a
"wrong" one any other. The replay therefore walks the recorded path exactly, and reports where it
could not (``diverged``).
"""
from __future__ import annotations

from ..runtime.decoder import AdaDecoder


class RecordingDecoder(AdaDecoder):
    """An `AdaDecoder` over a ready program that keeps every exit-probe outcome of its generations."""

    def __init__(self, program):
        super().__init__(program)
        self.calls: list[list] = []

    def exit_probe(self, layer, hidden_last, rows):
        tokens, confs = super().exit_probe(layer, hidden_last, rows)
        self.calls.append([layer, len(rows[0]), tokens[0], confs[0]])
        return tokens, confs

    def record(self, prompt_ids: list[int], max_new_tokens: int) -> dict:
        """One greedy generation of one prompt and its schedule."""
        self.calls = []
        out = self.generate(prompt_ids, max_new_tokens, eos_token_id=None)
        final = list(prompt_ids) + list(out.new_tokens)
        P = len(prompt_ids)
        probes = [[layer, slot - P, int(conf >= self.config.threshold), int(slot < len(final) and token == final[slot])]
                  for layer, slot, token, conf in self.calls]
        keep = ("early_emitted", "accepted", "rejected", "steps", "critical_path_layers", "layer_rows")
        return {"prompt_len": P, "new_tokens": len(out.new_tokens), "probes": probes,
                "stats": {k: getattr(out.stats, k) for k in keep}}


class ReplayDecoder(AdaDecoder):
    """An `AdaDecoder` whose exit decisions and early tokens follow a recorded schedule (see module)."""

    def __init__(self, program):
        super().__init__(program)
        self.script, self.cursor, self.prompt_len, self.diverged = [], 0, 0, 0

    def exit_probe(self, layer, hidden_last, rows):
        tokens, confs = super().exit_probe(layer, hidden_last, rows)  # the probe runs and is read back
        i, self.cursor = self.cursor, self.cursor + 1
        slot = len(rows[0]) - self.prompt_len
        if i >= len(self.script) or list(self.script[i][:2]) != [layer, slot]:
            self.diverged += 1
            return tokens, [0.0] * len(rows)
        _, _, exits, right = self.script[i]
        before = rows[0][-1]  # what the decisive model predicts for this slot
        token = before if right else (before + 1) % self.vocab_size
        return [token], [1.0 if exits else 0.0]

    def replay(self, prompt_ids: list[int], record: dict, max_new_tokens: int):
        """Generate along ``record`` (from `RecordingDecoder.record`); returns the `GenerationResult`
        and how far the replay followed it."""
        self.script, self.cursor, self.prompt_len, self.diverged = record["probes"], 0, len(prompt_ids), 0
        out = self.generate(prompt_ids, max_new_tokens, eos_token_id=None)
        keep = record["stats"]
        followed = {"diverged": self.diverged, "probes_used": self.cursor, "probes_recorded": len(self.script),
                    "stats_equal": all(getattr(out.stats, k) == v for k, v in keep.items())}
        return out, followed


__all__ = ["RecordingDecoder", "ReplayDecoder"]
