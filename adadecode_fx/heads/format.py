"""Exit heads: one d x d adapter per exit layer, read through the model's frozen final norm + LM head."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import AdaDecodeError, HeadsMismatchError

WEIGHTS_FILE = "heads.safetensors"
JSON_FILE = "heads.json"  # a readable copy of the weights file's metadata; the weights file is what loads
SHIPPED = Path(__file__).parent / "shipped"  # trained heads for zoo models, one folder per zoo name


def shipped_heads(name: str) -> Path | None:
    """Folder of the heads that ship with the package for zoo model ``name``, if any."""
    folder = SHIPPED / str(name)
    return folder if (folder / WEIGHTS_FILE).exists() else None


def heads_for(name: str, model) -> Path | None:
    """The shipped heads for a model loaded as ``name``: by zoo name, else by the model's fingerprint (a
    local copy of a zoo model's checkpoint, loaded from its folder)."""
    return shipped_heads(name) or find_shipped_heads(model)


def find_shipped_heads(model) -> Path | None:
    """The shipped heads folder whose fingerprint matches ``model``, if any."""
    fps = model_fingerprints(model)
    for folder in sorted(SHIPPED.glob("*")):
        weights = folder / WEIGHTS_FILE
        if weights.exists() and _read_metadata(weights).get("fingerprint") in fps:
            return folder
    return None


FORMAT = "adadecode-fx/exit-heads/1"


