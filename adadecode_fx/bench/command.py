"""The command line of ``adadecode bench`` and ``bench/run_bench.py``: arguments, their checks before
anything slow loads, and `main`, which loads the model, heads and prompts, runs `run_bench` and writes the
report (JSON, PNG, table)."""
from __future__ import annotations

import os
import shlex
import sys
import time

from .methods import BENCH_BACKENDS, SAMPLING_KNOBS
from .report import code_commit, heads_gain_lines, machine_info, summary_table, write
from . import runner
from .runner import METHODS, BenchConfig, check_sampling, run_bench
from ..cli_checks import HEADS_DEFAULT
from ..config import AdaDecodeConfig, canonical_dtype, check_device, parse_threshold
from ..errors import AdaDecodeError
from ..report_files import check_writable


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2-135m", help="zoo name (smollm2-135m, qwen2.5-coder-0.5b) or HF dir")
    p.add_argument("--heads", help="exit heads directory " + HEADS_DEFAULT)
    p.add_argument("--task", default="humaneval", help="humaneval | gsm8k | xsum | mbpp | PATH.jsonl (eval slice)")
    p.add_argument("--n", type=int, default=5, help="number of prompts")
    p.add_argument("--max-new-tokens", type=int, default=64, help="every method generates exactly this many")
    p.add_argument("--dtype", default="bf16", help="bf16 | fp32 | fp16")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="HF baselines to run (hf_greedy always runs), and full_depth: each backend's program "
                        "without exit heads (adadecode_<backend>_full_depth), which heads_gain divides by; "
                        "choose from " + ",".join(METHODS))
    p.add_argument("--backends", default="eager,inductor",
                   help="AdaDecode lowerings to run, comma-separated: " + ", ".join(BENCH_BACKENDS)
                        + " (cudagraphs_inductor / _aten: cudagraphs with inductor's or ATen's kernels in its "
                          "graphs; plain cudagraphs takes inductor's on a GPU)")
    p.add_argument("--threshold", default=None,
                   help="one gamma, or LAYER:GAMMA pairs (7:0.8,23:0.97); default: the heads' calibrated gamma")
    p.add_argument("--exit-layers", default=None, help="default: the heads' recommended exit layers")
    p.add_argument("--max-pending", type=int, default=5,
                   help="at most this many early tokens wait for verification (0: no early exits)")
    p.add_argument("--early-exit-layers", type=int, default=None,
                   help="E for hf_early_exit (layers the draft uses); default: our first exit layer + 1")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template (default: raw prompts; "
                                                      "an error for a tokenizer without one)")
    p.add_argument("--seed", type=int, default=0, help="which prompts are drawn")
    p.add_argument("--batch-sizes", default="", help="also measure batched throughput at these batch sizes "
                                                      "(e.g. 1,4,8; each at most --n) against HF greedy, or "
                                                      "with --do-sample HF's batched sampling")
    g = p.add_argument_group("sampling (default: greedy, with parity against HF greedy)")
    g.add_argument("--do-sample", action="store_true",
                   help="every method samples, from the same seed per prompt (the baseline is hf_sample); parity "
                        "compares ids for methods that draw once per token (full depth, HF static compile), and is "
                        "n/a for AdaDecode with exits, whose distribution the test suite checks")
    g.add_argument("--temperature", type=float, default=None, help="with --do-sample (default 1.0)")
    g.add_argument("--top-k", type=int, default=None, help="with --do-sample (default: off)")
    g.add_argument("--top-p", type=float, default=None, help="with --do-sample (default: off)")
    g.add_argument("--min-p", type=float, default=None, help="with --do-sample (default: off)")
    g.add_argument("--sampling-seed", type=int, default=0,
                   help="torch.manual_seed(this + prompt index) before every call")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed warm-up run of each method (compiling and cache set-up then land in "
                        "the first timed prompt)")
    p.add_argument("--no-oracle", action="store_true", help="skip the oracle bound")
    p.add_argument("--no-recheck", action="store_true",
                   help="do not rerun a method (and the reference) where its tokens differ from hf_greedy's")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--plot", help="write a PNG here (speed-up bars + exit-layer histogram)")


