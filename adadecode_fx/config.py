"""User-facing settings, validated in one place."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .errors import AdaDecodeError

BACKENDS = ("eager", "inductor", "onnxruntime", "tensorrt", "cudagraphs")
DEFAULT_THRESHOLD = 0.75  # the paper's gamma, for heads that were never calibrated (eval-heads --set-threshold)
DEFAULT_MAX_PENDING = 5   # the paper's limit on early tokens waiting for verification
# options that may also come through ``extra`` (an older spelling), moved to their typed fields
_EXTRA_FIELDS = ("script_rows", "onnx_dir", "onnx_providers")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "float64": "float64", "fp64": "float64"}


def check_names(given, allowed, what: str) -> None:
    """Refuse keys of ``given`` that are not in ``allowed``, naming the closest valid one (a typo in an
    option must not be ignored, nor end in a TypeError)."""
    import difflib

    unknown = sorted(set(given) - set(allowed))
    if not unknown:
        return
    named = []
    for name in unknown:
        close = difflib.get_close_matches(str(name), [str(a) for a in allowed], n=1)
        named.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    raise AdaDecodeError(f"unknown {what} {', '.join(named)}; valid: {', '.join(allowed)}")


def config_fields() -> tuple[str, ...]:
    """`AdaDecodeConfig`'s field names (what a dict of options may hold)."""
    return tuple(f.name for f in dataclasses.fields(AdaDecodeConfig))


def canonical_dtype(name: str) -> str:
    if name == "auto":
        return "auto"
    key = str(name).replace("torch.", "")
    if key not in DTYPES:
        raise AdaDecodeError(f"unknown dtype {name!r}: use one of fp32, bf16, fp16, fp64")
    return DTYPES[key]


