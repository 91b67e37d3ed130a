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

Honest length: every method generates exactly ``max_new_tokens`` tokens of pure greedy argmax. End of
sequence is disabled the same way for all of them (HF: ``eos_token_id=None`` in the generation config;
AdaDecode: ``eos_token_id=None``); no logits processor changes any argmax (``min_new_tokens`` would
suppress EOS logits in HF only, so it is *not* used). Instruct models therefore keep decoding past
``<|im_end|>``; the reference's first EOS position is recorded per prompt (``eos_at``). tok/s is
new tokens / wall time of the whole ``generate`` call (prefill included), the same clock for all.

Parity: a method is identical on a prompt when its new token ids equal ``hf_greedy``'s, id for id.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .errors import AdaDecodeError

HF_METHODS = ("hf_greedy", "hf_static_compile", "hf_prompt_lookup", "hf_early_exit")
TASKS = ("humaneval", "gsm8k", "xsum", "mbpp")


@dataclass
class BenchConfig:
    max_new_tokens: int = 64
    methods: tuple[str, ...] = HF_METHODS      # HF methods to run (hf_greedy is always run)
    backends: tuple[str, ...] = ("eager", "inductor")
    threshold: float | None = None             # None: the heads' calibrated value, else 0.75
    exit_layers: tuple[int, ...] = ()          # (): the heads' recommended layers, else all of them
    max_pending: int = 5
    prompt_lookup_num_tokens: int = 10
    early_exit_layers: int | None = None       # E for hf_early_exit; None: first exit layer + 1
    warmup: bool = True
    oracle: bool = True
    mem_interval_s: float = 0.005


@dataclass
class Method:
    """``run(input_ids [1, P]) -> (new token ids, AdaDecode stats dict or None)``."""
    name: str
    run: Callable
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# machine and memory

def machine_info(device: str = "cpu") -> dict:
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": device}
    try:
        import psutil
        info["memory_gib"] = round(psutil.virtual_memory().total / 2 ** 30, 1)
        info["load_avg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except (ImportError, OSError):
        pass
    try:
        from . import __version__
        info["adadecode_fx"] = __version__
    except ImportError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


class PeakMemory:
    """Peak memory of one call. CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at the
    start. CPU: the process RSS sampled by a thread every ``interval`` s, peak minus the RSS at the
    start (a process-wide delta: it misses peaks shorter than the interval and memory freed and reused
    inside the allocator)."""

    def __init__(self, device: str, interval: float = 0.005):
        self.device, self.interval = device, interval
        self.peak_mb = None
        self.kind = "cuda_max_allocated_delta" if device.startswith("cuda") else "rss_peak_delta_sampled"

    def __enter__(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._proc = _rss_reader()
        self._base = self._peak = self._proc()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._proc())

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2 ** 20
            return False
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc())
        self.peak_mb = (self._peak - self._base) / 2 ** 20
        return False


def _rss_reader():
    try:
        import psutil
        proc = psutil.Process()
        return lambda: proc.memory_info().rss
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")

        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page
        return rss


# --------------------------------------------------------------------------------------------------
# methods

def _gen_config(model, max_new_tokens: int, **extra):
    gc = copy.deepcopy(model.generation_config)
    gc.do_sample = False
    gc.num_beams = 1
    gc.max_new_tokens = max_new_tokens
    gc.min_new_tokens = None
    gc.eos_token_id = None  # honest length: nobody stops at EOS (see the module docstring)
    if gc.pad_token_id is None:
        gc.pad_token_id = 0
    for k in ("temperature", "top_p", "top_k"):
        setattr(gc, k, None)
    for k, v in extra.items():
        setattr(gc, k, v)
    return gc


def hf_method(name: str, model, max_new_tokens: int, **extra) -> Method:
    import torch

    gc = _gen_config(model, max_new_tokens, **extra)

    @torch.no_grad()
    def run(ids):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
        return out[0, ids.shape[1]:].tolist(), None

    info = {k: (repr(v) if k == "compile_config" else v) for k, v in extra.items()}
    return Method(name, run, info)


