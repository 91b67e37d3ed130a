"""Exit schedules: recorded on the real model, replayed on a model of the same shape with random weights.

The work of an AdaDecode generation (which steps exit where, how many rows each block carries, which
verifications roll back) is fixed by its sequence of exit-probe outcomes. A *schedule* records, for
every probe call in order, ``[layer, output slot, exits (0/1), right (0/1)]``: whether the probe was
confident enough, and whether its token equals the final greedy token at that slot (what verification
will say). Both plug into the decoder's probe seam (`AdaDecoder(..., probe=...)`). `ReplayDecoder` runs
its real probes (their cost is part of the work) and then answers with the recorded outcome, on a
decisive shape-only model (`adadecode_fx.zoo.shapes.random_model`) whose final prediction for a slot is
the token before it: a recorded "right" early token is that token, a "wrong" one any other. The replay
therefore walks the recorded path exactly, and reports where it could not (``diverged``).
"""
from __future__ import annotations

from ..runtime.decoder import AdaDecoder

_SCHEDULED = ("early_emitted", "accepted", "rejected", "steps", "layer_rows")  # what a schedule fixes


class _Recording:
    """The heads' probe, noting every call's (layer, slot, token, confidence)."""

    def __init__(self, probe):
        self.probe, self.calls = probe, []

    def __call__(self, layer, hidden_last, rows):
        tokens, confs = self.probe(layer, hidden_last, rows)
        self.calls.append([layer, len(rows[0]), tokens[0], confs[0]])
        return tokens, confs


def record(program, prompt_ids: list[int], max_new_tokens: int) -> dict:
    """One greedy generation of one prompt over ``program`` and its schedule."""
    probe = _Recording(AdaDecoder(program).exit_probe)
    decoder = AdaDecoder(program, probe=probe)
    out = decoder.generate(prompt_ids, max_new_tokens, eos_token_id=None)
    final = list(prompt_ids) + list(out.new_tokens)
    P, gamma = len(prompt_ids), decoder.config.gamma
    probes = [[layer, slot - P, int(conf >= gamma(layer)), int(slot < len(final) and token == final[slot])]
              for layer, slot, token, conf in probe.calls]
    keep = _SCHEDULED + ("critical_path_layers",)
    return {"prompt_len": P, "new_tokens": len(out.new_tokens), "probes": probes,
            "stats": {k: getattr(out.stats, k) for k in keep}}


class _Replaying:
    """The heads' probe (it runs, and is read back), answering with the recorded outcome."""

    def __init__(self, probe, vocab_size: int):
        self.probe, self.vocab_size = probe, vocab_size
        self.start([], 0)

    def start(self, script, prompt_len: int) -> None:
        self.script, self.prompt_len, self.cursor, self.diverged = script, prompt_len, 0, 0

    def __call__(self, layer, hidden_last, rows):
        tokens, confs = self.probe(layer, hidden_last, rows)
        i, self.cursor = self.cursor, self.cursor + 1
        slot = len(rows[0]) - self.prompt_len
        if i >= len(self.script) or list(self.script[i][:2]) != [layer, slot]:
            self.diverged += 1
            return tokens, [0.0] * len(rows)
        _, _, exits, right = self.script[i]
        before = rows[0][-1]  # what the decisive model predicts for this slot
        token = before if right else (before + 1) % self.vocab_size
        return [token], [1.0 if exits else 0.0]


class ReplayDecoder:
    """A decoder over ``program`` whose exit decisions and early tokens follow a recorded schedule."""

    def __init__(self, program):
        self.probe = _Replaying(AdaDecoder(program).exit_probe, program.vocab_size)
        self.decoder = AdaDecoder(program, probe=self.probe)
        self.program, self.config = program, self.decoder.config

    def replay(self, prompt_ids: list[int], record: dict, max_new_tokens: int):
        """Generate along ``record`` (from `record`); returns the `GenerationResult` and how far the
        replay followed it. Its statistics equal the record's when it ran the record's length."""
        self.probe.start(record["probes"], len(prompt_ids))
        out = self.decoder.generate(prompt_ids, max_new_tokens, eos_token_id=None)
        p = self.probe
        followed = {"diverged": p.diverged, "probes_used": p.cursor, "probes_recorded": len(p.script),
                    "stats_equal": all(getattr(out.stats, k) == record["stats"][k] for k in _SCHEDULED)}
        return out, followed


__all__ = ["ReplayDecoder", "record"]
