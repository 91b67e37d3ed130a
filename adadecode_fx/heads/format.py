"""Exit heads: one d x d adapter per exit layer, read through the model's frozen final norm + LM head."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import AdaDecodeError, HeadsMismatchError

WEIGHTS_FILE = "heads.safetensors"
SHIPPED = Path(__file__).parent / "shipped"  # trained heads for zoo models, one folder per zoo name


def shipped_heads(name: str) -> Path | None:
    """Folder of the heads that ship with the package for zoo model ``name``, if any."""
    folder = SHIPPED / str(name)
    return folder if (folder / WEIGHTS_FILE).exists() else None


def find_shipped_heads(model) -> Path | None:
    """The shipped heads folder whose fingerprint matches ``model``, if any."""
    fp = model_fingerprint(model)
    for folder in sorted(SHIPPED.glob("*")):
        meta = folder / "heads.json"
        if meta.exists() and json.loads(meta.read_text()).get("fingerprint") == fp:
            return folder
    return None


FORMAT = "adadecode-fx/exit-heads/1"


def model_fingerprint(model) -> str:
    """Identify the model a head belongs to: architecture numbers plus a sample of the LM head weights.

    The sample is rounded to bfloat16 so the fp32 and bf16 loads of one checkpoint share a fingerprint.
    """
    cfg = model.config
    h = hashlib.sha256()
    h.update(json.dumps([getattr(cfg, "model_type", ""), cfg.hidden_size, cfg.num_hidden_layers,
                         cfg.vocab_size]).encode())
    w = model.get_output_embeddings().weight.detach()
    rows = torch.cat([w[:8], w[-8:]]).to(torch.bfloat16).to(torch.float32).cpu().contiguous()
    h.update(rows.numpy().tobytes())
    return h.hexdigest()[:16]


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
        if self.metadata.get("recommended_threshold") is not None:
            rec["threshold"] = float(self.metadata["recommended_threshold"])
        return rec

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.weights)

    def weight(self, layer: int) -> torch.Tensor:
        if layer not in self.weights:
            raise HeadsMismatchError(f"no exit head for layer {layer}; these heads cover layers {list(self.layers)}")
        return self.weights[layer]

    @classmethod
    def identity(cls, model, layers) -> "ExitHeads":
        """Untrained heads (the 'logit lens'): useful for tests and as the training start point."""
        d, n = model.config.hidden_size, model.config.num_hidden_layers
        layers = [int(x) for x in layers]
        bad = [x for x in layers if not 0 <= x < n - 1]
        if bad:
            raise AdaDecodeError(f"exit layers {bad} out of range for a {n}-layer model (use 0..{n - 2})")
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
        fp = model_fingerprint(model)
        if fp != self.fingerprint:
            raise HeadsMismatchError(
                f"these heads were trained for another model (fingerprint {self.fingerprint}, this model "
                f"{fp}); use heads made for this checkpoint")
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
        (d / "heads.json").write_text(json.dumps({k: (json.loads(v) if k in ("layers", "metadata") else v)
                                                  for k, v in meta.items()}, indent=2))
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
        heads = cls(weights, meta["fingerprint"], int(meta["hidden_size"]), int(meta["num_layers"]),
                    json.loads(meta.get("metadata", "{}")), vocab)
        return heads.check(model) if model is not None else heads