def static_compile_method(model, max_new_tokens: int, device: str) -> Method:
    from transformers import CompileConfig

    cc = CompileConfig(fullgraph=False, dynamic=None, mode="reduce-overhead" if device.startswith("cuda") else "default")
    if not device.startswith("cuda"):
        cc._compile_all_devices = True  # HF only auto-compiles on accelerators unless told
    return hf_method("hf_static_compile", model, max_new_tokens, cache_implementation="static", compile_config=cc)


def adadecode_method(model, heads, backend: str, threshold: float, exit_layers, max_pending: int,
                     max_new_tokens: int) -> tuple[Method, object]:
    from .config import AdaDecodeConfig
    from .runtime import AdaDecoder

    cfg = AdaDecodeConfig(exit_layers=tuple(exit_layers), threshold=threshold, max_pending=max_pending,
                          backend=backend)
    dec = AdaDecoder(model, heads, cfg)

    def run(ids):
        res = dec.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=None)
        return list(res.new_tokens), res.stats.to_dict()

    return Method(f"adadecode_{backend}", run, {"config": json.loads(dec.config.to_json())}), dec


def _reason(exc: BaseException) -> str:
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return last[:500]


def _run_timed(method: Method, ids, device: str, mem_interval: float) -> dict:
    import torch

    with PeakMemory(device, mem_interval) as mem:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens, stats = method.run(ids)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return {"tokens": tokens, "stats": stats, "seconds": seconds, "new_tokens": len(tokens),
            "tok_s": len(tokens) / seconds if seconds > 0 else 0.0, "peak_mem_mb": mem.peak_mb,
            "peak_mem_kind": mem.kind}


# --------------------------------------------------------------------------------------------------
# the benchmark

def resolve_heads_settings(heads, cfg: BenchConfig) -> tuple[tuple[int, ...], float]:
    meta = heads.metadata if heads is not None else {}
    layers = tuple(cfg.exit_layers) or tuple(meta.get("recommended_exit_layers", ())) or \
        (tuple(heads.layers) if heads is not None else ())
    threshold = cfg.threshold if cfg.threshold is not None else meta.get("recommended_threshold", 0.75)
    return layers, float(threshold)


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
    layers, threshold = resolve_heads_settings(heads, cfg)
    unknown = [m for m in cfg.methods if m not in HF_METHODS]
    if unknown:
        raise AdaDecodeError(f"unknown methods {unknown}: choose from {', '.join(HF_METHODS)}")
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
    for backend in cfg.backends:
        name = f"adadecode_{backend}"
        if heads is None:
            skipped[name] = "no exit heads"
            continue
        try:
            m, dec = adadecode_method(model, heads, backend, threshold, layers, cfg.max_pending, T)
        except (AdaDecodeError, ImportError, NotImplementedError) as exc:
            skipped[name] = f"construction failed: {_reason(exc)}"
            log(f"skipping {name}: {skipped[name]}")
            continue
        methods.append(m)
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
    per_prompt = []
    bar = _progress(len(prompts) * len(methods), progress)
    for i, (p, ids) in enumerate(zip(prompts, inputs)):
        k = i % len(methods)
        order = methods[k:] + methods[:k]
        runs = {}
        for m in order:
            bar.set_description(f"{p['id']} {m.name}"[-48:])
            runs[m.name] = _run_timed(m, ids, device, cfg.mem_interval_s)
            bar.update(1)
        ref = runs["hf_greedy"]["tokens"]
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
            if r["stats"] is not None:
                s = r["stats"]
                entry["stats"] = {k: s[k] for k in ("early_emitted", "accepted", "rejected", "steps",
                                                    "critical_path_layers", "layer_rows", "early_exit_rate",
                                                    "acceptance_rate", "critical_path_per_token", "exit_histogram")}
            row["methods"][name] = entry
        per_prompt.append(row)
    bar.close()

    per_method = {name: _aggregate(name, per_prompt, L, next(m for m in methods if m.name == name))
                  for name in names}
    oracle = None
    if cfg.oracle and eager_decoder is not None:
        try:
            oracle = oracle_bound(eager_decoder, heads, per_prompt, layers, threshold, cfg.max_pending)
        except Exception as exc:  # noqa: BLE001
            oracle = {"error": _reason(exc)}
    return {"config": {**asdict(cfg), "exit_layers": list(layers), "threshold": threshold, "num_layers": L,
                       "dtype": str(model.dtype).replace("torch.", ""), "device": device,
                       "length_scheme": "exactly max_new_tokens greedy tokens for every method; EOS stopping "
                                        "disabled (eos_token_id=None) everywhere, no logits processors"},
            "methods": names, "skipped": skipped, "warmup": warmup, "per_method": per_method,
            "oracle_bound": oracle, "per_prompt": per_prompt}


