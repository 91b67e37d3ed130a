"""``adadecode bench``: AdaDecode against Hugging Face decoding, in one process, on the same prompts.

Methods (each warmed up once, then interleaved per prompt with a rotating order so machine drift
hits all of them alike):

- ``hf_greedy``: ``model.generate`` greedy, default attention, dynamic cache. The baseline: speed-ups
  and sequence parity are measured against it, prompt by prompt. With ``BenchConfig.sampling`` it is
  ``hf_sample`` instead (the same call with ``do_sample=True`` and those warpers).
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

Sampling (``BenchConfig.sampling``, ``--do-sample``): every method samples with the same warpers, and
torch's global RNG is seeded with ``sampling_seed + prompt index`` before each timed call, so every
method starts a prompt from the same seed. A method that draws one token per step from the final
layer's distribution (HF static cache + compile, AdaDecode at full depth) then draws HF's very tokens
where its logits are HF's, and parity compares them id for id: it checks that the settings and the
distribution are the same. Methods that draw their own way (``Method.info["own_draws"]``: AdaDecode
with exits draws early tokens from its heads and accepts or resamples them; HF's assisted methods
draw a block at a time) get other tokens by design: their parity is ``None``. That their output is
distributed as plain sampling is what the test suite checks (tests/runtime/test_sampling.py). No
recheck and no oracle bound (it replays greedy sequences); batch sizes sample too (`batch`).

Code: this module runs the benchmark (`run_bench`: builds the methods, warms them up, interleaves them,
compares token ids); the methods and their timing are `adadecode_fx.bench.methods`, the summaries,
oracle bound, JSON, table and plot are `adadecode_fx.bench.report`; the command line shared by ``adadecode
bench`` and ``bench/run_bench.py`` is `adadecode_fx.bench.command`.
"""
from __future__ import annotations

import sys
import time
import traceback
from dataclasses import asdict, dataclass

from .methods import (SAMPLING_BASELINE, SAMPLING_KNOBS, Method, PeakMemory, adadecode_method, hf_method, run_timed,
                      static_compile_method)
from .report import aggregate, heads_gain, machine_info, oracle_bound, plot, summary_table, write
from ..config import AdaDecodeConfig
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
    sampling: dict | None = None               # sample with these warpers (temperature, top_k, top_p, min_p)
    sampling_seed: int = 0                     # torch.manual_seed(sampling_seed + prompt index) before each call

    @property
    def baseline(self) -> str:
        return SAMPLING_BASELINE if self.sampling is not None else "hf_greedy"


def check_sampling(sampling: dict | None) -> None:
    """Refuse sampling settings the decoder would refuse, before anything is loaded."""
    if sampling is None:
        return
    from ..runtime.sampling import SamplingConfig

    unknown = sorted(set(sampling) - set(SAMPLING_KNOBS))
    if unknown:
        raise AdaDecodeError(f"unknown sampling settings {unknown}: the bench samples with {', '.join(SAMPLING_KNOBS)}")
    SamplingConfig(**{k: v for k, v in sampling.items() if v is not None})


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
    check_sampling(cfg.sampling)
    T = cfg.max_new_tokens
    L = model.config.num_hidden_layers
    sampling = cfg.sampling
    layers, threshold = resolve_heads_settings(heads, cfg, model.config.num_hidden_layers)
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise AdaDecodeError(f"unknown methods {unknown}: choose from {', '.join(METHODS)}")
    skipped: dict[str, str] = {}
    methods: list[Method] = [hf_method(cfg.baseline, model, T, sampling)]
    if "hf_static_compile" in cfg.methods:
        methods.append(static_compile_method(model, T, device, sampling))
    if "hf_prompt_lookup" in cfg.methods:
        methods.append(hf_method("hf_prompt_lookup", model, T, sampling,
                                 prompt_lookup_num_tokens=cfg.prompt_lookup_num_tokens))
    if "hf_early_exit" in cfg.methods:
        E = cfg.early_exit_layers or (layers[0] + 1 if layers else None)
        if E is None:
            skipped["hf_early_exit"] = "no exit layer to take E from (give heads or --early-exit-layers)"
        else:
            methods.append(hf_method("hf_early_exit", model, T, sampling, assistant_early_exit=int(E)))
    eager_decoder = None
    decoders = {}
    for backend in cfg.backends:
        for full in (False, True) if FULL_DEPTH in cfg.methods else (False,):
            name = f"adadecode_{backend}" + ("_full_depth" if full else "")
            if heads is None and not full:
                skipped[name] = "no exit heads"
                continue
            try:
                m, dec = adadecode_method(model, heads, backend, threshold, layers, cfg.max_pending, T, full_depth=full,
                                          sampling=sampling)
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
                if m.name == cfg.baseline:
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
                                              log, seed=cfg.sampling_seed + i))
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
    if cfg.oracle and sampling is not None:
        oracle = {"skipped": "sampling: the oracle bound replays greedy sequences"}
    elif cfg.oracle and eager_decoder is not None and not interrupted:
        try:
            oracle = oracle_bound(eager_decoder, heads, per_prompt, layers, threshold, cfg.max_pending)
        except Exception as exc:  # noqa: BLE001
            oracle = {"error": _reason(exc)}
    batching = None
    if cfg.batch_sizes and not interrupted:
        from .batch import run_batch_bench
        batching = run_batch_bench(model, {n: d for n, d in decoders.items() if n in names},
                                   [list(p["input_ids"]) for p in prompts], cfg.batch_sizes, T, log=log,
                                   sampling=sampling, seed=cfg.sampling_seed)
    scheme = ("exactly max_new_tokens greedy tokens for every method; EOS stopping disabled everywhere (HF: "
              "eos_token_id=[], AdaDecode: None), no logits processors")
    if sampling is not None:
        scheme = ("exactly max_new_tokens sampled tokens for every method, with the warpers of config.sampling and "
                  "no other logits processor; torch.manual_seed(sampling_seed + prompt index) before every call; EOS "
                  "stopping disabled everywhere (HF: eos_token_id=[], AdaDecode: None); parity compares ids only for "
                  "methods that draw once per token, None for those that draw their own way (own_draws)")
    return {"config": {**asdict(cfg), "exit_layers": list(layers), "threshold": threshold, "num_layers": L,
                       "dtype": str(model.dtype).replace("torch.", ""), "device": device,
                       "length_scheme": scheme},
            "baseline": cfg.baseline, "methods": names, "skipped": skipped, "warmup": warmup, "per_method": per_method,
            "heads_gain": heads_gain(per_prompt, names), "oracle_bound": oracle, "per_prompt": per_prompt,
            "batching": batching, "interrupted": interrupted}


