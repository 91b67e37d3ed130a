"""Command line: ``adadecode generate ...`` (more subcommands join as they land)."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import AdaDecodeError
from .config import BACKENDS, canonical_dtype, parse_threshold
from .cli_checks import HEADS_DEFAULT, at_least, int_list, stop_strings
from .heads.cli import add_heads_commands
from .report_files import check_writable


def _generate(args) -> int:
    import torch

    from .zoo import models
    from .runtime import AdaDecoder
    from .runtime.prompts import check_positions

    layers, sampling = _check_generate_args(args)  # cheap checks first: loading and capturing take a while
    torch.manual_seed(0)
    if args.exported:
        decoder, tokenizer = _load_exported(args, layers)
        return _run_generation(args, decoder, tokenizer, *_tokenize(args, tokenizer), sampling)
    model, tokenizer = models.load(args.model, dtype=args.dtype)
    if args.device:
        model = model.to(args.device)
    texts, rows = _tokenize(args, tokenizer)
    check_positions(max(len(r) for r in rows), args.max_new_tokens,
                    getattr(model.config, "max_position_embeddings", None))
    heads, config = _heads_and_config(args, model, layers, backend=args.backend)
    decoder = AdaDecoder(model, heads, config)
    return _run_generation(args, decoder, tokenizer, texts, rows, sampling)


def _check_generate_args(args) -> tuple[tuple[int, ...], dict]:
    """Everything that can be checked without the model: (exit layers, sampling keywords)."""
    from .config import AdaDecodeConfig, check_device

    if not args.prompt or not all(p.strip() for p in args.prompt):
        raise AdaDecodeError("--prompt is empty: give the text to continue")
    at_least(args, max_new_tokens=1)
    if args.stream and len(args.prompt) > 1:
        raise AdaDecodeError("--stream prints one sequence; give one --prompt, or drop --stream for a batch")
    if args.stream and args.json:
        raise AdaDecodeError("--stream prints text as it is verified; it cannot be combined with --json")
    args.stop = stop_strings(args.stop)
    layers = int_list(args.exit_layers, "--exit-layers")
    AdaDecodeConfig(exit_layers=layers, threshold=args.threshold, max_pending=args.max_pending,
                    backend=args.backend, dtype=args.dtype)
    if args.heads:
        from .heads import ExitHeads
        ExitHeads.load(args.heads)  # a missing or broken heads folder fails before the model loads
    given = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "seed") if getattr(args, k) is not None}
    if given and not args.do_sample:
        raise AdaDecodeError(f"{', '.join('--' + k.replace('_', '-') for k in given)}: sampling options, used only "
                             "with --do-sample; add it, or drop them for greedy decoding")
    sampling = {}
    processors = _processors(args)
    if processors:  # greedy or sampling alike, as HF's generate applies them
        sampling["logits_processor"] = processors
    if args.do_sample:
        from .runtime.sampling import SamplingConfig
        sampling = dict(do_sample=True, **sampling, **{**given, "seed": given.get("seed", 0)})
        SamplingConfig(**{k: v for k, v in sampling.items() if k != "do_sample"})
    if args.exported:
        if args.device:
            raise AdaDecodeError("--device does not apply to --exported: ONNX Runtime runs on CUDA when "
                                 "onnxruntime-gpu is installed, else on the CPU")
        return layers, sampling
    args.device = check_device(args.device) if args.device else None
    if args.backend == "tensorrt":
        from .lower.tensorrt import check_available
        check_available(args.device or "cpu")
    elif args.backend == "onnxruntime":
        from .lower.onnxrt import check_dtype, require_onnx
        require_onnx()
        check_dtype(canonical_dtype(args.dtype))
    return layers, sampling


def _processors(args, pads=None):
    """HF logits processors from --repetition-penalty and --no-repeat-ngram-size (None when neither).
    ``pads``: per row of a left-padded batch, its pad slots, which the repetition penalty skips (as HF's
    generate builds it from the attention mask)."""
    import torch
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    out = LogitsProcessorList()
    if args.repetition_penalty is not None:
        if not args.repetition_penalty > 0:
            raise AdaDecodeError(f"--repetition-penalty must be > 0 (1.0 is no penalty), got {args.repetition_penalty}")
        ignore = None if pads is None else torch.tensor(pads)
        out.append(RepetitionPenaltyLogitsProcessor(args.repetition_penalty, prompt_ignore_length=ignore))
    if args.no_repeat_ngram_size is not None:
        at_least(args, no_repeat_ngram_size=1)
        out.append(NoRepeatNGramLogitsProcessor(args.no_repeat_ngram_size))
    return out or None


def _heads_and_config(args, model, layers, **config_fields):
    """Heads and config from --heads/--exit-layers/--no-heads/--threshold: given heads (or the shipped
    ones) bring their calibrated exit layers and gamma as defaults; --exit-layers alone means untrained
    (identity) heads."""
    from .config import AdaDecodeConfig
    from .heads import ExitHeads, heads_for
    from .notices import notice

    heads_dir = args.heads or (None if layers or args.no_heads else heads_for(args.model, model))
    if not (heads_dir or layers or args.no_heads):
        notice("no exit heads ship for this model, so it runs at full depth, without early exits: train "
               "some (adadecode train-heads --model ... --out DIR) and pass --heads DIR, or try untrained ones "
               "with --exit-layers; --no-heads runs at full depth without this note")
    if heads_dir:
        heads = ExitHeads.load(heads_dir, model)
    else:
        heads = ExitHeads.identity(model, layers) if layers else None
    config = AdaDecodeConfig(exit_layers=layers, threshold=args.threshold, max_pending=args.max_pending,
                             **config_fields)
    return heads, config


def _stop(args, tokenizer):
    """``stop(tokens)`` for the runtime from --stop (None without it)."""
    if not args.stop:
        return None
    from .api import stop_function, with_stop_strings

    return stop_function(with_stop_strings(None, args.stop, tokenizer), None)


def torch_ids(ids):
    import torch

    return torch.tensor([ids], dtype=torch.long)


def _run_batch(args, decoder, tokenizer, texts, rows, sampling) -> int:
    if sampling.get("logits_processor") is not None:  # the rows are left-padded to the longest
        width = max(map(len, rows))
        sampling = {**sampling, "logits_processor": _processors(args, [width - len(r) for r in rows])}
    result = decoder.generate(rows, max_new_tokens=args.max_new_tokens, stop=_stop(args, tokenizer), **sampling)
    outs = [tokenizer.decode(new, skip_special_tokens=True) for new in result.new_tokens]
    if args.json:
        print(json.dumps({"model": args.exported or args.model, "prompts": texts, "prompt_ids": rows,
                          "generated_ids": result.new_tokens, "texts": outs,
                          "config": json.loads(decoder.config.to_json()), "stats": result.stats.to_dict()}))
    else:
        for text, out in zip(texts, outs):
            print(text + out)
            print("-" * 40)
        print(f"[adadecode] batch of {len(rows)}: {result.stats.summary()}", file=sys.stderr)
    return 0


def _load_exported(args, layers):
    from pathlib import Path

    from .zoo import models
    from .config import AdaDecodeConfig
    from .lower.onnxrt import load_exported

    config = AdaDecodeConfig(exit_layers=layers, threshold=args.threshold, max_pending=args.max_pending)
    decoder = load_exported(args.exported, config=config)
    tok_dir = Path(args.exported) / "tokenizer"
    if tok_dir.is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    else:
        tokenizer = models.load(args.model, dtype="float32")[1]
    return decoder, tokenizer


def _tokenize(args, tokenizer) -> tuple[list[str], list[list[int]]]:
    from .zoo.data import chat_prompt

    texts = [chat_prompt(tokenizer, p) if args.chat else p for p in args.prompt]
    rows = [tokenizer(t).input_ids for t in texts]
    if not all(rows):
        raise AdaDecodeError("a prompt tokenizes to nothing: give some text")
    return texts, rows


def _run_generation(args, decoder, tokenizer, texts, rows, sampling) -> int:
    if len(rows) > 1:
        return _run_batch(args, decoder, tokenizer, texts, rows, sampling)
    text, ids = texts[0], torch_ids(rows[0])
    if args.stream:
        from transformers import TextStreamer

        # verified tokens only: an early token is printed once the last layer has confirmed it
        streamer = TextStreamer(tokenizer, skip_special_tokens=True)
        streamer.put(ids)
        result = decoder.generate(ids, max_new_tokens=args.max_new_tokens, streamer=streamer,
                                  stop=_stop(args, tokenizer), **sampling)
        print(f"[adadecode] {result.stats.summary()}", file=sys.stderr)
        return 0
    result = decoder.generate(ids, max_new_tokens=args.max_new_tokens, stop=_stop(args, tokenizer), **sampling)
    out_text = tokenizer.decode(result.new_tokens, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"model": args.exported or args.model, "prompt": text, "prompt_ids": ids[0].tolist(),
                          "generated_ids": result.new_tokens, "text": out_text,
                          "config": json.loads(decoder.config.to_json()),
                          "stats": result.stats.to_dict()}))
    else:
        print(text + out_text)
        print(f"[adadecode] {result.stats.summary()}", file=sys.stderr)
    return 0


def _export(args) -> int:
    from .zoo import models

    fmt = args.format.lower()
    if fmt == "tensorrt":
        raise AdaDecodeError("--format tensorrt is not an export format: TensorRT engines are built at load time on "
                             "the CUDA machine that runs them (AdaDecodeConfig(backend='tensorrt')); export --format onnx")
    if fmt != "onnx":
        raise AdaDecodeError(f"unknown --format {args.format!r}: the supported export format is onnx")
    from .config import AdaDecodeConfig
    from .export import export_onnx
    from .lower.onnxrt import check_dtype, require_onnx

    require_onnx()
    dtype = check_dtype(canonical_dtype(args.dtype))
    check_writable(args.out, "--out", directory=True)
    layers = int_list(args.exit_layers, "--exit-layers")
    AdaDecodeConfig(exit_layers=layers, threshold=args.threshold, max_pending=args.max_pending)
    model, tokenizer = models.load(args.model, dtype=dtype)
    heads, config = _heads_and_config(args, model, layers)
    out = export_onnx(model, heads, config, args.out, log=lambda m: print(f"[adadecode] {m}", file=sys.stderr))
    if tokenizer is not None:
        tokenizer.save_pretrained(out / "tokenizer")
    print(f"[adadecode] ONNX export of {args.model} written to {out} "
          f"(run it with: adadecode generate --exported {out} --prompt ...)")
    return 0


def _bench(args) -> int:
    from .bench.command import main as bench_main

    return bench_main(args, args.argv)


def _version() -> str:
    """The package's version and the versions it runs on (what a bug report needs), without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def of(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"
    return f"adadecode-fx {__version__} (torch {of('torch')}, transformers {of('transformers')})"


