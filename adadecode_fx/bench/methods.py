"""The benchmarked methods and how one call of each is timed.

A `Method` wraps one way of decoding behind ``run(input_ids [1, P]) -> (new token ids, stats or None)``
so `adadecode_fx.bench.run_bench` can interleave them without knowing what they are. The Hugging Face
methods share one generation config with EOS stopping disabled, so every method produces exactly
``max_new_tokens`` tokens (the "honest length" of `adadecode_fx.bench`): greedy argmax tokens, or with
``sampling`` (a dict of temperature / top_k / top_p / min_p) tokens sampled with those warpers and
nothing else, from torch's global RNG, which the runner seeds before every call. The AdaDecode method
wraps an `AdaDecoder` for one lowering backend, takes the same sampling settings and returns its
decode statistics.
`run_timed` times one call (wall clock over the whole ``generate``, prefill included, CUDA synchronized)
and its peak memory (`PeakMemory`).
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..config import BACKENDS

# What ``--backends`` accepts: each lowering backend under its own name (with its defaults), plus the
# cudagraphs backend's two kinds of kernels named: ``cudagraphs_inductor`` (static segments compiled by
# inductor, fused kernels inside the graphs: its default on a GPU) and ``cudagraphs_aten`` (ATen's kernels
# one by one: its default elsewhere). Name -> AdaDecodeConfig options.
BENCH_BACKENDS = {**{b: {"backend": b} for b in BACKENDS},
                  "cudagraphs_inductor": {"backend": "cudagraphs", "compile_segments": True},
                  "cudagraphs_aten": {"backend": "cudagraphs", "compile_segments": False}}


@dataclass
class Method:
    """``run(input_ids [1, P]) -> (new token ids, AdaDecode stats dict or None)``."""
    name: str
    run: Callable
    info: dict = field(default_factory=dict)


SAMPLING_KNOBS = ("temperature", "top_k", "top_p", "min_p")
SAMPLING_BASELINE = "hf_sample"  # hf_greedy's name when the bench samples
_ASSISTED = {"prompt_lookup_num_tokens", "assistant_early_exit"}  # generate options that draft and verify


def _gen_config(model, max_new_tokens: int, sampling: dict | None = None, **extra):
    """A generation config of the model's special tokens and nothing else of its own: a checkpoint's
    ``generation_config.json`` may set a repetition penalty, top-k or other processors, which would change
    HF's tokens only (the AdaDecode methods get the same explicit settings as here)."""
    from transformers import GenerationConfig

    src = model.generation_config
    gc = GenerationConfig(bos_token_id=src.bos_token_id, decoder_start_token_id=src.decoder_start_token_id,
                          pad_token_id=0 if src.pad_token_id is None else src.pad_token_id,
                          eos_token_id=[],  # honest length: nobody stops at EOS (None would mean the model's EOS)
                          do_sample=sampling is not None, num_beams=1, max_new_tokens=max_new_tokens)
    if sampling is not None:  # explicit, or HF's global defaults (top_k 50) would warp HF's distribution only
        gc.update(**{"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None, **sampling})
    for k, v in extra.items():
        setattr(gc, k, v)
    return gc


@contextlib.contextmanager
def _generation_defaults(model, gc):
    """HF's ``generate`` fills every field left unset in the config it is given from
    ``model.generation_config``; with ``gc`` in its place for the call, only HF's global defaults remain."""
    saved = model.generation_config
    model.generation_config = gc
    try:
        yield
    finally:
        model.generation_config = saved


def hf_method(name: str, model, max_new_tokens: int, sampling: dict | None = None, **extra) -> Method:
    import torch

    gc = _gen_config(model, max_new_tokens, sampling, **extra)

    @torch.no_grad()
    def run(ids):
        with _generation_defaults(model, gc):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
        return out[0, ids.shape[1]:].tolist(), None

    info = {k: (repr(v) if k == "compile_config" else v) for k, v in extra.items()}
    if sampling is not None:  # assisted generation draws a block of candidates at a time
        info.update(sampling=dict(sampling), own_draws=bool(_ASSISTED & set(extra)))
    return Method(name, run, info)


def static_compile_method(model, max_new_tokens: int, device: str, sampling: dict | None = None) -> Method:
    from transformers import CompileConfig

    cc = CompileConfig(fullgraph=False, dynamic=None, mode="reduce-overhead" if device.startswith("cuda") else "default")
    if not device.startswith("cuda"):
        cc._compile_all_devices = True  # HF only auto-compiles on accelerators unless told
    return hf_method("hf_static_compile", model, max_new_tokens, sampling, cache_implementation="static",
                     compile_config=cc)


def adadecode_method(model, heads, backend: str, threshold, exit_layers, max_pending: int,
                     max_new_tokens: int, full_depth: bool = False,
                     sampling: dict | None = None) -> tuple[Method, object]:
    """``adadecode_<backend>`` (``backend``: a key of `BENCH_BACKENDS`), or with ``full_depth``
    ``adadecode_<backend>_full_depth``: the same capture, passes and lowering without exit heads
    (``exit_layers=()``), so every token runs all layers. Their tok/s ratio is what the heads buy
    (`adadecode_fx.bench.report.heads_gain`), apart from everything the lowering itself gains over HF.
    ``sampling``: sample with these settings from torch's global RNG (``seed=None``), as the HF methods do."""
    from ..config import AdaDecodeConfig
    from ..runtime import AdaDecoder

    if full_depth:
        heads, exit_layers, threshold = None, (), None  # no heads: resolve() would otherwise take layers from them
    cfg = AdaDecodeConfig(exit_layers=tuple(exit_layers), threshold=threshold, max_pending=max_pending,
                          **BENCH_BACKENDS.get(backend, {"backend": backend}))  # an unknown one: the config says so
    dec = AdaDecoder(model, heads, cfg)
    knobs = {} if sampling is None else {"do_sample": True, "seed": None, **sampling}

    def run(ids):
        res = dec.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=None, **knobs)
        return list(res.new_tokens), res.stats.to_dict()

    info = {"config": json.loads(dec.config.to_json())}
    if sampling is not None:
        info.update(sampling=dict(sampling), own_draws=not full_depth)  # exits draw early tokens from the heads
    if full_depth:
        info["note"] = "same program and lowering as adadecode_" + backend + " without exit heads"
    return Method(f"adadecode_{backend}" + ("_full_depth" if full_depth else ""), run, info), dec


def run_timed(method: Method, ids, device: str, mem_interval: float) -> dict:
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


__all__ = ["SAMPLING_KNOBS", "Method", "PeakMemory", "adadecode_method", "hf_method", "run_timed", "static_compile_method"]
