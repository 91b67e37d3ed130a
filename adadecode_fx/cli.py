"""Command line: ``adadecode generate ...`` (more subcommands join as they land)."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import AdaDecodeError


def _int_list(text, flag) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise AdaDecodeError(f"{flag} must be comma-separated integers such as 8,16; got {text!r}") from None


def _generate(args) -> int:
    import torch

    from . import models
    from .config import AdaDecodeConfig
    from .data import chat_prompt
    from .heads import ExitHeads
    from .runtime import AdaDecoder

    if not args.prompt or not args.prompt.strip():
        raise AdaDecodeError("--prompt is empty: give the text to continue")
    layers = _int_list(args.exit_layers, "--exit-layers")
    torch.manual_seed(0)
    model, tokenizer = models.load(args.model, dtype=args.dtype)
    if args.heads:
        heads = ExitHeads.load(args.heads, model)
    elif layers:
        heads = ExitHeads.identity(model, layers)
    else:
        heads = None
    config = AdaDecodeConfig(exit_layers=layers, threshold=args.threshold, max_pending=args.max_pending)
    decoder = AdaDecoder(model, heads, config)
    text = chat_prompt(tokenizer, args.prompt) if args.chat else args.prompt
    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise AdaDecodeError("the prompt tokenizes to nothing: give some text")
    result = decoder.generate(ids, max_new_tokens=args.max_new_tokens)
    out_text = tokenizer.decode(result.new_tokens, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"model": args.model, "prompt": text, "prompt_ids": ids[0].tolist(),
                          "generated_ids": result.new_tokens, "text": out_text,
                          "config": json.loads(decoder.config.to_json()),
                          "stats": result.stats.to_dict()}))
    else:
        print(text + out_text)
        print(f"[adadecode] {result.stats.summary()}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adadecode", description="AdaDecode for Hugging Face decoders")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="greedy AdaDecode generation for one prompt")
    g.add_argument("--model", default="smollm2-135m", help="zoo name (smollm2-135m, qwen2.5-coder-0.5b) or HF dir")
    g.add_argument("--heads", help="directory with trained exit heads (heads.safetensors)")
    g.add_argument("--exit-layers", help="comma-separated exit layers; without --heads uses untrained heads")
    g.add_argument("--threshold", type=float, default=0.75, help="exit when head confidence >= this (0, 1]")
    g.add_argument("--max-pending", type=int, default=5, help="early tokens awaiting verification at most")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--dtype", default="float32", help="fp32 | bf16 | fp16")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    g.add_argument("--prompt", required=True)
    g.set_defaults(func=_generate)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AdaDecodeError as e:
        print(f"adadecode: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