def parse_threshold(value):
    """A threshold as `AdaDecodeConfig` keeps it: None, a float, or ``{layer: gamma}`` with int keys (JSON and
    heads metadata give string keys; the CLI gives ``"0.9"`` or ``"7:0.8,23:0.95"``). Values are range-checked
    by `AdaDecodeConfig.validate`."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip()
        if ":" not in text:
            try:
                return float(text)
            except ValueError:
                raise AdaDecodeError(f"threshold {value!r} is not a number; give e.g. 0.9 or 7:0.8,23:0.95") from None
        pairs = [p.split(":") for p in text.split(",") if p.strip()]
        if not pairs or any(len(p) != 2 for p in pairs):
            raise AdaDecodeError(f"threshold {value!r}: write one gamma (0.9) or LAYER:GAMMA pairs (7:0.8,23:0.95)")
        value = dict(pairs)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            try:
                layer, gamma = int(str(k).strip()), float(str(v).strip()) if isinstance(v, str) else v
            except ValueError:
                raise AdaDecodeError(f"threshold {value!r}: layers must be integers and gammas numbers") from None
            out[layer] = gamma
        return dict(sorted(out.items()))
    if isinstance(value, int):
        return float(value)
    return value


def check_device(name: str) -> str:
    """``name`` if it is a device the model can be moved to here (cpu, cuda, cuda:N), else an error."""
    import torch

    try:
        device = torch.device(str(name))
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise AdaDecodeError(f"unknown device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AdaDecodeError(f"device {name!r} but no CUDA GPU is visible (torch.cuda.is_available() is False); "
                                 "use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AdaDecodeError(f"device {name!r} but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return str(device)


@dataclass
class AdaDecodeConfig:
    """How AdaDecode decodes.

    exit_layers: decoder-layer indices (0-based) after which an exit probe runs; strictly increasing and
        below the last layer. Empty means "take them from the heads".
    threshold: gamma; a probe whose max probability is >= threshold emits its token early. In (0, 1].
        One value for every exit layer, or a mapping ``{layer: gamma}`` (an exit after the last layer only
        drafts, so it wants a gamma near 1 while a deep exit pays at a lower one); a mapping with exit_layers
        left empty also chooses the exit layers. None: the heads' calibrated value (``eval-heads
        --set-threshold``), else DEFAULT_THRESHOLD.
    max_pending: at most this many early tokens wait for verification; when full, the token runs full depth.
    dtype: compute dtype of the model and heads.
    backend: how segments are executed: "eager" (the default; token-exact with HF greedy in bf16 too),
        "inductor" (torch.compile; token-equal in our fp32/fp64 tests, but its fused bf16 code rounds
        differently from eager ATen, so bf16 output can part from HF's), "onnxruntime", "tensorrt",
        "cudagraphs" (static K/V buffers, attention over their whole capacity, one CUDA graph per run of
        layers between exit layers and block length; on a CPU the same static program runs uncaptured).
    kv_bucket: attention reads the KV buffers in slices rounded up to this many positions, so that
        shapes repeat for compiled segments. 1 (exact length) by default: in bf16 a padded, masked
        attention rounds differently from HF's and can flip a near-tie (seen on SmolLM2, HumanEval/10).
    script_rows: backend "eager": run one-row layer steps as TorchScript traces of the same ATen calls
        (bit-identical, less Python per call); False keeps the FX code.
    max_cache_len: backend "cudagraphs": slots in its static K/V buffers (prompt + new tokens + 1 must
        fit). None: 256, grown to the next multiple of 256 when a generation needs more (which recaptures
        every graph). Attention reads all of them at every step, so do not make it much larger than needed.
    compile_segments: backend "cudagraphs": compile the static segments with inductor (fused kernels, one
        template per kind of layer, as backend "inductor" does) before capturing them; without it the
        graphs replay ATen's kernels one by one. None (the default): on a GPU, where inductor's kernels
        made the graphs 1.8x faster than ATen's (Qwen2.5-Coder-0.5B bf16 on an H200, docs/gpu.md), and not
        elsewhere. Costs the compile at construction (12 s for that model on an H200).
    onnx_dir: backend "onnxruntime": export the segments here (default: a temporary directory).
    onnx_providers: backend "onnxruntime": ORT execution providers (default: CUDA if present, else CPU).
    extra: the same three options as a dict (older spelling); any other key is an error.
    """

    exit_layers: tuple[int, ...] = ()
    threshold: float | dict[int, float] | None = None
    max_pending: int = DEFAULT_MAX_PENDING
    dtype: str = "auto"
    backend: str = "eager"
    kv_bucket: int = 1
    script_rows: bool = True
    max_cache_len: int | None = None
    compile_segments: bool | None = None
    onnx_dir: str | None = None
    onnx_providers: tuple[str, ...] | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        unknown = sorted(set(self.extra or {}) - set(_EXTRA_FIELDS))
        if unknown:
            raise AdaDecodeError(f"unknown option(s) {unknown} in extra; the typed options are "
                                 f"{', '.join(_EXTRA_FIELDS)} (pass them as AdaDecodeConfig fields)")
        for name in _EXTRA_FIELDS:
            if name in (self.extra or {}):
                setattr(self, name, self.extra[name])
        self.extra = {}
        if self.onnx_providers is not None:
            self.onnx_providers = tuple(self.onnx_providers)
        if self.onnx_dir is not None:
            self.onnx_dir = str(self.onnx_dir)
        if isinstance(self.exit_layers, (str, bytes)) or any(
                isinstance(x, bool) or not float(x).is_integer() for x in self.exit_layers):
            raise AdaDecodeError(f"exit_layers must be a sequence of integers, got {self.exit_layers!r}")
        self.exit_layers = tuple(int(x) for x in self.exit_layers)
        if isinstance(self.threshold, dict):
            self.threshold = parse_threshold(self.threshold)
        self.dtype = canonical_dtype(self.dtype)
        self.validate()

    def validate(self, num_layers: int | None = None) -> "AdaDecodeConfig":
        for t in (self.threshold.values() if isinstance(self.threshold, dict) else [self.threshold]):
            if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < float(t) <= 1.0):
                raise AdaDecodeError(f"threshold must be in (0, 1], got {t!r}; the paper uses {DEFAULT_THRESHOLD}")
        if not isinstance(self.script_rows, bool):
            raise AdaDecodeError(f"script_rows must be True or False, got {self.script_rows!r}")
        if self.compile_segments is not None and not isinstance(self.compile_segments, bool):
            raise AdaDecodeError(f"compile_segments must be True, False or None (on a GPU only), got "
                                 f"{self.compile_segments!r}")
        if self.compile_segments and self.backend != "cudagraphs":
            raise AdaDecodeError(f"compile_segments applies to backend='cudagraphs' only, not {self.backend!r} "
                                 "(backend='inductor' compiles every segment already)")
        if isinstance(self.max_pending, bool) or not isinstance(self.max_pending, int) or self.max_pending < 0:
            raise AdaDecodeError(f"max_pending must be an integer >= 0, got {self.max_pending!r}")
        if self.backend not in BACKENDS:
            raise AdaDecodeError(f"unknown backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        m = self.max_cache_len
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 2):
            raise AdaDecodeError(f"max_cache_len must be an integer >= 2 or None, got {m!r}")
        if isinstance(self.kv_bucket, bool) or not isinstance(self.kv_bucket, int) or self.kv_bucket < 1:
            raise AdaDecodeError(f"kv_bucket must be a positive integer, got {self.kv_bucket!r}")
        layers = self.exit_layers
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise AdaDecodeError(f"exit_layers must be strictly increasing, got {list(layers)}")
        if num_layers is not None:
            bad = [x for x in layers if not 0 <= x < num_layers]
            if bad:
                raise AdaDecodeError(
                    f"exit layers {bad} out of range: this model has {num_layers} decoder layers, so exit "
                    f"layers must lie in 0..{num_layers - 1} ({num_layers - 1}, the last, drafts from the "
                    "shortlist head and defers only the LM head)")
        if isinstance(self.threshold, dict) and layers:
            missing = [x for x in layers if x not in self.threshold]
            unused = [x for x in self.threshold if x not in layers]
            if missing or unused:
                raise AdaDecodeError(
                    f"threshold {self.threshold} and exit_layers {list(layers)} disagree"
                    + (f": no gamma for exit layer(s) {missing}" if missing else "")
                    + (f": gamma for layer(s) {unused} that are not exit layers" if unused else "")
                    + "; give one gamma per exit layer, a single gamma, or leave exit_layers empty")
        return self

    def gamma(self, layer: int) -> float:
        """The threshold at exit layer ``layer`` (of a resolved config)."""
        return self.threshold[layer] if isinstance(self.threshold, dict) else self.threshold

    def resolve(self, heads, num_layers: int) -> "AdaDecodeConfig":
        """The settings a decoder runs with; the one place defaults are decided. Fields set here win; exit
        layers left empty come from the heads' calibration, else every layer the heads cover; a threshold
        left None from the calibration, else DEFAULT_THRESHOLD."""
        calibrated = heads.recommended() if heads is not None else {}
        given = self.threshold
        layers = (self.exit_layers or (tuple(sorted(given)) if isinstance(given, dict) else ())
                  or calibrated.get("exit_layers") or (heads.layers if heads is not None else ()))
        threshold = given if given is not None else parse_threshold(calibrated.get("threshold", DEFAULT_THRESHOLD))
        if isinstance(threshold, dict) and given is None:  # calibrated per layer: layers it never saw get the default
            threshold = {x: threshold.get(x, DEFAULT_THRESHOLD) for x in layers}
        if isinstance(threshold, dict) and len(set(threshold.values())) == 1 and set(threshold) == set(layers):
            threshold = next(iter(threshold.values()))
        return dataclasses.replace(self, exit_layers=tuple(layers), threshold=threshold).validate(num_layers)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "AdaDecodeConfig":
        return cls(**json.loads(text))
