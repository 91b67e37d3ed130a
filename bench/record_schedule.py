#!/usr/bin/env python
"""Record the exit schedule of a zoo model (real weights, its shipped heads at their recommended settings,
eager backend) on held-out prompts, for bench/gpu_bench.py to replay on a random model of the same shape
(adadecode_fx.bench.replay). Runs on a CPU; the Qwen default takes a few minutes on 2 cores.

    python bench/record_schedule.py --model qwen2.5-coder-0.5b --n 4 --max-new-tokens 256 \
        --out bench/data/qwen2.5-coder-0.5b.schedule.json
"""
import argparse
import json
import time

import torch
import transformers

from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
from adadecode_fx.bench.replay import record
from adadecode_fx.bench.report import code_commit
from adadecode_fx.heads import shipped_heads
from adadecode_fx.zoo import models
from adadecode_fx.zoo.data import load_prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--task", default="humaneval")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    model, tokenizer = models.load(args.model, dtype=args.dtype)
    heads_dir = shipped_heads(args.model)
    heads = ExitHeads.load(heads_dir, model)
    decoder = AdaDecoder(model, heads, AdaDecodeConfig())  # the heads' recommended layers and gamma
    cfg = decoder.config
    records = []
    started = time.time()
    for r in load_prompts(args.task, n=args.n, split="eval", seed=args.seed):
        ids = tokenizer(r["prompt"]).input_ids
        rec = record(decoder.program, ids, args.max_new_tokens)
        records.append({"id": r["id"], "prompt_ids": ids, **rec})
        s = rec["stats"]
        print(f"{r['id']}: {len(ids)} prompt tokens, {s['early_emitted']} early, {s['accepted']} accepted, "
              f"{s['rejected']} rejected, {len(rec['probes'])} probes", flush=True)
    out = {"model": args.model, "heads": heads_dir.name,
           "dtype": args.dtype, "task": args.task, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
           "config": {"exit_layers": list(cfg.exit_layers), "threshold": cfg.threshold,
                      "max_pending": cfg.max_pending},
           "recorded_with": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "commit": code_commit(), "backend": cfg.backend, "seconds": round(time.time() - started, 1)},
           "records": records}
    with open(args.out, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