def _compiles(name: str) -> bool:
    return name == "hf_static_compile" or (name.startswith("adadecode_") and name != "adadecode_eager")


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


def _quantile(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    pos = (len(xs) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _aggregate(name: str, per_prompt: list, L: int, method: Method) -> dict:
    rows = [p["methods"][name] for p in per_prompt]
    tok_s = [r["tok_s"] for r in rows]
    sp = [r["speedup"] for r in rows if r["speedup"] is not None]
    mem = [r["peak_mem_mb"] for r in rows if r["peak_mem_mb"] is not None]
    out = {"n": len(rows), "tok_s_median": statistics.median(tok_s), "tok_s_min": min(tok_s), "tok_s_max": max(tok_s),
           "speedup_median": statistics.median(sp) if sp else None, "speedup_p25": _quantile(sp, 0.25),
           "speedup_p75": _quantile(sp, 0.75), "speedup_min": min(sp) if sp else None,
           "speedup_max": max(sp) if sp else None,
           "parity": sum(r["identical"] for r in rows) / len(rows),
           "new_tokens_total": sum(r["new_tokens"] for r in rows),
           "peak_mem_mb": max(mem) if mem else None, "info": method.info,
           "exit_rate_per_layer": None, "early_exit_rate": None, "acceptance_rate": None,
           "critical_path_per_token": None}
    stats = [r.get("stats") for r in rows]
    if all(s is not None for s in stats):
        tokens = sum(r["new_tokens"] for r in rows)
        hist: dict[str, int] = {}
        for s in stats:
            for k, v in s["exit_histogram"].items():
                hist[k] = hist.get(k, 0) + v
        acc, rej = sum(s["accepted"] for s in stats), sum(s["rejected"] for s in stats)
        out.update(exit_histogram=dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
                   exit_rate_per_layer={k: v / tokens for k, v in sorted(hist.items(), key=lambda kv: int(kv[0]))},
                   early_exit_rate=sum(v for k, v in hist.items() if int(k) < L - 1) / tokens,
                   acceptance_rate=acc / (acc + rej) if acc + rej else None,
                   accepted=acc, rejected=rej, early_emitted=sum(s["early_emitted"] for s in stats),
                   critical_path_per_token=sum(s["critical_path_layers"] for s in stats) / tokens)
    elif name in ("hf_greedy", "hf_static_compile"):
        out["critical_path_per_token"] = float(L)  # every token runs the whole stack, one after another
    return out


def oracle_bound(decoder, heads, per_prompt: list, layers, threshold: float, max_pending: int) -> dict:
    """On the reference (HF greedy) sequences: the oracle bound (every token exits at the first head
    that agrees with the final layer) and the replayed schedule of the benchmarked configuration,
    both from `adadecode_fx.evaluation`."""
    from .evaluation import head_records, measure_probe_cost, report, simulate

    seqs, lens = [], []
    for p in per_prompt:
        ref = p["reference_ids"]
        seqs.append(list(p["prompt_ids"]) + ref)
        lens.append(p["prompt_tokens"])
    L = decoder.program.num_layers
    records = head_records(decoder.program, heads, seqs, lens)
    try:
        probe_cost = measure_probe_cost(decoder.program, heads)
    except Exception:  # noqa: BLE001 - e.g. off CPU; the oracle bound does not need it
        probe_cost = 0.0
    rep = report(records, L, probe_cost, max_pending)
    runs = [simulate({l: r["conf"][l] for l in layers}, {l: r["agree"][l] for l in layers}, L, threshold, max_pending)
            for r in records]
    tok = sum(s.tokens for s in runs)
    crit = sum(s.critical_layers for s in runs)
    probes = sum(s.probes for s in runs)
    return {"oracle_layers_per_token": rep["oracle_layers_per_token"],
            "oracle_speedup_bound": rep["oracle_speedup_bound"],
            "probe_cost_layers": probe_cost, "head_layers": rep["layers"],
            "agreement_per_layer": {l: d["agreement"] for l, d in rep["per_layer"].items()},
            "replayed": {"exit_layers": list(layers), "threshold": threshold,
                         "layers_per_token": crit / tok if tok else None,
                         "speedup_bound": L / (crit / tok + probe_cost * probes / tok) if tok else None},
            "best_replayed": rep["recommended"]}


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
# output

def plot(rep: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = rep["methods"]
    pm = rep["per_method"]
    med = [pm[n]["speedup_median"] or 0.0 for n in names]
    lo = [max(0.0, (pm[n]["speedup_median"] or 0) - (pm[n]["speedup_p25"] or 0)) for n in names]
    hi = [max(0.0, (pm[n]["speedup_p75"] or 0) - (pm[n]["speedup_median"] or 0)) for n in names]
    colors = ["tab:gray" if n.startswith("hf_") else "tab:blue" for n in names]
    bars = a.bar(range(len(names)), med, yerr=[lo, hi], capsize=4, color=colors)
    for bar_, n in zip(bars, names):
        top = max(bar_.get_height(), pm[n]["speedup_p75"] or 0.0)
        a.text(bar_.get_x() + bar_.get_width() / 2, top + 0.02,
               f"{pm[n]['speedup_median']:.2f}x\nparity {pm[n]['parity']:.0%}", ha="center", va="bottom", fontsize=8)
    a.axhline(1.0, ls="--", c="k", lw=0.8)
    ob = (rep.get("oracle_bound") or {}).get("oracle_speedup_bound")
    if ob:
        a.axhline(ob, ls=":", c="tab:red", lw=1, label=f"oracle bound {ob:.2f}x (critical-path layers)")
        a.legend(fontsize=8, loc="upper left")
    a.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    a.set_ylabel("speed-up vs hf_greedy (median, bars p25-p75)")
    cfg = rep["config"]
    a.set_title(f"{rep.get('model', '')} {cfg['dtype']}, {rep.get('task', '')} n={len(rep['per_prompt'])}, "
                f"{cfg['max_new_tokens']} tokens", fontsize=9)
    a.set_ylim(0, max(med + [ob or 0, 1.0]) * 1.35)

    L = cfg["num_layers"]
    ada = [n for n in names if pm[n].get("exit_rate_per_layer")]
    all_layers = sorted({int(k) for n in ada for k in pm[n]["exit_rate_per_layer"]})
    width = 0.8 / max(1, len(ada))
    for j, n in enumerate(ada):
        rates = pm[n]["exit_rate_per_layer"]
        b.bar([i + j * width for i in range(len(all_layers))], [rates.get(str(l), 0.0) for l in all_layers],
              width=width, label=n)
    b.set_xticks([i + width * (len(ada) - 1) / 2 for i in range(len(all_layers))],
                 [f"{l}" + (" (full)" if l == L - 1 else "") for l in all_layers])
    b.set_xlabel("layer that produced the output token")
    b.set_ylabel("share of output tokens")
    b.set_title("AdaDecode exit layers" if ada else "no AdaDecode method ran", fontsize=9)
    if ada:
        b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rep: dict, json_path=None, png_path=None) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rep, indent=1))
    if png_path:
        Path(png_path).parent.mkdir(parents=True, exist_ok=True)
        plot(rep, png_path)