def build_parser() -> argparse.ArgumentParser:
    from .argparse_help import HelpFormatter

    p = argparse.ArgumentParser(prog="adadecode", description="AdaDecode for Hugging Face decoders",
                                formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, help_text):
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)

    g = command("generate", "AdaDecode generation (greedy, or sampled with --do-sample) for one prompt, or for a "
                            "batch when --prompt is repeated")
    g.add_argument("--model", default="smollm2-135m", help="zoo name (smollm2-135m, qwen2.5-coder-0.5b) or HF dir")
    g.add_argument("--heads", help="directory with trained exit heads " + HEADS_DEFAULT)
    g.add_argument("--no-heads", action="store_true", help="plain full-depth decoding through the captured program")
    g.add_argument("--exit-layers", help="comma-separated exit layers; without --heads uses untrained heads "
                                         "(default: the heads' calibrated layers)")
    g.add_argument("--threshold", default=None,
                   help="exit when head confidence >= this, in (0, 1]: one gamma (0.9) or one per exit layer "
                        "(7:0.8,23:0.97) (default: the heads' calibrated value, else 0.75)")
    g.add_argument("--max-pending", type=int, default=5,
                   help="at most this many early tokens wait for verification; when that many wait, the next "
                        "token runs at full depth (0: no early exits)")
    g.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens to generate per prompt (fewer if EOS comes first); prompt + this must fit the "
                        "model's max_position_embeddings")
    g.add_argument("--dtype", default="float32", help="fp32 | bf16 | fp16 | fp64")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cpu)")
    g.add_argument("--do-sample", action="store_true",
                   help="sample instead of greedy decoding; early exits keep the output distributed as plain sampling")
    g.add_argument("--temperature", type=float, default=None, help="with --do-sample (default: 1.0)")
    g.add_argument("--top-p", type=float, default=None, help="with --do-sample: nucleus sampling, in (0, 1]")
    g.add_argument("--top-k", type=int, default=None,
                   help="with --do-sample: keep the k most likely tokens (default: every token; HF's "
                        "generate(do_sample=True) keeps 50 unless told otherwise)")
    g.add_argument("--seed", type=int, default=None,
                   help="with --do-sample: the same seed gives the same text (default: 0)")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="as HF's repetition_penalty (greedy or sampling; 1.0 is none): the output stays HF's with it")
    g.add_argument("--no-repeat-ngram-size", type=int, default=None,
                   help="as HF's no_repeat_ngram_size: never repeat an n-gram of this size")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end a row once its text ends with TEXT, kept in the output (HF's stop_strings); "
                        "repeatable; \\n and \\t are a newline and a tab")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    g.add_argument("--stream", action="store_true", help="print text as tokens are verified (never rolled back)")
    g.add_argument("--backend", default="eager", choices=BACKENDS,
                   help="how segments run (inductor compiles for a minute or two first)")
    g.add_argument("--prompt", required=True, action="append",
                   help="the prompt; repeat it to decode a batch (rows are left-padded and decoded together)")
    g.add_argument("--exported", help="run from an `adadecode export --format onnx` directory with ONNX Runtime "
                                      "(no PyTorch weights; tokenizer from DIR/tokenizer, else from --model)")
    g.set_defaults(func=_generate)

    add_heads_commands(command)

    x = command("export", "export the AdaDecode program (segments, probes, heads) to run without PyTorch")
    x.add_argument("--model", default="smollm2-135m", help="zoo name or HF dir")
    x.add_argument("--heads", help="directory with trained exit heads " + HEADS_DEFAULT)
    x.add_argument("--no-heads", action="store_true", help="export without exit probes (plain decoding)")
    x.add_argument("--exit-layers", help="comma-separated exit layers; without --heads uses untrained heads")
    x.add_argument("--threshold", default=None,
                   help="default gamma stored in the export: one value, or LAYER:GAMMA pairs (7:0.8,23:0.97)")
    x.add_argument("--max-pending", type=int, default=5, help="default max_pending stored in the export")
    x.add_argument("--format", default="onnx", help="onnx (ONNX Runtime: CPU, or CUDA with onnxruntime-gpu)")
    x.add_argument("--dtype", default="float32", help="fp32 (the only dtype ONNX Runtime runs well on CPU)")
    x.add_argument("--out", required=True, help="directory to write (manifest.json, *.onnx, heads/, tokenizer/)")
    x.set_defaults(func=_export)

    from .bench.command import add_arguments as _bench_arguments
    b = command("bench", "AdaDecode vs HF greedy / static+compile / prompt lookup / early exit; JSON + PNG report")
    _bench_arguments(b)
    b.set_defaults(func=_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = ["adadecode", *(sys.argv[1:] if argv is None else argv)]  # what reports record as the command
    try:
        if getattr(args, "threshold", None) is not None:
            args.threshold = parse_threshold(args.threshold)
        return args.func(args)
    except AdaDecodeError as e:
        print(f"adadecode: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
