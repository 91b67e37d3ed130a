"""The exit-head subcommands of ``adadecode``: ``train-heads`` and ``eval-heads``."""
from __future__ import annotations

from ..cli_checks import at_least, int_list
from ..config import canonical_dtype
from ..errors import AdaDecodeError
from ..report_files import check_writable


def add_heads_commands(command) -> None:
    """Register both subcommands; ``command(name, help) -> ArgumentParser`` makes one."""
    from .corpus import HELP as corpus_help

    t = command("train-heads", "train exit heads by self-distillation")
    t.add_argument("--model", default="smollm2-135m", help="zoo name or HF dir")
    t.add_argument("--data", action="append", metavar="TASK[:chat][:N]",
                   help="prompts the model continues greedily: mbpp | stdlib-functions | package-functions "
                        "(HumanEval-shaped: a documented function's signature and docstring, from the standard "
                        "library or from torch, transformers and their dependencies) | gsm8k | xsum | PATH.jsonl "
                        "with a 'prompt' field (the train slice); ':chat' wraps them in the chat template; ':N' "
                        "takes at most N of that source instead of --max-prompts; repeat to mix sources; optional "
                        "with --corpus")
    t.add_argument("--corpus", action="append", metavar="PATH|GLOB|FILE.jsonl|python-stdlib|python-packages",
                   help=corpus_help)
    t.add_argument("--corpus-tokens", type=int, default=100_000,
                   help="corpus tokens to train on (rounded up to whole windows; an error if the corpus has fewer)")
    t.add_argument("--corpus-window", type=int, default=256, help="tokens per teacher-forced corpus window")
    t.add_argument("--layers", default="auto", help="auto (1/4, 1/2, 3/4 depth) or L1,L2,...")
    t.add_argument("--max-prompts", type=int, default=128, help="train prompts to use per --data source, at most")
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
                   help="dtype of the copy that writes the greedy continuations (on CPU: bfloat16 where the CPU has "
                        "AVX-512 BF16, else float32, batches fastest)")
    t.add_argument("--seed", type=int, default=0, help="seeds the heads' training")
    t.add_argument("--out", required=True, help="directory for heads.safetensors (+ resumable train state)")
    t.set_defaults(func=_train_heads)

    e = command("eval-heads", "calibrate exit heads on held-out prompts; JSON + PNG report")
    e.add_argument("--model", default="smollm2-135m", help="zoo name or HF dir")
    e.add_argument("--heads", required=True, help="directory with the exit heads to evaluate")
    e.add_argument("--data", required=True, action="append", metavar="TASK[:chat][:N]",
                   help="humaneval | mbpp | gsm8k | xsum | PATH.jsonl (eval slice); ':chat' wraps the prompts in the "
                        "chat template; ':N' draws N of that source instead of --n; repeat to calibrate on a mix "
                        "(gamma is chosen for the source it serves worst)")
    e.add_argument("--n", type=int, default=16, help="number of held-out prompts per --data source")
    e.add_argument("--seed", type=int, default=0,
                   help="which prompts are drawn (bench --seed draws the same ones: calibrate on another seed to "
                        "keep the benchmark's prompts out of the choice of gamma)")
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


def auto_layers(num_layers: int) -> tuple[int, ...]:
    """The paper's placement: heads at 1/4, 1/2 and 3/4 of the depth."""
    return tuple(sorted({max(0, min(num_layers - 2, round(num_layers * f) - 1)) for f in (0.25, 0.5, 0.75)}))


def _train_heads(args) -> int:
    from ..zoo import models
    from ..zoo.data import prompt_sources, source_texts
    from .corpus import corpus_files
    from .training import TrainConfig, train_heads

    at_least(args, epochs=1, max_prompts=1, gen_tokens=1, batch_tokens=1, shortlist=0)
    if not args.data and not args.corpus:
        raise AdaDecodeError("give training text: --data (prompts the model continues), --corpus (text read "
                             "teacher-forced), or both")
    if args.corpus:
        corpus_files(args.corpus)  # a path or glob that names nothing fails before the model loads
        if args.corpus_tokens < 1 or args.corpus_window < 2:
            raise AdaDecodeError("--corpus-tokens must be >= 1 and --corpus-window >= 2")
    given_layers = None if args.layers == "auto" else int_list(args.layers, "--layers")
    check_writable(args.out, "--out", directory=True)
    gen_dtype = canonical_dtype(args.gen_dtype)
    canonical_dtype(args.dtype)
    records = prompt_sources(args.data or (), "train", n=args.max_prompts)
    model, tokenizer = models.load(args.model, dtype=args.dtype)
    prompts = source_texts(tokenizer, records)
    layers = given_layers or auto_layers(model.config.num_hidden_layers)
    generator = None
    if gen_dtype != str(model.dtype).replace("torch.", ""):
        generator, _ = models.load(args.model, dtype=gen_dtype)
    cfg = TrainConfig(layers=layers, epochs=args.epochs, gen_tokens=args.gen_tokens, seed=args.seed,
                      batch_tokens=args.batch_tokens, data=",".join(args.data or ()), record_ids=[r["id"] for r in records],
                      loss_vocab=args.loss_vocab, gen_dtype=gen_dtype, corpus=tuple(args.corpus or ()),
                      shortlist=args.shortlist,
                      corpus_tokens=args.corpus_tokens, corpus_window=args.corpus_window)
    heads = train_heads(model, tokenizer, prompts, cfg, args.out, generator=generator)
    data = heads.metadata["training_data"]
    corpus = data["corpus"]
    print(f"[adadecode] heads for layers {list(heads.layers)} written to {args.out} "
          f"(final loss {heads.metadata['loss_curve'][-1][1]:.3f}; {heads.metadata['tokens']:,} tokens: "
          f"{data['continuations']['tokens']:,} from continuations"
          + (f", {corpus['tokens']:,} from the corpus" if corpus else "") + ")")
    return 0