def summary_table(rep: dict) -> str:
    lines = ["| method | tok/s (median) | speed-up median [p25, p75] | parity | early-exit | acceptance | "
             "critical-path layers/token | peak mem MB |", "|---|---|---|---|---|---|---|---|"]

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)
    for n in rep["methods"]:
        m = rep["per_method"][n]
        lines.append(f"| {n} | {m['tok_s_median']:.2f} | {f(m['speedup_median'], '.2f')}x "
                     f"[{f(m['speedup_p25'], '.2f')}, {f(m['speedup_p75'], '.2f')}] | {m['parity']:.0%} "
                     f"({round(m['parity'] * m['n'])}/{m['n']}) | {f(m['early_exit_rate'], '.1%')} | "
                     f"{f(m['acceptance_rate'], '.1%')} | {f(m['critical_path_per_token'], '.1f')} | "
                     f"{f(m['peak_mem_mb'], '.0f')} |")
    for n, why in rep.get("skipped", {}).items():
        lines.append(f"| {n} | skipped: {why} | | | | | | |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# command line (shared by `adadecode bench` and bench/run_bench.py)

def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2-135m", help="zoo name (smollm2-135m, qwen2.5-coder-0.5b) or HF dir")
    p.add_argument("--heads", help="exit heads directory (default: the heads shipped for a zoo model)")
    p.add_argument("--task", default="humaneval", help="humaneval | gsm8k | xsum | mbpp | PATH.jsonl (eval slice)")
    p.add_argument("--n", type=int, default=5, help="number of prompts")
    p.add_argument("--max-new-tokens", type=int, default=64, help="every method generates exactly this many")
    p.add_argument("--dtype", default="bf16", help="bf16 | fp32")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--methods", default=",".join(HF_METHODS),
                   help="HF baselines to run (hf_greedy always runs): " + ",".join(HF_METHODS))
    p.add_argument("--backends", default="eager,inductor", help="AdaDecode lowerings to run, comma-separated")
    p.add_argument("--threshold", type=float, default=None, help="default: the heads' calibrated gamma")
    p.add_argument("--exit-layers", default=None, help="default: the heads' recommended exit layers")
    p.add_argument("--max-pending", type=int, default=5)
    p.add_argument("--early-exit-layers", type=int, default=None,
                   help="E for hf_early_exit (layers the draft uses); default: our first exit layer + 1")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template (default: raw prompts, "
                                                      "as the heads were trained and calibrated)")
    p.add_argument("--seed", type=int, default=0, help="which prompts are drawn")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--no-oracle", action="store_true", help="skip the oracle bound")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--plot", help="write a PNG here (speed-up bars + exit-layer histogram)")


