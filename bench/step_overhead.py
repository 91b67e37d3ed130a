#!/usr/bin/env python
"""The host's part of a cudagraphs decode step: CPU time and kernels outside its static calls.

On a GPU a static call is one graph replay, so what a step costs the host is everything else: building
the step's inputs, the copies in and out of the static buffers, the exit decision, verification and
bookkeeping. While the host does that after a probe's read-back, the GPU waits. This measures that
part on the CPU, where it can be told apart: each static call's body (what a replay does) is timed and
subtracted from the generation's wall time, and the ATen operations dispatched outside the bodies are
counted (views apart): each one is a kernel launch on a GPU. The model is a random Qwen2-shaped decoder
with many layers and a tiny width (so the bodies are cheap and the runtime's per-layer work shows), and
random heads that exit often.

    PYTHONPATH=$PWD python bench/step_overhead.py --layers 24 --repeats 5
"""
import argparse
import json
import statistics
import time

import torch
import transformers as tf
from torch.utils._python_dispatch import TorchDispatchMode

from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
from adadecode_fx.lower import static_graphs


def small_decoder(layers: int):
    torch.manual_seed(0)
    config = tf.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            tie_word_embeddings=False)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None
    return model


class BodyTimer:
    """Times `StaticCall.run_uncaptured` (the body: what a GPU replays) and counts the calls."""

    def __init__(self, ops=None):
        self.seconds, self.calls, self.ops = 0.0, 0, ops
        self.original = static_graphs.StaticCall.run_uncaptured

    def __enter__(self):
        timer, original = self, self.original

        def run_uncaptured(call_self):
            timer.calls += 1
            if timer.ops is not None:
                timer.ops.on = False
            t0 = time.perf_counter()
            original(call_self)
            timer.seconds += time.perf_counter() - t0
            if timer.ops is not None:
                timer.ops.on = True

        static_graphs.StaticCall.run_uncaptured = run_uncaptured
        return self

    def __exit__(self, *exc):
        static_graphs.StaticCall.run_uncaptured = self.original


class OpCounter(TorchDispatchMode):
    """ATen operations dispatched while ``on``, views apart (they launch no kernel), by name."""

    def __init__(self):
        super().__init__()
        self.on, self.by_name = True, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on and not func.is_view:
            name = str(func.overloadpacket.__name__)
            self.by_name[name] = self.by_name.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--exit-layers", default="7,19")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = small_decoder(args.layers)
    layers = tuple(int(x) for x in args.exit_layers.split(","))
    heads = ExitHeads.random(model, layers, scale=2.0, seed=1)
    decoder = AdaDecoder(model, heads, AdaDecodeConfig(backend="cudagraphs", threshold=0.01, max_pending=5))
    prompt = list(range(5, 40))
    decoder.generate(prompt, 20, eos_token_id=None)
    per_step, stats = [], None
    for _ in range(args.repeats):
        with BodyTimer() as timer:
            t0 = time.perf_counter()
            out = decoder.generate(prompt, args.new_tokens, eos_token_id=None)
            wall = time.perf_counter() - t0
        stats = out.stats
        per_step.append(1e6 * (wall - timer.seconds) / stats.steps)
    # one more generation, not timed: what a step launches outside its graphs
    with OpCounter() as ops, BodyTimer(ops) as timer:
        decoder.generate(prompt, args.new_tokens, eos_token_id=None)
    steps = stats.steps
    # the host alone: static calls that compute nothing (as a replay costs the host next to nothing), so
    # no subtraction and no uncaptured work is left in the wall time but the prefill, which runs outside
    # the static calls and is timed on its own here. The outputs go stale, so the decisions differ: the
    # steps are counted again.
    skipped = []
    real = static_graphs.StaticCall.run_uncaptured
    static_graphs.StaticCall.run_uncaptured = lambda call_self: None
    try:
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            decoder.generate(prompt, 1, eos_token_id=None)
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = decoder.generate(prompt, args.new_tokens, eos_token_id=None)
            skipped.append(1e6 * (time.perf_counter() - t0 - prefill) / out.stats.steps)
    finally:
        static_graphs.StaticCall.run_uncaptured = real
    result = {"layers": args.layers, "exit_layers": list(layers), "steps": steps,
              "early_emitted": stats.early_emitted, "rejected": stats.rejected, "threads": args.threads,
              "outside_static_calls_us_per_step": {"median": round(statistics.median(per_step), 1),
                                                   "all": [round(x, 1) for x in per_step]},
              "host_us_per_step_static_calls_skipped": {"median": round(statistics.median(skipped), 1),
                                                        "all": [round(x, 1) for x in skipped]},
              "static_calls_per_step": round(timer.calls / steps, 2),
              "kernels_outside_static_calls_per_step": round(sum(ops.by_name.values()) / steps, 2),
              "kernels_outside_by_op": dict(sorted(ops.by_name.items(), key=lambda kv: -kv[1])[:8])}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
