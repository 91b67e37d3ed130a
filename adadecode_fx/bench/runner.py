"""``adadecode bench``: AdaDecode against Hugging Face decoding, in one process, on the same prompts.

Methods (each warmed up once, then interleaved per prompt with a rotating order so machine drift
hits all of them alike):

- ``hf_greedy``: ``model.generate`` greedy, default attention, dynamic cache. The baseline: speed-ups
  and sequence parity are measured against it, prompt by prompt.
- ``hf_static_compile``: greedy with ``cache_implementation="static"`` and HF's automatic
  ``torch.compile`` of the forward (forced on CPU via ``CompileConfig._compile_all_devices``).
- ``hf_prompt_lookup``: ``prompt_lookup_num_tokens=10``.
- ``hf_early_exit``: ``assistant_early_exit=E`` (self-speculation through the first E layers), with
  E = our first exit layer + 1 (our exit layer index l means "after layer l", i.e. l + 1 layers).
- ``adadecode_<backend>``: `AdaDecoder` with the given lowering (``--backends eager,inductor``); a
  backend whose construction raises `AdaDecodeError`/ImportError is skipped with the reason recorded.
- ``adadecode_<backend>_full_depth`` (method ``full_depth``): the same program and lowering without exit
  heads, every token through all layers. ``heads_gain`` in the report is, per backend, the median over
  prompts of ``adadecode_<backend>`` tok/s / ``adadecode_<backend>_full_depth`` tok/s (with p25/p75):
  what the heads buy over the same program at full depth, which is what ``eval-heads`` bounds. The
  speed-up over ``hf_greedy`` mixes that with what the lowering gains on its own.

Honest length: every method generates exactly ``max_new_tokens`` tokens of pure greedy argmax. End of
sequence is disabled the same way for all of them (HF: an empty ``eos_token_id`` list in the generation
config, because ``None`` falls back to the model's own EOS in transformers 5; AdaDecode:
``eos_token_id=None``); no logits processor changes any argmax (``min_new_tokens`` would
suppress EOS logits in HF only, so it is *not* used). Instruct models therefore keep decoding past
``<|im_end|>``; the reference's first EOS position is recorded per prompt (``eos_at``). tok/s is
new tokens / wall time of the whole ``generate`` call (prefill included), the same clock for all.

Parity: a method is identical on a prompt when its new token ids equal ``hf_greedy``'s, id for id.
Where they differ, both are run once more, untimed (``recheck``), so a report says whether the
divergence is reproducible in that process or came from state that changed between runs.

Code: this module runs the benchmark (`run_bench`: builds the methods, warms them up, interleaves them,
compares token ids) and holds the command line shared by ``adadecode bench`` and
``bench/run_bench.py``; the methods and their timing are `adadecode_fx.bench.methods`, the summaries,
oracle bound, JSON, table and plot are `adadecode_fx.bench.report`.
"""
from __future__ import annotations

import os
import shlex
import sys
import time
import traceback
from dataclasses import asdict, dataclass

from .methods import Method, PeakMemory, adadecode_method, hf_method, run_timed, static_compile_method
from .report import (aggregate, code_commit, heads_gain, heads_gain_lines, machine_info, oracle_bound, plot,
                     summary_table, write)
from ..config import BACKENDS, AdaDecodeConfig, canonical_dtype, check_device, parse_threshold
from ..report_files import check_writable
from ..errors import AdaDecodeError

HF_METHODS = ("hf_greedy", "hf_static_compile", "hf_prompt_lookup", "hf_early_exit")
FULL_DEPTH = "full_depth"           # per backend: the same lowering without exit heads
METHODS = HF_METHODS + (FULL_DEPTH,)
TASKS = ("humaneval", "gsm8k", "xsum", "mbpp")


@dataclass
class BenchConfig:
    max_new_tokens: int = 64
    methods: tuple[str, ...] = METHODS         # HF baselines and full_depth to run (hf_greedy always runs)
    backends: tuple[str, ...] = ("eager", "inductor")
    threshold: float | dict | None = None      # None: the heads' calibrated value, else DEFAULT_THRESHOLD
    exit_layers: tuple[int, ...] = ()          # (): the heads' recommended layers, else all of them
    max_pending: int = 5
    prompt_lookup_num_tokens: int = 10
    early_exit_layers: int | None = None       # E for hf_early_exit; None: first exit layer + 1
    warmup: bool = True
    oracle: bool = True
    mem_interval_s: float = 0.005
    batch_sizes: tuple[int, ...] = ()          # also measure batched throughput (`adadecode_fx.bench_batch`)
    recheck_divergence: bool = True            # rerun (untimed) a method and the reference where they differ


