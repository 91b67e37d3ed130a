"""The benchmarked methods and how one call of each is timed.

A `Method` wraps one way of decoding behind ``run(input_ids [1, P]) -> (new token ids, stats or None)``
so `adadecode_fx.bench.run_bench` can interleave them without knowing what they are. The Hugging Face
methods share one greedy generation config with EOS stopping disabled and no sampling knobs, so every
method produces exactly ``max_new_tokens`` argmax tokens (the "honest length" of `adadecode_fx.bench`);
the AdaDecode method wraps an `AdaDecoder` for one lowering backend and returns its decode statistics.
`run_timed` times one call (wall clock over the whole ``generate``, prefill included, CUDA synchronized)
and its peak memory (`PeakMemory`).
"""
from __future__ import annotations

import copy
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Method:
    """``run(input_ids [1, P]) -> (new token ids, AdaDecode stats dict or None)``."""
    name: str
    run: Callable
    info: dict = field(default_factory=dict)


def _gen_config(model, max_new_tokens: int, **extra):
    gc = copy.deepcopy(model.generation_config)
    gc.do_sample = False
    gc.num_beams = 1
    gc.max_new_tokens = max_new_tokens
    gc.min_new_tokens = None
    gc.eos_token_id = []  # honest length: nobody stops at EOS (None would fall back to the model's EOS)
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


def adadecode_method(model, heads, backend: str, threshold, exit_layers, max_pending: int,
                     max_new_tokens: int, full_depth: bool = False) -> tuple[Method, object]:
    """``adadecode_<backend>``, or with ``full_depth`` ``adadecode_<backend>_full_depth``: the same
    capture, passes and lowering without exit heads (``exit_layers=()``), so every token runs all
    layers. Their tok/s ratio is what the heads buy (`adadecode_fx.bench.report.heads_gain`), apart
    from everything the lowering itself gains over HF."""
    from ..config import AdaDecodeConfig
    from ..runtime import AdaDecoder

    if full_depth:
        heads, exit_layers, threshold = None, (), None  # no heads: resolve() would otherwise take layers from them
    cfg = AdaDecodeConfig(exit_layers=tuple(exit_layers), threshold=threshold, max_pending=max_pending,
                          backend=backend)
    dec = AdaDecoder(model, heads, cfg)

    def run(ids):
        res = dec.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=None)
        return list(res.new_tokens), res.stats.to_dict()

    info = {"config": json.loads(dec.config.to_json())}
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


__all__ = ["Method", "PeakMemory", "adadecode_method", "hf_method", "run_timed", "static_compile_method"]
