"""Command line: ``adadecode generate ...`` (more subcommands join as they land)."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import AdaDecodeError
from .config import BACKENDS, canonical_dtype, parse_threshold


def _int_list(text, flag) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise AdaDecodeError(f"{flag} must be comma-separated integers such as 8,16; got {text!r}") from None


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
    _at_least(args, max_new_tokens=1)
    if args.stream and len(args.prompt) > 1:
        raise AdaDecodeError("--stream prints one sequence; give one --prompt, or drop --stream for a batch")
    if args.stream and args.json:
        raise AdaDecodeError("--stream prints text as it is verified; it cannot be combined with --json")
    layers = _int_list(args.exit_layers, "--exit-layers")
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
    if args.do_sample:
        from .runtime.sampling import SamplingConfig
        sampling = dict(do_sample=True, **{**given, "seed": given.get("seed", 0)})
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


def _at_least(args, **minimums) -> None:
    for name, low in minimums.items():
        if getattr(args, name) < low:
            raise AdaDecodeError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")


def _heads_and_config(args, model, layers, **config_fields):
    """Heads and config from --heads/--exit-layers/--no-heads/--threshold: given heads (or the shipped
    ones) bring their calibrated exit layers and gamma as defaults; --exit-layers alone means untrained
    (identity) heads."""
    from .config import AdaDecodeConfig
    from .heads import ExitHeads, shipped_heads

    heads_dir = args.heads or (None if layers or args.no_heads else shipped_heads(args.model))
    if heads_dir:
        heads = ExitHeads.load(heads_dir, model)
    else:
        heads = ExitHeads.identity(model, layers) if layers else None
    config = AdaDecodeConfig(exit_layers=layers, threshold=args.threshold, max_pending=args.max_pending,
                             **config_fields)
    return heads, config


def torch_ids(ids):
    import torch

    return torch.tensor([ids], dtype=torch.long)


def _run_batch(args, decoder, tokenizer, texts, rows, sampling) -> int:
    result = decoder.generate(rows, max_new_tokens=args.max_new_tokens, **sampling)
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
        result = decoder.generate(ids, max_new_tokens=args.max_new_tokens, streamer=streamer, **sampling)
        print(f"[adadecode] {result.stats.summary()}", file=sys.stderr)
        return 0
    result = decoder.generate(ids, max_new_tokens=args.max_new_tokens, **sampling)
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


def auto_layers(num_layers: int) -> tuple[int, ...]:
    """The paper's placement: heads at 1/4, 1/2 and 3/4 of the depth."""
    return tuple(sorted({max(0, min(num_layers - 2, round(num_layers * f) - 1)) for f in (0.25, 0.5, 0.75)}))


def _train_heads(args) -> int:
    from .zoo import models
    from .zoo.data import load_prompts
    from .heads.corpus import corpus_files
    from .heads.training import TrainConfig, train_heads

    _at_least(args, epochs=1, max_prompts=1, gen_tokens=1, batch_tokens=1, shortlist=0)
    if not args.data and not args.corpus:
        raise AdaDecodeError("give training text: --data (prompts the model continues), --corpus (text read "
                             "teacher-forced), or both")
    if args.corpus:
        corpus_files(args.corpus)  # a path or glob that names nothing fails before the model loads
        if args.corpus_tokens < 1 or args.corpus_window < 2:
            raise AdaDecodeError("--corpus-tokens must be >= 1 and --corpus-window >= 2")
    given_layers = None if args.layers == "auto" else _int_list(args.layers, "--layers")
    gen_dtype = canonical_dtype(args.gen_dtype)
    canonical_dtype(args.dtype)
    records = load_prompts(args.data, n=None, split="train")[: args.max_prompts] if args.data else []
    model, tokenizer = models.load(args.model, dtype=args.dtype)
    layers = given_layers or auto_layers(model.config.num_hidden_layers)
    generator = None
    if gen_dtype != str(model.dtype).replace("torch.", ""):
        generator, _ = models.load(args.model, dtype=gen_dtype)
    cfg = TrainConfig(layers=layers, epochs=args.epochs, gen_tokens=args.gen_tokens, seed=args.seed,
                      batch_tokens=args.batch_tokens, data=args.data or "", record_ids=[r["id"] for r in records],
                      loss_vocab=args.loss_vocab, gen_dtype=gen_dtype, corpus=tuple(args.corpus or ()),
                      shortlist=args.shortlist,
                      corpus_tokens=args.corpus_tokens, corpus_window=args.corpus_window)
    heads = train_heads(model, tokenizer, [r["prompt"] for r in records], cfg, args.out, generator=generator)
    data = heads.metadata["training_data"]
    corpus = data["corpus"]
    print(f"[adadecode] heads for layers {list(heads.layers)} written to {args.out} "
          f"(final loss {heads.metadata['loss_curve'][-1][1]:.3f}; {heads.metadata['tokens']:,} tokens: "
          f"{data['continuations']['tokens']:,} from continuations"
          + (f", {corpus['tokens']:,} from the corpus" if corpus else "") + ")")
    return 0


