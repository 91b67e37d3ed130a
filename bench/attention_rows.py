#!/usr/bin/env python
"""What a deferred row's attention costs: ATen SDPA on one query row against one call for a block of rows,
and how often the block's row differs from the one-row result (why `row_exact_attention` calls per row).
Shapes: Qwen2.5-Coder-0.5B (14 query heads, 2 K/V heads) and SmolLM2-135M (9, 3), head size 64.
Numbers: docs/kernels.md ("Attention rows").

Example:
    python bench/attention_rows.py --keys 128,320,1024
"""
import argparse
import statistics
import time

import torch

SDPA = torch.ops.aten.scaled_dot_product_attention


def ms(fn, repeats: int) -> float:
    for _ in range(20):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", default="128,320,1024")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--trials", type=int, default=200, help="random cases for the exactness check")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    for name, heads, kv in (("qwen2.5-coder-0.5b", 14, 2), ("smollm2-135m", 9, 3)):
        for keys in map(int, args.keys.split(",")):
            k = torch.randn(1, kv, keys, 64, generator=g).bfloat16()
            v = torch.randn(1, kv, keys, 64, generator=g).bfloat16()
            row = [f"{name} {keys} keys:"]
            for dtype in (torch.bfloat16, torch.float32):
                for t in (1, 2, 4):
                    q = torch.randn(1, heads, t, 64, generator=g).to(dtype)
                    kk, vv = k.to(dtype), v.to(dtype)
                    row.append(f"{str(dtype)[6:]} T={t} {ms(lambda: SDPA(q, kk, vv, enable_gqa=True), args.repeats):.3f} ms")
            print(row[0], ", ".join(row[1:]))
    differ = 0
    for _ in range(args.trials):  # a query row alone, and the same row first in a 2-row call over the same keys
        n = int(torch.randint(1, 1100, (1,), generator=g))
        q = torch.randn(1, 14, 1, 64, generator=g).bfloat16()
        k = 3 * torch.randn(1, 2, n, 64, generator=g).bfloat16()
        v = torch.randn(1, 2, n, 64, generator=g).bfloat16()
        alone = SDPA(q, k, v, enable_gqa=True)
        block = SDPA(torch.cat([q, q], 2), k, v, enable_gqa=True)[:, :, :1]
        differ += not torch.equal(alone, block)
    print(f"bf16: the row of a 2-row call differs from the one-row call in {differ} of {args.trials} random cases")


if __name__ == "__main__":
    main()