def resolve_heads_settings(heads, cfg: BenchConfig, num_layers: int) -> tuple[tuple[int, ...], float]:
    """Exit layers and threshold the bench runs AdaDecode with (`AdaDecodeConfig.resolve` decides)."""
    resolved = AdaDecodeConfig(exit_layers=cfg.exit_layers, threshold=cfg.threshold).resolve(heads, num_layers)
    return resolved.exit_layers, resolved.threshold


def run_bench(model, heads, prompts: list[dict], cfg: BenchConfig, *, device: str = "cpu",
              extra_methods: tuple[Method, ...] = (), progress: bool = True, log=None) -> dict:
    """Benchmark every method on ``prompts`` (``[{"id", "input_ids": [int, ...]}, ...]``).

    ``extra_methods`` join the built-in ones (tests use them to check that parity can fail).
    Returns the report dict (see `write`)."""
    import torch

    log = log or (lambda msg: print(f"[bench] {msg}", file=sys.stderr))
    if not prompts:
        raise AdaDecodeError("no prompts to benchmark")
    if cfg.max_new_tokens < 1:
        raise AdaDecodeError("--max-new-tokens must be >= 1")
    T = cfg.max_new_tokens
    L = model.config.num_hidden_layers
    layers, threshold = resolve_heads_settings(heads, cfg, model.config.num_hidden_layers)
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise AdaDecodeError(f"unknown methods {unknown}: choose from {', '.join(METHODS)}")
    skipped: dict[str, str] = {}
    methods: list[Method] = [hf_method("hf_greedy", model, T)]
    if "hf_static_compile" in cfg.methods:
        methods.append(static_compile_method(model, T, device))
    if "hf_prompt_lookup" in cfg.methods:
        methods.append(hf_method("hf_prompt_lookup", model, T, prompt_lookup_num_tokens=cfg.prompt_lookup_num_tokens))
    if "hf_early_exit" in cfg.methods:
        E = cfg.early_exit_layers or (layers[0] + 1 if layers else None)
        if E is None:
            skipped["hf_early_exit"] = "no exit layer to take E from (give heads or --early-exit-layers)"
        else:
            methods.append(hf_method("hf_early_exit", model, T, assistant_early_exit=int(E)))
    eager_decoder = None
    decoders = {}
    for backend in cfg.backends:
        for full in (False, True) if FULL_DEPTH in cfg.methods else (False,):
            name = f"adadecode_{backend}" + ("_full_depth" if full else "")
            if heads is None and not full:
                skipped[name] = "no exit heads"
                continue
            try:
                m, dec = adadecode_method(model, heads, backend, threshold, layers, cfg.max_pending, T, full_depth=full)
            except (AdaDecodeError, ImportError, NotImplementedError) as exc:
                skipped[name] = f"construction failed: {_reason(exc)}"
                log(f"skipping {name}: {skipped[name]}")
                continue
            methods.append(m)
            if full:
                continue  # batching and the oracle replay are about the decoders with heads
            decoders[name] = dec
            if backend == "eager" or eager_decoder is None:  # the oracle replay reads the eager program if any
                eager_decoder = dec
    methods.extend(extra_methods)

    inputs = [torch.tensor([list(p["input_ids"])], dtype=torch.long, device=device) for p in prompts]
    warmup = {}
    # warm up on the longest prompt: HF's static cache keeps the largest max_cache_len seen, so the
    # compiled decode step never recompiles later; the compiled methods also see the shortest prompt,
    # so torch.compile marks the prefill length dynamic before timing starts
    longest = max(range(len(inputs)), key=lambda i: inputs[i].shape[1])
    shortest = min(range(len(inputs)), key=lambda i: inputs[i].shape[1])
    if cfg.warmup:
        for m in list(methods):
            t0 = time.perf_counter()
            try:
                toks, _ = m.run(inputs[longest])
                if _compiles(m.name) and shortest != longest:
                    m.run(inputs[shortest])
                warmup[m.name] = {"seconds": time.perf_counter() - t0, "tokens": len(toks)}
            except Exception as exc:  # noqa: BLE001 - a method that cannot run is recorded, not fatal
                if m.name == "hf_greedy":
                    raise
                skipped[m.name] = f"warm-up failed: {_reason(exc)}"
                log(f"skipping {m.name}: {skipped[m.name]}")
                methods.remove(m)
            else:
                log(f"warm-up {m.name}: {warmup[m.name]['seconds']:.1f} s")
                if m.name == "hf_static_compile":
                    compiled = getattr(model, "_compiled_call", None) is not None
                    m.info["compiled"] = compiled
                    if not compiled:
                        m.info["note"] = "HF did not compile the forward (static cache only)"

    names = [m.name for m in methods]
    by_name = {m.name: m for m in methods}
    per_prompt = []
    interrupted = None
    bar = _progress(len(prompts) * len(methods), progress)
    try:
        for i, (p, ids) in enumerate(zip(prompts, inputs)):
            k = i % len(methods)
            per_prompt.append(_measure_prompt(p, ids, methods[k:] + methods[:k], by_name, model, cfg, device, bar,
                                              log))
    except KeyboardInterrupt:
        if not per_prompt:
            raise
        interrupted = {"prompts_measured": len(per_prompt), "prompts_asked": len(prompts)}
        log(f"interrupted: the report covers the {len(per_prompt)} of {len(prompts)} prompts measured in full "
            "(no oracle bound, no batch sizes)")
    bar.close()

    per_method = {name: aggregate(name, per_prompt, L, next(m for m in methods if m.name == name))
                  for name in names}
    oracle = None
    if cfg.oracle and eager_decoder is not None and not interrupted:
        try:
            oracle = oracle_bound(eager_decoder, heads, per_prompt, layers, threshold, cfg.max_pending)
        except Exception as exc:  # noqa: BLE001
            oracle = {"error": _reason(exc)}
    batching = None
    if cfg.batch_sizes and not interrupted:
        from .batch import run_batch_bench
        batching = run_batch_bench(model, {n: d for n, d in decoders.items() if n in names},
                                   [list(p["input_ids"]) for p in prompts], cfg.batch_sizes, T, log=log)
    return {"config": {**asdict(cfg), "exit_layers": list(layers), "threshold": threshold, "num_layers": L,
                       "dtype": str(model.dtype).replace("torch.", ""), "device": device,
                       "length_scheme": "exactly max_new_tokens greedy tokens for every method; EOS stopping "
                                        "disabled everywhere (HF: eos_token_id=[], AdaDecode: None), no logits "
                                        "processors"},
            "methods": names, "skipped": skipped, "warmup": warmup, "per_method": per_method,
            "heads_gain": heads_gain(per_prompt, names), "oracle_bound": oracle, "per_prompt": per_prompt,
            "batching": batching, "interrupted": interrupted}


