"""Zoo models by shape only: the real architecture and sizes, random weights, no weights to carry.

A GPU machine here can receive 64 MiB per call, and Qwen2.5-Coder's GGUF is 491 MB. Timing a decoding
method needs the shapes and the schedule of exits, not the trained weights, so a GPU bench builds the
model from ``configs/<name>.json`` and replays an exit schedule recorded on the real model
(`adadecode_fx.bench.replay`).

``configs/qwen2.5-coder-0.5b.json`` holds what transformers 5.24 reads from the packaged GGUF's metadata
(``load_gguf_checkpoint``: 24 layers, hidden 896, MLP 4864, 14 heads / 2 K/V heads, vocab 151936, rope
theta 1e6, RMS eps 1e-6, untied LM head, token ids); every other field is Qwen2Config's default.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import AdaDecodeError

CONFIGS = Path(__file__).with_name("configs")
# scale of the input embeddings in a decisive model: the residual stream then carries the input token
# far above what the (RMS-normalised) random layers add to it
_DECISIVE_SCALE = 1000.0


def shape_config(name: str):
    from transformers import AutoConfig

    path = CONFIGS / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS.glob("*.json"))
        raise AdaDecodeError(f"no shape config for {name!r}; shipped: {', '.join(known)}")
    fields = json.loads(path.read_text())
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def random_model(name: str, dtype="bfloat16", device="cpu", seed: int = 0, decisive: bool = True):
    """The model ``name`` with HF's random initialisation, in eval mode, EOS disabled; ``decisive``: see
    `make_decisive`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape_config(name), dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    return make_decisive(model) if decisive else model


def make_decisive(model):
    """Make ``model`` repeat its input token with a wide logit margin: input embeddings scaled up, LM head
    = the unscaled embeddings. Random weights otherwise give near-uniform logits whose argmax flips with
    rounding, so bf16 methods would part at random places and a replayed exit schedule would leave its
    recorded path. The compute per token is unchanged. In place; returns ``model``."""
    import torch

    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        model.get_output_embeddings().weight.copy_(embed)
        embed.mul_(_DECISIVE_SCALE)
    return model
