#!/usr/bin/env python
"""What a block of M decode rows costs through a real model's linears: ATen (one call), ATen one row at
a time (`row_linear`, the exact fallback) and `block_linear`.

Runs every linear of every layer in sequence, as one decode step does, so weights stream from DRAM
(a single matrix called in a loop sits in cache and flatters every kernel), then the LM head alone.
Prints the median over ``--repeats`` per block size. Numbers: docs/kernels.md.

Example:
    python bench/block_cost.py --model qwen2.5-coder-0.5b --rows 1,2,3,4,6,8
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from adadecode_fx import models
from adadecode_fx.kernels import block_linear_op, block_linear_status
from adadecode_fx.ops.linear import row_linear


def _timed(fn, repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--rows", default="1,2,3,4,6,8")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    op = block_linear_op()
    if op is None:
        raise SystemExit(f"block_linear unavailable here: {block_linear_status()}")
    model, _ = models.load(args.model, dtype="bf16")
    linears = [m for name, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings().weight
    print(f"{len(linears)} linears in {model.config.num_hidden_layers} layers; LM head {tuple(head.shape)}")
    print("M | layers ms: ATen, ATen rows alone, block_linear | LM head ms: ATen, ATen rows alone, block_linear")
    with torch.no_grad():
        for M in (int(r) for r in args.rows.split(",")):
            xs = {k: torch.randn(1, M, k).bfloat16() for k in {m.in_features for m in linears}}

            def layers(f):
                return lambda: [f(xs[m.in_features], m.weight, m.bias) for m in linears]

            x = xs[head.shape[1]] if head.shape[1] in xs else torch.randn(1, M, head.shape[1]).bfloat16()
            row = [_timed(layers(F.linear), args.repeats), _timed(layers(row_linear), args.repeats),
                   _timed(layers(op), args.repeats), _timed(lambda: F.linear(x, head), args.repeats),
                   _timed(lambda: row_linear(x, head), args.repeats), _timed(lambda: op(x, head, None), args.repeats)]
            print(f"{M} | " + " | ".join(f"{t:.1f}" for t in row), flush=True)


if __name__ == "__main__":
    main()
