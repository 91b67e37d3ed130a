"""Scripted decode rows: a layer's one-row step runs as a TorchScript trace instead of Python.

Why: a decode step through one layer at T = 1 is ~55 small ATen calls besides the linears. Issued from
the FX module's Python code, each costs 10-25 us of interpreter and dispatch on a 2-core CPU, ~0.4 ms
per layer and step (Qwen2.5-Coder-0.5B bf16: 3.2 ms -> 2.7 ms per layer call, docs/lowering.md). A trace of
the segment on a one-row input records the same ATen calls with the same arguments, in the same order,
and TorchScript's interpreter issues them from C++: the same kernels, so the same bits.

What stays in Python: blocks (T > 1: deferred rows and prefills). The row-exact attention's per-row
loop depends on the K/V length, which a trace would freeze; blocks are a few percent of layer calls.
A trace freezes every size the graph computes with (``sym_size`` nodes) to its value at tracing time.
Only segments whose computed sizes depend on the rows' batch and length alone are scripted (one trace
per batch size then serves a whole generation); a segment that sizes something by the K/V length
(Gemma2's eager attention repeats K/V with an ``expand`` to it) keeps its FX code.

Exactness: the graph runs with the executor's optimisations off, and not at all while a TorchScript
CPU fuser (NNC, oneDNN graph) is switched on, since fused kernels round differently. A segment that
cannot be traced keeps running its FX code (``ScriptedRows.failure`` says why).
"""
from __future__ import annotations

import warnings

import torch

from .eager_attention_rows import PerRowAttention

_UNTRACED = object()


def _fusers_off() -> bool:
    return not torch._C._jit_can_fuse_on_cpu() and not torch._C._jit_llga_enabled()


class ScriptedRows:
    """Callable like the FX segment ``gm`` it wraps; one-row calls go through a trace of ``gm``.
    ``residual`` is the index of the argument holding the rows (``[B, T, d]``)."""

    def __init__(self, gm: torch.fx.GraphModule, residual: int):
        self.gm, self.residual = gm, residual
        self.traces: dict[int, object] = {}  # batch size -> trace (None: tracing failed)
        self.failure: str | None = None
        # a per-row eager attention picks its calls from the mask in Python, which a trace would freeze;
        # one row never cuts, so its trace stays right
        self.one_row_only = any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), PerRowAttention)
                                for n in gm.graph.nodes)

    def __call__(self, *args):
        rows = args[self.residual]
        if rows.dim() != 3 or rows.shape[1] != 1 or not _fusers_off() or (self.one_row_only and rows.shape[0] != 1):
            return self.gm(*args)
        trace = self.traces.get(rows.shape[0], _UNTRACED)
        if trace is _UNTRACED:
            trace = self.traces[rows.shape[0]] = self._trace(args)
        if trace is None:
            return self.gm(*args)
        with torch.jit.optimized_execution(False):
            return trace(*args)

    def _trace(self, args):
        try:
            with warnings.catch_warnings():
                # torch.jit is deprecated in favour of compile/export, which cannot give us this path yet:
                # inductor's bf16 code rounds differently, and its all-ATen mode does not build on torch 2.13
                warnings.simplefilter("ignore")
                return torch.jit.trace(self.gm, args, check_trace=False)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the FX code, which is always right
            self.failure = f"{type(exc).__name__}: {exc}"[:300]
            return None

    @property
    def graph(self) -> torch.fx.Graph:
        return self.gm.graph

    def __getattr__(self, name):  # parameters(), buffers(), code, ...: the wrapped segment's
        if name == "gm":
            raise AttributeError(name)
        return getattr(self.gm, name)


def sizes_fixed_by_rows(gm: torch.fx.GraphModule, residual: int) -> bool:
    """True if every size ``gm`` computes with depends only on the batch size and row count of its
    ``residual`` input, i.e. a trace at T = 1 stays right for every K/V length."""
    from torch.fx.experimental.symbolic_shapes import free_symbols

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    rows = placeholders[residual].meta.get("val")
    if not isinstance(rows, torch.Tensor) or rows.dim() != 3:
        return False
    allowed = free_symbols(rows.shape[0]) | free_symbols(rows.shape[1])
    for node in gm.graph.nodes:
        value = node.meta.get("val", None) if node.op != "placeholder" else None
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)) and node.users:
            if not free_symbols(value) <= allowed:
                return False
    return True


def script_decode_rows(program):
    """``program`` with every FX layer segment whose sizes depend on its rows alone wrapped in
    `ScriptedRows` (a new program; ``AdaDecodeConfig(script_rows=False)`` skips this)."""
    layer_fns = list(program.layer_fns)
    for i, layer in enumerate(layer_fns):
        if not isinstance(layer, torch.fx.GraphModule):
            continue
        residual = next(k for k, item in enumerate(program.layer_recipes[i]) if item[0] == "residual")
        if sizes_fixed_by_rows(layer, residual):
            layer_fns[i] = ScriptedRows(layer, residual)
    return program.replace(layer_fns=layer_fns)
