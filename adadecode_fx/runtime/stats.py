"""Per-call statistics of an AdaDecode generation."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class DecodeStats:
    num_layers: int
    prompt_tokens: int = 0
    batch_size: int = 1
    new_tokens: int = 0          # over all rows of a batch, up to each row's end
    token_exit_layers: list = field(default_factory=list)  # per output slot (all rows): layer that predicted it
    early_emitted: int = 0       # early predictions made (accepted + rejected + discarded by a rollback)
    accepted: int = 0            # early predictions confirmed by the final layer
    rejected: int = 0            # verifications that found a wrong early token (each causes a rollback)
    steps: int = 0               # passes through the layer stack (prefill excluded)
    critical_path_layers: int = 0  # layer segments run one after another, over all steps; the prompt
    #                                 pass counts once, at full depth, for the first token it makes
    layer_rows: int = 0          # rows processed by layer segments (deferred rows included)
    seconds: float = 0.0

    @property
    def early_exit_rate(self) -> float:
        n = len(self.token_exit_layers)
        return sum(1 for l in self.token_exit_layers if l < self.num_layers - 1) / n if n else 0.0

    @property
    def acceptance_rate(self) -> float:
        checked = self.accepted + self.rejected
        return self.accepted / checked if checked else 0.0

    @property
    def critical_path_per_token(self) -> float:
        slots = len(self.token_exit_layers)
        return self.critical_path_layers / slots if slots else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def exit_histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.token_exit_layers).items()))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(early_exit_rate=self.early_exit_rate, acceptance_rate=self.acceptance_rate,
                 critical_path_per_token=self.critical_path_per_token,
                 tokens_per_second=self.tokens_per_second,
                 exit_histogram={str(k): v for k, v in self.exit_histogram().items()})
        return d

    def summary(self) -> str:
        return (f"{self.new_tokens} tokens, {self.tokens_per_second:.1f} tok/s, early-exit rate "
                f"{self.early_exit_rate:.0%}, {self.accepted} accepted / {self.rejected} rejected, "
                f"{self.critical_path_per_token:.1f} of {self.num_layers} layers per token on the critical path")