def _eval_heads(args) -> int:
    from .zoo import models
    from .zoo.data import load_prompts
    from .heads.evaluation import head_records, measure_costs, report, write
    from .build import build_program
    from .config import AdaDecodeConfig
    from .heads import ExitHeads
    from .heads.training import distillation_sequences

    _at_least(args, n=1, max_new_tokens=1, max_pending=0)
    canonical_dtype(args.dtype)
    canonical_dtype(args.gen_dtype)
    heads = ExitHeads.load(args.heads)  # a broken heads folder fails before the model loads
    records = load_prompts(args.data, n=args.n, split="eval")
    model, tokenizer = models.load(args.model, dtype=args.dtype)
    heads.check(model)
    prompts = [r["prompt"] for r in records]
    generator = model
    if canonical_dtype(args.gen_dtype) != str(model.dtype).replace("torch.", ""):
        generator, _ = models.load(args.model, dtype=canonical_dtype(args.gen_dtype))
    seqs = distillation_sequences(generator, tokenizer, prompts, args.max_new_tokens, 16)
    del generator
    lens = [len(tokenizer(p).input_ids) for p in prompts]
    program = build_program(model, heads, AdaDecodeConfig(exit_layers=heads.layers))
    rep = report(head_records(program, heads, seqs, lens), model.config.num_hidden_layers,
                 max_pending=args.max_pending, **measure_costs(program, heads))
    rep.update(model=args.model, data=args.data, heads=str(args.heads), record_ids=[r["id"] for r in records])
    write(rep, args.json, args.plot)
    rec = rep["recommended"]
    print(f"recommended: exit layers {rec['exit_layers']} at gamma {rec['gamma']} (modelled gain "
          f"{rec['modelled_gain']:.2f}x, bound {rec['speedup_bound']:.2f}x over the same program at full depth)")
    if args.set_threshold:
        heads.metadata["recommended_threshold"] = rec["gamma"]
        heads.metadata["recommended_exit_layers"] = rec["exit_layers"]
        heads.metadata["calibration"] = {"data": args.data, "prompts": len(records), "max_new_tokens": args.max_new_tokens,
                                         **next(r for r in rep["per_subset"] if r["layers"] == rec["exit_layers"]),
                                         "oracle_speedup_bound": rep["oracle_speedup_bound"]}
        heads.save(args.heads)
    for l, d in rep["per_layer"].items():
        print(f"layer {l}: agreement {d['agreement']:.1%}")
    for r in rep["per_gamma"]:
        print(f"gamma {r['gamma']:.2f}: early-exit {r['early_exit_rate']:.1%}, acceptance "
              f"{(r['acceptance'] or 0):.1%}, {r['layers_per_token']:.1f} layers/token, "
              f"{r['deferred_rows_per_token']:.1f} deferred rows/token, modelled {r['modelled_gain']:.2f}x, "
              f"bound {r['speedup_bound']:.2f}x")
    print(f"recommended gamma {rep['recommended_gamma']}; oracle bound {rep['oracle_speedup_bound']:.2f}x; "
          f"in decoder layers: probe {rep['probe_cost_layers']:.2f}, one more row in a layer call "
          f"{rep['row_cost_layers']:.2f}, final norm + LM head {rep['epilogue_cost_layers']:.2f}")
    print("gains are over the same program at full depth, i.e. on what `adadecode bench` measures as heads_gain; "
          "the bound counts layers and probes, the modelled gain also deferred rows and LM-head calls")
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
    layers = _int_list(args.exit_layers, "--exit-layers")
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
    from .bench.runner import main as bench_main

    return bench_main(args, ["adadecode", *sys.argv[1:]])