def _digest(model, sample) -> str:
    cfg = model.config
    h = hashlib.sha256()
    h.update(json.dumps([getattr(cfg, "model_type", ""), cfg.hidden_size, cfg.num_hidden_layers,
                         cfg.vocab_size]).encode())
    h.update(sample.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _lm_head_sample(model) -> torch.Tensor:
    w = model.get_output_embeddings().weight.detach()
    return torch.cat([w[:8], w[-8:]])


def model_fingerprint(model) -> str:
    """Identify the model a head belongs to: architecture numbers plus the sign bits of a sample of the
    LM head weights. Rounding keeps the sign bit (even a value that underflows to zero), so every dtype
    a checkpoint is loaded in (fp32, bf16, fp16, fp64) has the same fingerprint."""
    return _digest(model, torch.signbit(_lm_head_sample(model)))


def model_fingerprints(model) -> tuple[str, ...]:
    """Every fingerprint that identifies ``model`` in a heads file: `model_fingerprint`, or the digest of
    the sample rounded to bf16, which heads files may carry instead (fp32 and bf16 loads reproduce it;
    an fp16 load cannot, as fp32 -> fp16 -> bf16 rounds differently from fp32 -> bf16)."""
    rounded = _lm_head_sample(model).to(torch.bfloat16).to(torch.float32)
    return model_fingerprint(model), _digest(model, rounded)


def _read_metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001  (not a safetensors file: no fingerprint to match)
        return {}


class ExitHeads:
    """Adapters ``T_l`` (logits = LM_head(norm(T_l h_l))) for exit layers ``layers``."""

    def __init__(self, weights: dict[int, torch.Tensor], fingerprint: str, hidden_size: int,
                 num_layers: int, metadata: dict | None = None, vocab: torch.Tensor | None = None):
        self.weights = {int(k): v for k, v in sorted(weights.items())}
        # optional shortlist of token ids the probes score (see ExitProbe); None = full vocabulary
        self.vocab = None if vocab is None else torch.as_tensor(vocab, dtype=torch.long)
        self.fingerprint = fingerprint
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.metadata = dict(metadata or {})
        for layer, w in self.weights.items():
            if tuple(w.shape) != (hidden_size, hidden_size):
                raise HeadsMismatchError(f"head for layer {layer} has shape {tuple(w.shape)}, "
                                         f"expected ({hidden_size}, {hidden_size})")

    def recommended(self) -> dict:
        """Exit layers and threshold chosen by ``eval-heads --set-threshold`` (empty if never calibrated),
        as `AdaDecodeConfig` fields."""
        rec = {}
        if self.metadata.get("recommended_exit_layers"):
            rec["exit_layers"] = tuple(self.metadata["recommended_exit_layers"])
        t = self.metadata.get("recommended_threshold")
        if t is not None:  # one gamma, or {layer: gamma} (JSON keys are strings)
            rec["threshold"] = {int(k): float(v) for k, v in t.items()} if isinstance(t, dict) else float(t)
        return rec

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.weights)

    def weight(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s adapter. The last layer has one whether trained or not: the identity, since
        what follows that layer is the model's own final norm and LM head (its probe is them, over the
        shortlist)."""
        if layer not in self.weights and layer == self.num_layers - 1:
            return torch.eye(self.hidden_size)
        if layer not in self.weights:
            raise HeadsMismatchError(f"no exit head for layer {layer}; these heads cover layers {list(self.layers)}")
        return self.weights[layer]

    @classmethod
    def identity(cls, model, layers) -> "ExitHeads":
        """Untrained heads (the 'logit lens'): useful for tests and as the training start point."""
        d, n = model.config.hidden_size, model.config.num_hidden_layers
        layers = [int(x) for x in layers]
        bad = [x for x in layers if not 0 <= x < n]
        if bad:
            raise AdaDecodeError(f"exit layers {bad} out of range for a {n}-layer model (use 0..{n - 1})")
        return cls({l: torch.eye(d) for l in layers}, model_fingerprint(model), d, n, {"trained": False})

    @classmethod
    def random(cls, model, layers, scale: float = 1.0, seed: int = 0) -> "ExitHeads":
        """Identity plus Gaussian noise: deliberately poor heads, for tests that need many rejections."""
        heads = cls.identity(model, layers)
        g = torch.Generator().manual_seed(seed)
        d = heads.hidden_size
        for l in heads.weights:
            heads.weights[l] = heads.weights[l] + scale * torch.randn(d, d, generator=g) / d ** 0.5
        heads.metadata["random"] = {"scale": scale, "seed": seed}
        return heads

    def check(self, model) -> "ExitHeads":
        cfg = model.config
        if cfg.hidden_size != self.hidden_size or cfg.num_hidden_layers != self.num_layers:
            raise HeadsMismatchError(
                f"these heads are for a model with hidden size {self.hidden_size} and {self.num_layers} layers, "
                f"but the model has {cfg.hidden_size} and {cfg.num_hidden_layers}: train heads for this model "
                "with `adadecode train-heads` or pass the heads made for it")
        if self.vocab is not None and (self.vocab.min() < 0 or self.vocab.max() >= cfg.vocab_size):
            raise HeadsMismatchError(f"the heads' vocabulary shortlist has ids outside this model's vocabulary "
                                     f"({cfg.vocab_size}); use heads made for this model")
        if self.fingerprint not in model_fingerprints(model):
            raise HeadsMismatchError(
                f"these heads were trained for another model (fingerprint {self.fingerprint}, this model "
                f"{model_fingerprint(model)}); use heads made for this checkpoint")
        return self

    def save(self, directory) -> Path:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "hidden_size": str(self.hidden_size),
                "num_layers": str(self.num_layers), "layers": json.dumps(list(self.layers)),
                "metadata": json.dumps(self.metadata)}
        tensors = {f"layer_{l}": w.detach().float().contiguous().cpu() for l, w in self.weights.items()}
        if self.vocab is not None:
            tensors["vocab"] = self.vocab.contiguous().cpu()
        save_file(tensors, str(d / WEIGHTS_FILE), metadata=meta)
        (d / JSON_FILE).write_text(json.dumps(_readable(meta), indent=2))
        return d

    @classmethod
    def load(cls, directory, model=None) -> "ExitHeads":
        from safetensors import safe_open

        path = Path(directory)
        path = path / WEIGHTS_FILE if path.is_dir() else path
        if not path.exists():
            raise HeadsMismatchError(f"no heads file at {path}: pass the directory written by `adadecode train-heads`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                weights = {int(k.split("_")[1]): f.get_tensor(k) for k in f.keys() if k.startswith("layer_")}
                vocab = f.get_tensor("vocab") if "vocab" in f.keys() else None
        except Exception as e:
            raise HeadsMismatchError(f"{path} is not a readable heads file ({e})") from e
        if meta.get("format") != FORMAT:
            raise HeadsMismatchError(f"{path} is not an adadecode-fx heads file (format {meta.get('format')!r})")
        if path.name == WEIGHTS_FILE:
            _check_readable_copy(path.with_name(JSON_FILE), meta)
        heads = cls(weights, meta["fingerprint"], int(meta["hidden_size"]), int(meta["num_layers"]),
                    json.loads(meta.get("metadata", "{}")), vocab)
        return heads.check(model) if model is not None else heads


def _readable(meta: dict) -> dict:
    """heads.json's content for the safetensors metadata ``meta`` (JSON strings unpacked)."""
    return {k: (json.loads(v) if k in ("layers", "metadata") else v) for k, v in meta.items()}


def _check_readable_copy(path: Path, meta: dict) -> None:
    """heads.json is written next to the weights for people to read; loading never takes anything from
    it, so one that is broken or edited by hand is refused rather than silently ignored."""
    if not path.exists():
        return
    redo = ("restore it with ExitHeads.load(DIR).save(DIR) (or delete it); to change a setting such as "
            "the calibrated threshold, edit ExitHeads.metadata and save, or rerun eval-heads --set-threshold")
    try:
        copy = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HeadsMismatchError(f"{path} is not valid JSON ({e}); it is the readable copy of the metadata in "
                                 f"{WEIGHTS_FILE}: {redo}") from None
    stored = _readable(meta)
    if copy != stored:
        keys = sorted(k for k in set(copy) | set(stored) if copy.get(k) != stored.get(k)) if isinstance(copy, dict) \
            else ["(not an object)"]
        raise HeadsMismatchError(f"{path} differs from the metadata in {WEIGHTS_FILE} ({', '.join(keys)}); only "
                                 f"{WEIGHTS_FILE} is read, so the difference would be ignored: {redo}")