def main(args, argv=None) -> int:
    import torch

    from . import models
    from .data import chat_prompt, load_prompts
    from .heads import ExitHeads, shipped_heads

    def names(text):
        return tuple(x.strip() for x in (text or "").split(",") if x.strip())

    exit_layers = ()
    if args.exit_layers:
        try:
            exit_layers = tuple(int(x) for x in names(args.exit_layers))
        except ValueError:
            raise AdaDecodeError(f"--exit-layers must be comma-separated integers, got {args.exit_layers!r}") from None
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AdaDecodeError("--device cuda but CUDA is not available")
    torch.manual_seed(0)
    records = load_prompts(args.task, n=args.n, split="eval", seed=args.seed)
    model, tokenizer = models.load(args.model, dtype=args.dtype)
    model = model.to(device)
    heads_dir = args.heads or shipped_heads(args.model)
    heads = ExitHeads.load(heads_dir, model) if heads_dir else None
    prompts = []
    for r in records:
        text = chat_prompt(tokenizer, r["prompt"]) if args.chat else r["prompt"]
        prompts.append({"id": r["id"], "input_ids": tokenizer(text).input_ids})
    cfg = BenchConfig(max_new_tokens=args.max_new_tokens, methods=names(args.methods), backends=names(args.backends),
                      threshold=args.threshold, exit_layers=exit_layers, max_pending=args.max_pending,
                      early_exit_layers=args.early_exit_layers, warmup=not args.no_warmup, oracle=not args.no_oracle)
    machine = machine_info(device)
    started = time.time()
    rep = run_bench(model, heads, prompts, cfg, device=device, progress=not args.no_progress)
    rep = {"machine": machine,
           "command": shlex.join(argv if argv is not None else sys.argv),
           "model": str(args.model), "heads": str(heads_dir) if heads_dir else None, "task": args.task,
           "chat": bool(args.chat), "prompt_ids_seed": args.seed,
           "wall_s": time.time() - started, **rep}
    rep["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    write(rep, args.json, args.plot)
    print(summary_table(rep))
    ob = rep.get("oracle_bound") or {}
    if ob.get("oracle_speedup_bound"):
        print(f"oracle bound {ob['oracle_speedup_bound']:.2f}x ({ob['oracle_layers_per_token']:.1f} layers/token); "
              f"replayed schedule of this config {ob['replayed']['speedup_bound']:.2f}x")
    return 0


def cli_main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="run_bench.py", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return main(args, ["bench/run_bench.py", *(sys.argv[1:] if argv is None else argv)])
    except AdaDecodeError as e:
        print(f"adadecode bench: error: {e}", file=sys.stderr)
        return 2