def build_parser() -> argparse.ArgumentParser:
    from .argparse_help import HelpFormatter

    p = argparse.ArgumentParser(prog="adadecode", description="AdaDecode for Hugging Face decoders",
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, help_text):
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)

    g = command("generate", "AdaDecode generation (greedy, or sampled with --do-sample) for one prompt, or for a "
                            "batch when --prompt is repeated")
    g.add_argument("--model", default="smollm2-135m", help="zoo name (smollm2-135m, qwen2.5-coder-0.5b) or HF dir")
    g.add_argument("--heads", help="directory with trained exit heads (default: the heads shipped for a zoo model)")
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
    g.add_argument("--top-k", type=int, default=None, help="with --do-sample: keep the k most likely tokens")
    g.add_argument("--seed", type=int, default=None,
                   help="with --do-sample: the same seed gives the same text (default: 0)")
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

    from .heads.corpus import HELP as corpus_help
    t = command("train-heads", "train exit heads by self-distillation")
    t.add_argument("--model", default="smollm2-135m", help="zoo name or HF dir")
    t.add_argument("--data", help="prompts the model continues greedily: mbpp | gsm8k | xsum | PATH.jsonl with a "
                                   "'prompt' field (uses the train slice); optional with --corpus")
    t.add_argument("--corpus", action="append", metavar="PATH|GLOB|FILE.jsonl|python-stdlib|python-packages",
                   help=corpus_help)
    t.add_argument("--corpus-tokens", type=int, default=100_000,
                   help="corpus tokens to train on (rounded up to whole windows; an error if the corpus has fewer)")
    t.add_argument("--corpus-window", type=int, default=256, help="tokens per teacher-forced corpus window")
    t.add_argument("--layers", default="auto", help="auto (1/4, 1/2, 3/4 depth) or L1,L2,...")
    t.add_argument("--max-prompts", type=int, default=128, help="train prompts to use, at most")
    t.add_argument("--epochs", type=int, default=3, help="passes over the distillation tokens")
    t.add_argument("--gen-tokens", type=int, default=128, help="greedy continuation length per prompt")
    t.add_argument("--batch-tokens", type=int, default=256, help="tokens per optimiser step")
    t.add_argument("--shortlist", type=int, default=4096,
                   help="probe vocabulary: the N tokens the final layer predicts most on the training text (0: the "
                        "full vocabulary). A final token outside it can never exit early; every probe reads its rows")
    t.add_argument("--loss-vocab", choices=("shortlist", "full"), default="shortlist",
                   help="distil over the probe's shortlist (what it scores when decoding; fast) or the full vocabulary")
    t.add_argument("--dtype", default="float32", help="dtype of the model the heads are trained on")
    t.add_argument("--gen-dtype", default="float32",
                   help="dtype of the copy that writes the greedy continuations (fp32 batches well on CPU)")
    t.add_argument("--seed", type=int, default=0, help="seeds the heads' training")
    t.add_argument("--out", required=True, help="directory for heads.safetensors (+ resumable train state)")
    t.set_defaults(func=_train_heads)

    e = command("eval-heads", "calibrate exit heads on held-out prompts; JSON + PNG report")
    e.add_argument("--model", default="smollm2-135m", help="zoo name or HF dir")
    e.add_argument("--heads", required=True, help="directory with the exit heads to evaluate")
    e.add_argument("--data", required=True, help="humaneval | mbpp | gsm8k | xsum | PATH.jsonl (eval slice)")
    e.add_argument("--n", type=int, default=16, help="number of held-out prompts")
    e.add_argument("--max-new-tokens", type=int, default=128, help="greedy continuation length scored per prompt")
    e.add_argument("--max-pending", type=int, default=5,
                   help="the runtime's limit on early tokens awaiting verification, for the replayed schedule")
    e.add_argument("--dtype", default="float32", help="dtype of the model the heads are scored on")
    e.add_argument("--gen-dtype", default="float32",
                   help="dtype of the copy that writes the greedy continuations scored teacher-forced")
    e.add_argument("--json", help="write the report here")
    e.add_argument("--plot", help="write a PNG here")
    e.add_argument("--set-threshold", action="store_true",
                   help="store the recommended exit layers and gamma in the heads (generate's defaults)")
    e.set_defaults(func=_eval_heads)

    x = command("export", "export the AdaDecode program (segments, probes, heads) to run without PyTorch")
    x.add_argument("--model", default="smollm2-135m", help="zoo name or HF dir")
    x.add_argument("--heads", help="directory with trained exit heads (default: the heads shipped for a zoo model)")
    x.add_argument("--no-heads", action="store_true", help="export without exit probes (plain decoding)")
    x.add_argument("--exit-layers", help="comma-separated exit layers; without --heads uses untrained heads")
    x.add_argument("--threshold", default=None,
                   help="default gamma stored in the export: one value, or LAYER:GAMMA pairs (7:0.8,23:0.97)")
    x.add_argument("--max-pending", type=int, default=5, help="default max_pending stored in the export")
    x.add_argument("--format", default="onnx", help="onnx (ONNX Runtime: CPU, or CUDA with onnxruntime-gpu)")
    x.add_argument("--dtype", default="float32", help="fp32 (the only dtype ONNX Runtime runs well on CPU)")
    x.add_argument("--out", required=True, help="directory to write (manifest.json, *.onnx, heads/, tokenizer/)")
    x.set_defaults(func=_export)

    from .bench.runner import add_arguments as _bench_arguments
    b = command("bench", "AdaDecode vs HF greedy / static+compile / prompt lookup / early exit; JSON + PNG report")
    _bench_arguments(b)
    b.set_defaults(func=_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "threshold", None) is not None:
            args.threshold = parse_threshold(args.threshold)
        return args.func(args)
    except AdaDecodeError as e:
        print(f"adadecode: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
