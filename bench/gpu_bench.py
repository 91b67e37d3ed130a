#!/usr/bin/env python
"""GPU bench: HF eager greedy, HF static cache + compile, AdaDecode cudagraphs with ATen's and inductor's
kernels (and eager, on fewer prompts), on a random model of a zoo model's shape, replaying an exit schedule
recorded on the real model on a CPU. Each cudagraphs variant also runs at full depth (``..._full_depth``:
the same program and graphs without exit heads, plain greedy), so the report says what the exits buy on the
GPU (``heads_gain``) beside what the whole thing buys over HF.

Why not the real weights: they are 491 MB for Qwen2.5-Coder and a GPU call here carries 64 MiB. The time of a
greedy step depends on shapes and on the schedule (exits, block sizes, rollbacks), not on the weights' values;
the model is made decisive (`adadecode_fx.zoo.shapes.make_decisive`) so that every method emits the same tokens
in bf16 and the replay follows the recorded schedule step for step (`adadecode_fx.bench.replay`). The shipped
heads' adapters and shortlist are used, so the probes cost what they cost; their guesses are replaced by the
recorded outcomes.

The device is lent for minutes, so a figure must come out early and survive what fails after it: the
results are written after every prompt; the variants that compile (``compile_segments``) are built only
after the first prompt has been timed, and not at all past ``--build-deadline``; a variant that fails to
build, warm up or run is recorded under ``failed`` and the others go on.

    PYTHONPATH=$PWD python bench/gpu_bench.py --schedule bench/data/qwen2.5-coder-0.5b.schedule.json \
        --json out/gpu/bench.json
"""
import argparse
import json
import statistics
import sys
import time
import traceback

import torch
from torch._dynamo.utils import counters

from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
from adadecode_fx.bench.methods import BENCH_BACKENDS, Method, hf_method, run_timed, static_compile_method
from adadecode_fx.bench.replay import ReplayDecoder
from adadecode_fx.bench.report import code_commit, machine_info, spread
from adadecode_fx.heads import shipped_heads
from adadecode_fx.heads.format import model_fingerprint
from adadecode_fx.zoo.shapes import random_model

METHODS = ("hf_greedy", "hf_static_compile", "adadecode_cudagraphs", "adadecode_cudagraphs_full_depth",
           "adadecode_cudagraphs_inductor", "adadecode_cudagraphs_inductor_full_depth", "adadecode_eager")
# AdaDecode variants: method name -> config options besides the schedule's. A ``_full_depth`` one has no exit
# heads: every token runs all layers through the same lowering, which is what its sibling's heads are set against.
FULL_DEPTH = "_full_depth"
VARIANTS = {f"adadecode_cudagraphs{kind}{depth}": BENCH_BACKENDS["cudagraphs" + (kind or "_aten")]
            for kind in ("", "_inductor") for depth in ("", FULL_DEPTH)}
VARIANTS["adadecode_eager"] = BENCH_BACKENDS["eager"]


def log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def graph_times(decoder, repeats: int = 20) -> dict:
    """Milliseconds per replay of each captured graph of a cudagraphs decoder (CUDA events, median of
    ``repeats``), by static call: what the GPU spends per run (probes and LM head inside), to set
    against the wall time per step (the rest is the runtime's Python, copies and the probes'
    read-backs). Run after the timed prompts: a replay rewrites K/V rows that the next prefill
    overwrites."""
    times = {}
    for key, call in decoder.program.runner.book.calls.items():
        if call.graph is None:
            continue
        call.graph.replay()
        samples = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call.graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        times[repr(key)] = round(statistics.median(samples), 4)
    return times