def main(args, argv=None) -> int:
    import torch

    from ..zoo import models
    from ..zoo.data import prompt_sources, source_texts
    from ..heads import ExitHeads, heads_for

    def names(text):
        return tuple(x.strip() for x in (text or "").split(",") if x.strip())

    exit_layers = _ints(args.exit_layers, "--exit-layers")
    args.threshold = parse_threshold(args.threshold)  # text from the command line; set already by the adadecode CLI
    sampling = _sampling(args)
    _check_args(args, exit_layers)  # before the slow part: loading, capturing, compiling
    check_sampling(sampling)
    check_writable(args.json, "--json")
    check_writable(args.plot, "--plot")
    device = check_device(args.device)
    torch.manual_seed(0)
    records = prompt_sources([args.task + (":chat" if args.chat else "")], "eval", n=args.n, seed=args.seed)
    model, tokenizer = models.load(args.model, dtype=args.dtype)
    model = model.to(device)
    heads_dir = args.heads or heads_for(args.model, model)
    heads = ExitHeads.load(heads_dir, model) if heads_dir else None
    prompts = [{"id": r["id"], "input_ids": tokenizer(text).input_ids}
               for r, text in zip(records, source_texts(tokenizer, records))]  # --chat needs a chat template
    cfg = BenchConfig(max_new_tokens=args.max_new_tokens, methods=names(args.methods), backends=names(args.backends),
                      threshold=args.threshold, exit_layers=exit_layers, max_pending=args.max_pending,
                      early_exit_layers=args.early_exit_layers, warmup=not args.no_warmup, oracle=not args.no_oracle,
                      recheck_divergence=not args.no_recheck,
                      batch_sizes=_ints(args.batch_sizes, "--batch-sizes"), sampling=sampling,
                      sampling_seed=args.sampling_seed)
    machine = machine_info(device)
    started = time.time()
    rep = run_bench(model, heads, prompts, cfg, device=device, progress=not args.no_progress)
    rep = {"machine": machine, "commit": code_commit(),
           "command": shlex.join(argv if argv is not None else sys.argv),
           "model": str(args.model), "heads": str(heads_dir) if heads_dir else None, "task": args.task,
           "chat": bool(args.chat), "prompt_ids_seed": args.seed,
           "wall_s": time.time() - started, **rep}
    rep["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    write(rep, args.json, args.plot)
    if rep.get("interrupted"):
        print(f"interrupted: {rep['interrupted']['prompts_measured']} of {rep['interrupted']['prompts_asked']} "
              "prompts measured")
    print(summary_table(rep))
    if rep.get("batching"):
        from .batch import batch_table
        print(batch_table(rep["batching"]))
    for line in heads_gain_lines(rep):
        print(line)
    return 0


def _sampling(args) -> dict | None:
    knobs = {k: getattr(args, k, None) for k in SAMPLING_KNOBS}
    if not getattr(args, "do_sample", False):
        given = ["--" + k.replace("_", "-") for k, v in knobs.items() if v is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise AdaDecodeError(f"{', '.join(given)} only {verb} when sampling: add --do-sample")
        return None
    return {k: v for k, v in knobs.items() if v is not None}


def _check_args(args, exit_layers) -> None:
    for flag, value, low in (("--n", args.n, 1), ("--max-new-tokens", args.max_new_tokens, 1)):
        if value < low:
            raise AdaDecodeError(f"{flag} must be >= {low}, got {value}")
    canonical_dtype(args.dtype)
    AdaDecodeConfig(exit_layers=exit_layers, threshold=args.threshold, max_pending=args.max_pending)
    names = [x.strip() for x in (args.backends or "").split(",") if x.strip()]
    unknown = [b for b in names if b not in BENCH_BACKENDS]
    methods = [m.strip() for m in (args.methods or "").split(",") if m.strip()]
    unknown += [m for m in methods if m not in METHODS]
    if unknown:
        raise AdaDecodeError(f"unknown backends/methods {unknown}: backends are {', '.join(BENCH_BACKENDS)}; methods "
                             f"{', '.join(METHODS)}")
    if any(b < 1 or b > args.n for b in _ints(args.batch_sizes, "--batch-sizes")):
        raise AdaDecodeError(f"--batch-sizes must lie in 1..--n ({args.n}), got {args.batch_sizes!r}")


def _ints(text, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in (text or "").split(",") if x.strip())
    except ValueError:
        raise AdaDecodeError(f"{flag} must be comma-separated integers, got {text!r}") from None


def cli_main(argv=None) -> int:
    import argparse

    from ..argparse_help import HelpFormatter

    p = argparse.ArgumentParser(prog="run_bench.py", description=runner.__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return main(args, ["bench/run_bench.py", *(sys.argv[1:] if argv is None else argv)])
    except AdaDecodeError as e:
        print(f"adadecode bench: error: {e}", file=sys.stderr)
        return 2


__all__ = ["add_arguments", "cli_main", "main"]
