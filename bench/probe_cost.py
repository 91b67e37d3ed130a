#!/usr/bin/env python
"""Where an exit probe's time goes, on one decode row of a real model with its shipped heads: the probe
as the runtime calls it (right after a decoder layer, so its weights come from DRAM), then its parts
(adapter, shortlist epilogue, softmax + max), each in units of that decoder layer. Numbers:
docs/heads.md ("A cheaper probe").

Example:
    python bench/probe_cost.py --model qwen2.5-coder-0.5b
"""
import argparse
import statistics
import time

import torch

from adadecode_fx import models
from adadecode_fx.api import decoder_for
from adadecode_fx.heads.evaluation import _one_row, _probed_layer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    model, _ = models.load(args.model, dtype=args.dtype)
    program = decoder_for(model).program
    _, hidden, pro, top, kv, _ = _one_row(program, program.heads)
    h = hidden[:, -1:].contiguous()
    layer, mid = _probed_layer(program, program.heads), program.num_layers // 2
    plain = program.probe_modules[layer]  # before lowering: the adapter through torch.matmul
    shortlist = torch.randn(1, 1, plain.vocab.numel() if plain.vocab is not None else model.config.vocab_size)
    calls = {
        "decoder layer": lambda: program.layer(mid, h, pro, top, kv),
        "probe, as the runtime calls it": lambda: [t.tolist() for t in program.probe(layer, h)],
        "probe, adapter via torch.matmul": lambda: [t.tolist() for t in plain(h)],
        "  adapter via torch.matmul": lambda: torch.matmul(h, plain.adapter.t()),
        "  shortlist epilogue": lambda: plain.epilogue(h),
        "  softmax + max": lambda: torch.softmax(shortlist, -1).max(-1),
    }
    times = {name: [] for name in calls}
    with torch.no_grad():
        for fn in calls.values():
            fn()
        for _ in range(args.repeats):
            for name, fn in calls.items():  # each after the previous: caches hold what a decode step leaves
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    unit = statistics.median(times["decoder layer"])
    print(f"{args.model} {args.dtype}, probe at layer {layer}, torch threads {torch.get_num_threads()}")
    for name, samples in times.items():
        m = statistics.median(samples)
        print(f"{name:34s} {m * 1e3:7.3f} ms  {m / unit:5.2f} layers")


if __name__ == "__main__":
    main()