def _eval_heads(args) -> int:
    from ..zoo import models
    from ..zoo.data import prompt_sources, source_texts
    from .evaluation import head_records, measure_costs, report, write
    from ..build import build_program
    from ..config import AdaDecodeConfig
    from . import ExitHeads
    from .training import distillation_sequences

    at_least(args, n=1, max_new_tokens=1, max_pending=0)
    canonical_dtype(args.dtype)
    canonical_dtype(args.gen_dtype)
    heads = ExitHeads.load(args.heads)  # a broken heads folder fails before the model loads
    check_writable(args.json, "--json")
    check_writable(args.plot, "--plot")
    if args.set_threshold:
        check_writable(args.heads, "--heads (with --set-threshold)", directory=True)
    records = prompt_sources(args.data, "eval", n=args.n, seed=args.seed)
    model, tokenizer = models.load(args.model, dtype=args.dtype)
    heads.check(model)
    prompts = source_texts(tokenizer, records)
    generator = model
    if canonical_dtype(args.gen_dtype) != str(model.dtype).replace("torch.", ""):
        generator, _ = models.load(args.model, dtype=canonical_dtype(args.gen_dtype))
    seqs = distillation_sequences(generator, tokenizer, prompts, args.max_new_tokens, 16)
    del generator
    lens = [len(tokenizer(p).input_ids) for p in prompts]
    program = build_program(model, heads, AdaDecodeConfig(exit_layers=heads.layers))
    records_per_seq = head_records(program, heads, seqs, lens, [r["source"] for r in records])
    rep = report(records_per_seq, model.config.num_hidden_layers, max_pending=args.max_pending,
                 **measure_costs(program, heads))
    rep.update(model=args.model, data=",".join(args.data), seed=args.seed, heads=str(args.heads),
               record_ids=[r["id"] for r in records])
    write(rep, args.json, args.plot)
    rec = rep["recommended"]
    print(f"recommended: exit layers {rec['exit_layers']} at gamma {rec['gamma']} (modelled gain "
          f"{rec['modelled_gain']:.2f}x, bound {rec['speedup_bound']:.2f}x over the same program at full depth)")
    if rec["per_source"]:
        print("  chosen for the worst source; modelled per source: "
              + ", ".join(f"{src} {g:.2f}x" for src, g in rec["per_source"].items()))
    if args.set_threshold:
        heads.metadata["recommended_threshold"] = rec["gamma"]
        heads.metadata["recommended_exit_layers"] = rec["exit_layers"]
        heads.metadata["calibration"] = {"data": ",".join(args.data), "prompts": len(records), "seed": args.seed,
                                         "record_ids": rep["record_ids"], "max_new_tokens": args.max_new_tokens,
                                         **next(r for r in rep["per_subset"] if r["layers"] == rec["exit_layers"]),
                                         "oracle_speedup_bound": rep["oracle_speedup_bound"]}
        heads.save(args.heads)
    for l, d in rep["per_layer"].items():
        print(f"layer {l}: agreement {d['agreement']:.1%}" + "".join(
            f", {src} {v:.1%}" for src, v in d.get("per_source", {}).items()))
    for r in rep["per_gamma"]:
        print(f"gamma {r['gamma']:.2f}: early-exit {r['early_exit_rate']:.1%}, acceptance "
              f"{(r['acceptance'] or 0):.1%}, {r['layers_per_token']:.1f} layers/token, "
              f"{r['deferred_rows_per_token']:.1f} deferred rows/token, modelled {r['modelled_gain']:.2f}x, "
              f"bound {r['speedup_bound']:.2f}x")
    print(f"recommended gamma {rep['recommended_gamma']}; oracle bound {rep['oracle_speedup_bound']:.2f}x; "
          f"in decoder layers: probe {rep['probe_cost_layers']:.2f}, one more row in a layer call "
          f"{rep['row_cost_layers']:.2f}, final norm + LM head {rep['epilogue_cost_layers']:.2f}")
    pc = rep["perfect_confidence"]
    print(f"with a perfect exit decision (confident exactly when right) these heads would model "
          f"{pc['modelled_gain']:.2f}x (exit layers {pc['exit_layers']}); with free probes and deferred rows "
          f"the recommended configuration {rep['free_exits']['modelled_gain']:.2f}x (the most cheaper exits can buy)")
    print("gains are over the same program at full depth, i.e. on what `adadecode bench` measures as heads_gain; "
          "the bound counts layers and probes, the modelled gain also deferred rows and LM-head calls")
    return 0