def _measure_prompt(p: dict, ids, order: list, by_name: dict, model, cfg: BenchConfig, device: str, bar, log,
                    seed: int = 0) -> dict:
    """One prompt through every method in ``order`` (timed, interleaved), with parity against the baseline
    (sampling: every call starts from ``seed``; no parity for methods that draw their own way)."""
    import torch

    T = cfg.max_new_tokens
    base = cfg.baseline
    runs = {}
    for m in order:
        bar.set_description(f"{p['id']} {m.name}"[-48:])
        if cfg.sampling is not None:
            torch.manual_seed(seed)
        runs[m.name] = run_timed(m, ids, device, cfg.mem_interval_s)
        bar.update(1)
    for name, r in runs.items():
        if r["new_tokens"] != T:  # would make every other method look divergent (or this one)
            log(f"{p['id']} {name}: {r['new_tokens']} new tokens, not {T}: the honest-length scheme failed")
    ref = runs[base]["tokens"]
    ref_again = []  # the reference's untimed rerun, made once per prompt and only on a divergence
    eos = _eos_ids(model)
    row = {"id": p["id"], "prompt_tokens": int(ids.shape[1]), "prompt_ids": list(p["input_ids"]),
           "order": [m.name for m in order], **({"sampling_seed": seed} if cfg.sampling is not None else {}),
           "eos_at": next((j for j, t in enumerate(ref) if t in eos), None), "reference_ids": ref,
           "methods": {}}
    for name, r in runs.items():
        diff = first_diff(ref, r["tokens"])
        entry = {"tok_s": r["tok_s"], "seconds": r["seconds"], "new_tokens": r["new_tokens"],
                 "speedup": r["tok_s"] / runs[base]["tok_s"] if runs[base]["tok_s"] else None,
                 "identical": diff is None, "first_diff": diff, "peak_mem_mb": r["peak_mem_mb"]}
        if cfg.sampling is not None:
            entry["ids"] = r["tokens"]
            if by_name[name].info.get("own_draws"):  # draws its own way from the RNG: other tokens by design
                entry.update(identical=None, first_diff=None)
        elif diff is not None:
            entry["ids"] = r["tokens"]
            if cfg.recheck_divergence:
                entry["recheck"] = _recheck(by_name[name], ids, ref, r["tokens"], by_name[base], ref_again)
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
            "first_diff_again": first_diff(ref_again, again)}


def _compiles(name: str) -> bool:
    return name == "hf_static_compile" or (name.startswith("adadecode_") and
                                           name not in ("adadecode_eager", "adadecode_eager_full_depth"))


def _eos_ids(model) -> set:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def first_diff(ref: list, ids: list):
    """The first position where two token lists part (None if equal)."""
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


__all__ = ["BenchConfig", "FULL_DEPTH", "HF_METHODS", "METHODS", "Method", "PeakMemory", "SAMPLING_BASELINE", "TASKS",
           "adadecode_method", "check_sampling", "heads_gain", "hf_method", "machine_info", "oracle_bound", "plot",
           "resolve_heads_settings", "run_bench", "static_compile_method", "summary_table", "write"]
