#!/usr/bin/env python
"""Greedy parity with real weights on prompts of every built-in task: each prompt decoded alone and the
task's prompts decoded as one left-padded batch, every row against HF greedy of that prompt alone.

The suite checks parity on SmolLM2 and HumanEval-like code; this checks the contract on the kinds of
prompt a user brings (chat-templated questions, news articles, short code tasks), with the shipped heads
and settings, in the dtype a user would pick. Writes one JSON (machine, commit, command, per prompt the
first token that differs, or none) and prints a line per task.

    PYTHONPATH=$PWD python bench/parity_tasks.py --model smollm2-135m --n 4 --max-new-tokens 64 \\
        --json docs/parity_tasks_smol_bf16.json
"""
import argparse
import json
import sys
import time

import torch

from adadecode_fx import AdaDecoder, ExitHeads
from adadecode_fx.bench.report import code_commit, machine_info
from adadecode_fx.bench.runner import first_diff
from adadecode_fx.heads import heads_for
from adadecode_fx.zoo import models
from adadecode_fx.zoo.data import prompt_sources, source_texts

TASKS = ("gsm8k:chat", "xsum", "mbpp", "humaneval:chat", "gsm8k")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--n", type=int, default=4, help="prompts per task (the eval slice)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=400, help="longer prompts keep their last tokens")
    p.add_argument("--seed", type=int, default=7, help="which prompts are drawn")
    p.add_argument("--json")
    args = p.parse_args(argv)

    model, tok = models.load(args.model, dtype=args.dtype)
    heads_dir = heads_for(args.model, model)
    decoder = AdaDecoder(model, ExitHeads.load(heads_dir, model) if heads_dir else None)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    hf = dict(do_sample=False, max_new_tokens=args.max_new_tokens, pad_token_id=pad, eos_token_id=[])
    rows, started = [], time.time()
    for task in args.tasks.split(","):
        records = prompt_sources([task], "eval", n=args.n, seed=args.seed)
        prompts = [tok(t).input_ids[-args.max_prompt_tokens:] for t in source_texts(tok, records)]
        want = []
        for r, ids in zip(records, prompts):
            x = torch.tensor([ids])
            want.append(model.generate(x, attention_mask=torch.ones_like(x), **hf)[0, len(ids):].tolist())
            out = decoder.generate(x, max_new_tokens=args.max_new_tokens, eos_token_id=None)
            rows.append({"task": task, "id": r["id"], "batch": 1, "prompt_tokens": len(ids),
                         "first_diff": first_diff(out.sequences[0, len(ids):].tolist(), want[-1]),
                         "early_tokens": out.stats.accepted + out.stats.rejected, "rejected": out.stats.rejected})
        width = max(len(ids) for ids in prompts)
        x = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
        out = decoder.generate(x, attention_mask=mask, max_new_tokens=args.max_new_tokens, eos_token_id=None,
                               pad_token_id=pad)
        for r, ids, w, got in zip(records, prompts, want, out.sequences[:, width:].tolist()):
            rows.append({"task": task, "id": r["id"], "batch": len(prompts), "prompt_tokens": len(ids),
                         "first_diff": first_diff(got, w)})
        done = [x for x in rows if x["task"] == task]
        print(f"{task}: {sum(x['first_diff'] is None for x in done)}/{len(done)} equal to HF greedy "
              f"(alone and batched), batch: {out.stats.summary()}, {time.time() - started:.0f} s", flush=True)
    equal = sum(x["first_diff"] is None for x in rows)
    print(f"{args.model} {args.dtype}: {equal}/{len(rows)} generations equal to HF greedy")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info("cpu"), "commit": code_commit(), "command": " ".join(sys.argv),
                       "model": args.model, "dtype": args.dtype, "heads": str(heads_dir), "equal": equal,
                       "generations": len(rows), "rows": rows}, f, indent=1)
    return 0 if equal == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