class Bench:
    """The methods of one run, what failed, and the report written after every prompt."""

    def __init__(self, args, schedule):
        self.args, self.schedule, self.started = args, schedule, time.time()
        self.model = random_model(schedule["model"], dtype=args.dtype, device=args.device)
        self.heads = ExitHeads.load(shipped_heads(schedule["model"]))
        self.heads.fingerprint = model_fingerprint(self.model)  # the shipped adapters, on a model not theirs
        self.records = {tuple(r["prompt_ids"]): r for r in schedule["records"]}
        cfg = schedule["config"]
        self.settings = dict(exit_layers=tuple(cfg["exit_layers"]), threshold=cfg["threshold"],
                             max_pending=cfg["max_pending"])
        prompts = [torch.tensor([r["prompt_ids"]], device=args.device) for r in schedule["records"]]
        self.longest = max(prompts, key=lambda ids: ids.shape[1])
        self.shortest = min(prompts, key=lambda ids: ids.shape[1])
        self.methods: dict[str, Method] = {"hf_greedy": hf_method("hf_greedy", self.model, args.max_new_tokens)}
        if "hf_static_compile" in args.methods:
            self.methods["hf_static_compile"] = static_compile_method(self.model, args.max_new_tokens, args.device)
        self.decoders, self.failed, self.made = {}, {}, {}
        self.report = {"machine": machine_info(args.device), "commit": code_commit(), "argv": sys.argv,
                       "schedule": args.schedule, "schedule_config": cfg, "recorded_with": schedule["recorded_with"],
                       "max_new_tokens": args.max_new_tokens, "dtype": args.dtype, "failed": self.failed,
                       "prompts": []}

    def elapsed(self) -> float:
        return time.time() - self.started

    def _drop(self, name: str, when: str, e: Exception) -> None:
        if name == "hf_greedy":  # the reference every other method is compared with
            raise e
        traceback.print_exc()
        self.failed[name] = f"{when}: {type(e).__name__}: {e}"[:2000]
        self.methods.pop(name, None)
        self.decoders.pop(name, None)

    def add_variant(self, name: str) -> None:
        """Build an AdaDecode variant (capture, lowering, graphs: its construction warms it up)."""
        if self.elapsed() > self.args.build_deadline:
            self.failed[name] = f"not built: {self.args.build_deadline} s had passed"
            return
        options = dict(VARIANTS[name])
        if options["backend"] == "cudagraphs":
            slots = len(self.longest[0]) + self.args.max_new_tokens + 1
            options["max_cache_len"] = -(-slots // 256) * 256
        full_depth = name.endswith(FULL_DEPTH)
        t0 = time.perf_counter()
        try:
            if full_depth:  # no heads: resolve() would otherwise take the exit layers from them
                settings = dict(self.settings, exit_layers=(), threshold=None)
                dec = AdaDecoder(self.model, None, AdaDecodeConfig(**options, **settings))
            else:
                config = AdaDecodeConfig(**options, **self.settings)
                dec = ReplayDecoder(AdaDecoder(self.model, self.heads, config).program)
        except Exception as e:
            self._drop(name, "build", e)
            return
        log(f"{name}: built and warmed in {time.perf_counter() - t0:.1f} s")
        self.decoders[name] = dec
        records, T = self.records, self.args.max_new_tokens

        def run(ids):
            if full_depth:
                out = dec.generate(ids, max_new_tokens=T, eos_token_id=None)
                return list(out.new_tokens), out.stats.to_dict()
            prompt = ids[0].tolist()
            out, followed = dec.replay(prompt, records[tuple(prompt)], T)
            return list(out.new_tokens), {**out.stats.to_dict(), "replay": followed}

        self.methods[name] = Method(name, run, {"config": json.loads(dec.config.to_json())})

    def warm(self, name: str) -> None:
        """One untimed call: compiles, captures, lazy CUDA initialisation. On the longest prompt, since HF's
        static cache keeps the largest max_cache_len it has seen; HF static compile also on the shortest, so
        that torch.compile marks the prefill length dynamic before timing (else timed calls recompile)."""
        t0 = time.perf_counter()
        try:
            self.methods[name].run(self.longest)
            if name == "hf_static_compile" and self.shortest.shape[1] != self.longest.shape[1]:
                self.methods[name].run(self.shortest)
        except Exception as e:
            self._drop(name, "warm-up", e)
            return
        self.report.setdefault("warmup_s", {})[name] = round(time.perf_counter() - t0, 1)
        log(f"{name}: warm-up {self.report['warmup_s'][name]} s")
        dec = self.decoders.get(name)
        if dec is not None and dec.program.runner is not None:
            self.made[name] = dec.program.runner.made

    def time_prompt(self, k: int, rec: dict) -> None:
        """One timed call of each method on prompt ``rec``, interleaved; then the report is written."""
        ids = torch.tensor([rec["prompt_ids"]], device=self.args.device)
        runs, order = {}, list(self.methods.items())
        for name, method in order[k % len(order):] + order[:k % len(order)]:  # each prompt starts one later
            if name == "adadecode_eager" and k >= self.args.eager_prompts:
                continue
            graphs = counters["stats"]["unique_graphs"]
            book = self.decoders[name].program.runner.book if name in self.made else None
            replays = dict(book.replays) if book is not None else None
            try:
                runs[name] = run_timed(method, ids, self.args.device, 0.005)
            except Exception as e:
                self._drop(name, f"prompt {k}", e)
                continue
            # a compile inside a timed call makes its time worthless: the JSON says so
            runs[name]["graphs_compiled"] = counters["stats"]["unique_graphs"] - graphs
            if book is not None:  # static calls by key, to weigh with each graph's GPU time (`graph_ms`)
                runs[name]["static_calls"] = {repr(key): n - replays.get(key, 0) for key, n in book.replays.items()
                                              if n > replays.get(key, 0)}
        ref = runs["hf_greedy"]["tokens"]
        for run in runs.values():
            run["same_as_hf_greedy"] = run["tokens"] == ref
            run["tokens"] = run["tokens"][:8]  # enough to see what was emitted; the JSON stays small
        self.report["prompts"].append({"id": rec["id"], "prompt_len": len(rec["prompt_ids"]),
                                       "recorded_stats": rec["stats"], "runs": runs})
        self.report["graphs_made_after_warm_up"] = {
            n: self.decoders[n].program.runner.made - m for n, m in self.made.items() if n in self.decoders}
        # a probe asked about anything but its run's last row runs uncaptured: its time would not be the design's
        self.report["probes_outside_their_runs"] = {
            n: self.decoders[n].program.runner.unfolded_probes for n in self.made if n in self.decoders}
        log(f"prompt {k}: " + ", ".join(f"{n} {r['tok_s']:.1f} tok/s" for n, r in runs.items()))
        self.write()

    def write(self) -> None:
        self.report["methods"] = sorted({n for p in self.report["prompts"] for n in p["runs"]} | set(self.methods),
                                        key=METHODS.index)
        summarize(self.report)
        self.report["wall_s"] = round(self.elapsed(), 1)
        with open(self.args.json, "w") as f:
            json.dump(self.report, f, indent=1)


def gpu_share(report: dict) -> None:
    """Per timed cudagraphs call: the GPU time of its replays (each static call's count x its graph's
    ``graph_ms``) and that time's share of the call's wall time. Near 1 the GPU's kernels bound a step;
    far below, the host does (the runtime's Python, copies, read-backs), and the rest is GPU idle time."""
    for prompt in report["prompts"]:
        for name, run in prompt["runs"].items():
            ms = report.get("graph_ms", {}).get(name)
            if not isinstance(ms, dict) or "static_calls" not in run:
                continue
            busy = sum(n * ms.get(key, 0.0) for key, n in run["static_calls"].items())
            run["graph_gpu_ms"] = round(busy, 2)
            run["graph_gpu_share"] = round(busy / (1000 * run["seconds"]), 3)


def summarize(report: dict) -> None:
    """Per method: median tok/s, median per-prompt speed-up against each HF method, token agreement, for
    cudagraphs variants the median share of wall time the GPU spent in their graphs, and where the same
    variant ran at full depth on the same prompts, ``heads_gain``: the median (p25, p75) per-prompt ratio
    of their tok/s, what the exits buy over the same program without them."""
    rows = report["prompts"]
    summary = {}
    for name in report["methods"]:
        mine = [r["runs"] for r in rows if name in r["runs"]]
        if not mine:
            continue
        s = {"prompts": len(mine), "tok_s_median": statistics.median(r[name]["tok_s"] for r in mine),
             "same_tokens_as_hf_greedy": sum(r[name]["same_as_hf_greedy"] for r in mine),
             "graphs_compiled_in_timed_calls": sum(r[name].get("graphs_compiled", 0) for r in mine)}
        for base in ("hf_greedy", "hf_static_compile"):
            pairs = [r[name]["tok_s"] / r[base]["tok_s"] for r in mine if r.get(base, {}).get("tok_s")]
            if pairs and base != name:
                s[f"speedup_vs_{base}_median"] = statistics.median(pairs)
        shares = [r[name]["graph_gpu_share"] for r in mine if "graph_gpu_share" in r[name]]
        if shares:
            s["graph_gpu_share_median"] = statistics.median(shares)
        gains = sorted(r[name]["tok_s"] / r[name + FULL_DEPTH]["tok_s"] for r in mine if name + FULL_DEPTH in r)
        if gains:
            median, p25, p75 = spread(gains)
            s["heads_gain"] = {"median": median, "p25": p25, "p75": p75, "n": len(gains)}
        summary[name] = s
    report["summary"] = summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schedule", default="bench/data/qwen2.5-coder-0.5b.schedule.json")
    p.add_argument("--json", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompts", type=int, default=None, help="use the first N recorded prompts (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the schedule's")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--eager-prompts", type=int, default=1, help="adadecode_eager only on this many prompts (slow)")
    p.add_argument("--deadline", type=float, default=300.0,
                   help="seconds; no prompt after the first starts after it")
    p.add_argument("--build-deadline", type=float, default=200.0,
                   help="seconds; no AdaDecode variant starts building after it (compiles take minutes)")
    args = p.parse_args()
    schedule = json.load(open(args.schedule))
    schedule["records"] = schedule["records"][:args.prompts]
    args.max_new_tokens = args.max_new_tokens or schedule["max_new_tokens"]
    if args.max_new_tokens > schedule["max_new_tokens"]:
        raise SystemExit(f"the schedule covers {schedule['max_new_tokens']} new tokens at most")
    args.methods = tuple(m for m in args.methods.split(",") if m)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")

    bench = Bench(args, schedule)
    compiling = [n for n in VARIANTS if n in args.methods and VARIANTS[n].get("compile_segments")]
    for name in VARIANTS:
        if name in args.methods and name not in compiling:
            bench.add_variant(name)
    bench.report["setup_s"] = round(bench.elapsed(), 1)
    for name in list(bench.methods):
        bench.warm(name)
    for k, rec in enumerate(schedule["records"]):
        if k and bench.elapsed() > args.deadline:  # the first prompt always runs: no figure without it
            bench.report["stopped"] = f"deadline {args.deadline} s reached after {k} prompts"
            break
        bench.time_prompt(k, rec)
        if k == 0:  # a figure is on disk: now the variants whose compile takes minutes
            for name in compiling:
                bench.add_variant(name)
                if name in bench.methods:
                    bench.warm(name)
    if args.device.startswith("cuda"):
        for name, dec in bench.decoders.items():
            if dec.program.runner is not None:
                try:
                    bench.report.setdefault("graph_ms", {})[name] = graph_times(dec)
                except Exception as e:  # a figure about the figures: never worth the run
                    bench.report.setdefault("graph_ms", {})[name] = f"{type(e).__name__}: {e}"[:500]
        gpu_share(bench.report)
    bench.write()
    for name, s in bench.report.get("summary", {}).items():
        vs = "  ".join(f"{s[k]:5.2f}x {k[11:-7]}" for k in s if k.startswith("speedup_vs_"))
        print(f"{name:40s} {s['tok_s_median']:8.1f} tok/s  {vs}  same tokens as HF greedy "
              f"{s['same_tokens_as_hf_greedy']}/{s['prompts']}"
              + (f"  GPU in graphs {s['graph_gpu_share_median']:.0%} of the time"
                 if "graph_gpu_share_median" in s else "")
              + (f"  heads gain {s['heads_gain']['median']:.2f}x ({s['heads_gain']['p25']:.2f}-"
                 f"{s['heads_gain']['p75']:.2f}) over {name}{FULL_DEPTH}" if "heads_gain" in s else "")
              + (f"  COMPILED {s['graphs_compiled_in_timed_calls']} graphs while timed"
                 if s["graphs_compiled_in_timed_calls"] else ""))
    for name, why in bench.failed.items():
        print(f"{name:40s} FAILED {why.splitlines()[0][:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