def _measure_prompt(p: dict, ids, order: list, by_name: dict, model, cfg: BenchConfig, device: str, bar, log) -> dict:
    """One prompt through every method in ``order`` (timed, interleaved), with parity against HF greedy."""
    T = cfg.max_new_tokens
    runs = {}
    for m in order:
        bar.set_description(f"{p['id']} {m.name}"[-48:])
        runs[m.name] = run_timed(m, ids, device, cfg.mem_interval_s)
        bar.update(1)
    for name, r in runs.items():
        if r["new_tokens"] != T:  # would make every other method look divergent (or this one)
            log(f"{p['id']} {name}: {r['new_tokens']} new tokens, not {T}: the honest-length scheme failed")
    ref = runs["hf_greedy"]["tokens"]
    ref_again = []  # the reference's untimed rerun, made once per prompt and only on a divergence
    eos = _eos_ids(model)
    row = {"id": p["id"], "prompt_tokens": int(ids.shape[1]), "prompt_ids": list(p["input_ids"]),
           "order": [m.name for m in order],
           "eos_at": next((j for j, t in enumerate(ref) if t in eos), None), "reference_ids": ref,
           "methods": {}}
    for name, r in runs.items():
        first_diff = _first_diff(ref, r["tokens"])
        entry = {"tok_s": r["tok_s"], "seconds": r["seconds"], "new_tokens": r["new_tokens"],
                 "speedup": r["tok_s"] / runs["hf_greedy"]["tok_s"] if runs["hf_greedy"]["tok_s"] else None,
                 "identical": first_diff is None, "first_diff": first_diff, "peak_mem_mb": r["peak_mem_mb"]}
        if first_diff is not None:
            entry["ids"] = r["tokens"]
            if cfg.recheck_divergence:
                entry["recheck"] = _recheck(by_name[name], ids, ref, r["tokens"], by_name["hf_greedy"], ref_again)
        if r["stats"] is not None:
            s = r["stats"]
            entry["stats"] = {k: s[k] for k in ("early_emitted", "accepted", "rejected", "steps",
                                                "critical_path_layers", "layer_rows", "early_exit_rate",
                                                "acceptance_rate", "critical_path_per_token", "exit_histogram")}
        row["methods"][name] = entry
    for name, entry in row["methods"].items():
        base = row["methods"].get(f"{name}_full_depth")
        if base is not None and base["tok_s"]:
            entry["heads_gain"] = entry["tok_s"] / base["tok_s"]
    return row


