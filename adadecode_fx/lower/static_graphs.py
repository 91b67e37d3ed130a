"""Calls over static buffers: captured as CUDA graphs on a GPU, run as they are elsewhere.

A `StaticCall` owns one input buffer per tensor argument and one output buffer per output. Every call
copies the arguments into the input buffers, then on CUDA replays the graph captured on the first call
(which writes the output buffers), elsewhere runs the function on the same inputs and copies its
results into the output buffers; either way it returns the output buffers themselves. CPU runs thus
take the path a GPU replays (argument copies, fixed buffers, outputs that the next call overwrites), so
CI tests that logic, a caller that keeps an output too long included, without a GPU.

`GraphBook` keeps the calls of one decoder by key (segment, block length) and counts how many it made:
on CUDA each one is a capture, so a count that stays flat after warm-up means nothing was recaptured.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

import torch


class StaticCall:
    """``fn(*buffers) -> tuple of tensors`` over buffers shaped like ``args`` (possibly none).

    ``fn`` may also read and write tensors it closes over (the K/V buffers, a step's token and slot);
    they must stay at the same address for as long as the call is used, because a graph reads and
    writes them where they were at capture. The outputs are the call's own buffers: the next call
    overwrites them, so a caller that keeps one longer (a parked block) copies it.
    """

    def __init__(self, fn: Callable, args, device, pool=None, inputs=None):
        self.fn = fn
        # ``inputs``: buffers to read from instead of new ones (another call's output buffer, which then
        # needs no copy when that output is what this call gets)
        self.inputs = list(inputs) if inputs is not None else [
            torch.empty_like(a, memory_format=torch.contiguous_format) for a in args]
        self.graph = None
        self.outputs: tuple | None = None
        with torch.no_grad():  # inference only: a graph captured with autograd on records its bookkeeping
            self._load(args)
            if torch.device(device).type == "cuda":
                self._capture(pool)

    def _load(self, args) -> None:
        for buffer, a in zip(self.inputs, args):
            if a is not buffer:
                buffer.copy_(a)

    def _capture(self, pool) -> None:
        # One eager run on a side stream first: lazy initialisation (cuBLAS handles and workspaces, SDPA
        # kernel choice, compiled kernels' first launch) must not happen inside a capture. It computes
        # what the replay below computes, so the K/V rows it writes are the ones the replay writes again.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            first = tuple(self.fn(*self.inputs))
        torch.cuda.current_stream().wait_stream(stream)
        # The output buffers come from the ordinary allocator, not the graphs' shared pool, and the graph
        # copies its results into them: memory of the pool may be one graph's output and another's
        # intermediates, which that other graph's replay would overwrite.
        self.outputs = tuple(torch.empty_like(o) for o in first)
        del first
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            for buffer, o in zip(self.outputs, self.fn(*self.inputs)):
                buffer.copy_(o)

    def run_uncaptured(self) -> None:
        """What a replay does, without a graph: the outputs land in the same buffers every call."""
        outputs = self.fn(*self.inputs)
        if self.outputs is None:
            self.outputs = tuple(o.clone() for o in outputs)
        else:
            for buffer, o in zip(self.outputs, outputs):
                buffer.copy_(o)

    def __call__(self, *args) -> tuple:
        if torch.is_grad_enabled():  # a decode runs under no_grad already; entering it costs microseconds
            with torch.no_grad():
                return self(*args)
        self._load(args)
        if self.graph is None:
            self.run_uncaptured()
        else:
            self.graph.replay()
        return self.outputs


class GraphBook:
    """The `StaticCall`s of one decoder, by key, made on first use.

    On CUDA they share one memory pool for their intermediates, which are dead once a graph has run, so
    graphs that run one after another on one stream may reuse each other's memory, in any order (vLLM
    captures its per-batch-size graphs the same way). Outputs live outside the pool (`StaticCall`), so
    one call's outputs stay valid while other calls run; only its own next call overwrites them.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.calls: dict = {}
        self.made = 0  # StaticCalls made; on CUDA, graph captures
        self.replays: Counter = Counter()  # calls by key: with each graph's GPU time, a step's GPU time
        self.pool = None

    def call(self, key, fn: Callable, args=(), inputs=None) -> tuple:
        """``inputs``: when the call is made, the buffers it reads (see `StaticCall`)."""
        self.replays[key] += 1
        static = self.calls.get(key)
        if static is None:
            if self.device.type == "cuda" and self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            static = self.calls[key] = StaticCall(fn, args, self.device, self.pool, inputs)
            self.made += 1
        return static(*args)

    def clear(self) -> None:
        """Forget every call (their graphs read buffers that are about to be replaced)."""
        self.calls.clear()
        self.pool = None
