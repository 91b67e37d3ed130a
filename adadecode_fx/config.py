"""User-facing settings, validated in one place."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .errors import AdaDecodeError

BACKENDS = ("eager", "inductor", "onnxruntime", "tensorrt")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "float64": "float64", "fp64": "float64"}


def canonical_dtype(name: str) -> str:
    if name == "auto":
        return "auto"
    key = str(name).replace("torch.", "")
    if key not in DTYPES:
        raise AdaDecodeError(f"unknown dtype {name!r}: use one of fp32, bf16, fp16, fp64")
    return DTYPES[key]


@dataclass
class AdaDecodeConfig:
    """How AdaDecode decodes.

    exit_layers: decoder-layer indices (0-based) after which an exit probe runs; strictly increasing and
        below the last layer. Empty means "take them from the heads".
    threshold: gamma; a probe whose max probability is >= threshold emits its token early. In (0, 1].
    max_pending: at most this many early tokens wait for verification; when full, the token runs full depth.
    dtype: compute dtype of the model and heads.
    backend: how segments are executed: "eager" (the default; token-exact with HF greedy in bf16 too),
        "inductor" (torch.compile; token-equal in our fp32/fp64 tests, but its fused bf16 code rounds
        differently from eager ATen, so bf16 output can part from HF's), "onnxruntime", "tensorrt".
    kv_bucket: attention reads the KV buffers in slices rounded up to this many positions, so that
        shapes repeat for compiled segments. 1 (exact length) by default: in bf16 a padded, masked
        attention rounds differently from HF's and can flip a near-tie (seen on SmolLM2, HumanEval/10).
    """

    exit_layers: tuple[int, ...] = ()
    threshold: float = 0.75
    max_pending: int = 5
    dtype: str = "auto"
    backend: str = "eager"
    kv_bucket: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.exit_layers, (str, bytes)) or any(
                isinstance(x, bool) or not float(x).is_integer() for x in self.exit_layers):
            raise AdaDecodeError(f"exit_layers must be a sequence of integers, got {self.exit_layers!r}")
        self.exit_layers = tuple(int(x) for x in self.exit_layers)
        self.dtype = canonical_dtype(self.dtype)
        self.validate()

    def validate(self, num_layers: int | None = None) -> "AdaDecodeConfig":
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0.0 < float(t) <= 1.0):
            raise AdaDecodeError(f"threshold must be in (0, 1], got {t!r}; the paper uses 0.75")
        if isinstance(self.max_pending, bool) or not isinstance(self.max_pending, int) or self.max_pending < 0:
            raise AdaDecodeError(f"max_pending must be an integer >= 0, got {self.max_pending!r}")
        if self.backend not in BACKENDS:
            raise AdaDecodeError(f"unknown backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if isinstance(self.kv_bucket, bool) or not isinstance(self.kv_bucket, int) or self.kv_bucket < 1:
            raise AdaDecodeError(f"kv_bucket must be a positive integer, got {self.kv_bucket!r}")
        layers = self.exit_layers
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise AdaDecodeError(f"exit_layers must be strictly increasing, got {list(layers)}")
        if num_layers is not None:
            bad = [x for x in layers if not 0 <= x < num_layers - 1]
            if bad:
                raise AdaDecodeError(
                    f"exit layers {bad} out of range: this model has {num_layers} decoder layers, so exit "
                    f"layers must lie in 0..{num_layers - 2} (exiting after the last layer is plain decoding)")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "AdaDecodeConfig":
        return cls(**json.loads(text))