def _recheck(method: Method, ids, ref: list, tokens: list, reference: Method, ref_again: list) -> dict:
    """A divergence seen once, replayed untimed in the same process: is the method (and the reference)
    deterministic here? ``method_repeats`` false means the first run was not reproducible in place.
    ``ref_again`` holds the reference's rerun for this prompt once made (shared by its divergences)."""
    again, _ = method.run(ids)
    if not ref_again:
        ref_again.extend(reference.run(ids)[0])
    return {"method_repeats": again == tokens, "reference_repeats": ref_again == ref,
            "first_diff_again": _first_diff(ref_again, again)}


def _compiles(name: str) -> bool:
    return name == "hf_static_compile" or (name.startswith("adadecode_") and
                                           name not in ("adadecode_eager", "adadecode_eager_full_depth"))


def _eos_ids(model) -> set:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def _first_diff(ref: list, ids: list):
    for j, (a, b) in enumerate(zip(ref, ids)):
        if a != b:
            return j
    return None if len(ref) == len(ids) else min(len(ref), len(ids))



def _reason(exc: BaseException) -> str:
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return last[:500]


class _NoBar:
    def set_description(self, *a, **k): ...
    def update(self, *a, **k): ...
    def close(self): ...


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------
# command line (shared by `adadecode bench` and bench/run_bench.py)

def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2-135m", help="zoo name (smollm2-135m, qwen2.5-coder-0.5b) or HF dir")
    p.add_argument("--heads", help="exit heads directory (default: the heads shipped for a zoo model)")
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
                   help="AdaDecode lowerings to run, comma-separated: " + ", ".join(BACKENDS))
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
                                                      "(e.g. 1,4,8; each at most --n) against HF greedy")
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
    from ..heads import ExitHeads, shipped_heads

    def names(text):
        return tuple(x.strip() for x in (text or "").split(",") if x.strip())

    exit_layers = _ints(args.exit_layers, "--exit-layers")
    args.threshold = parse_threshold(args.threshold)  # text from the command line; set already by the adadecode CLI
    _check_args(args, exit_layers)  # before the slow part: loading, capturing, compiling
    check_writable(args.json, "--json")
    check_writable(args.plot, "--plot")
    device = check_device(args.device)
    torch.manual_seed(0)
    records = prompt_sources([args.task + (":chat" if args.chat else "")], "eval", n=args.n, seed=args.seed)
    model, tokenizer = models.load(args.model, dtype=args.dtype)
    model = model.to(device)
    heads_dir = args.heads or shipped_heads(args.model)
    heads = ExitHeads.load(heads_dir, model) if heads_dir else None
    prompts = [{"id": r["id"], "input_ids": tokenizer(text).input_ids}
               for r, text in zip(records, source_texts(tokenizer, records))]  # --chat needs a chat template
    cfg = BenchConfig(max_new_tokens=args.max_new_tokens, methods=names(args.methods), backends=names(args.backends),
                      threshold=args.threshold, exit_layers=exit_layers, max_pending=args.max_pending,
                      early_exit_layers=args.early_exit_layers, warmup=not args.no_warmup, oracle=not args.no_oracle,
                      recheck_divergence=not args.no_recheck,
                      batch_sizes=_ints(args.batch_sizes, "--batch-sizes"))
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


def _check_args(args, exit_layers) -> None:
    for flag, value, low in (("--n", args.n, 1), ("--max-new-tokens", args.max_new_tokens, 1)):
        if value < low:
            raise AdaDecodeError(f"{flag} must be >= {low}, got {value}")
    canonical_dtype(args.dtype)
    AdaDecodeConfig(exit_layers=exit_layers, threshold=args.threshold, max_pending=args.max_pending)
    names = [x.strip() for x in (args.backends or "").split(",") if x.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    methods = [m.strip() for m in (args.methods or "").split(",") if m.strip()]
    unknown += [m for m in methods if m not in METHODS]
    if unknown:
        raise AdaDecodeError(f"unknown backends/methods {unknown}: backends are {', '.join(BACKENDS)}; methods "
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

    p = argparse.ArgumentParser(prog="run_bench.py", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return main(args, ["bench/run_bench.py", *(sys.argv[1:] if argv is None else argv)])
    except AdaDecodeError as e:
        print(f"adadecode bench: error: {e}", file=sys.stderr)
        return 2


__all__ = ["BenchConfig", "FULL_DEPTH", "HF_METHODS", "METHODS", "Method", "PeakMemory", "TASKS",
           "adadecode_method", "add_arguments", "cli_main", "heads_gain", "hf_method", "machine_info", "main",
           "oracle_bound", "plot", "resolve_heads_settings", "run_bench", "static_compile_method",
           "summary_table", "write"]
