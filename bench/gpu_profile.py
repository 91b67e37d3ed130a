#!/usr/bin/env python
"""Where a GPU decode step's wall time goes, for the cudagraphs backend with and without exits.

The GPU bench (bench/gpu_bench.py) found that with the replayed schedule the graphs' GPU time is 1.1-1.2x
below full depth's, while the wall time is not: the host's share grows. This profiles one prompt of each
variant (the same decisive random model and replayed schedule as the bench) with torch.profiler (CPU ops,
CUDA runtime calls and kernels) and cProfile, and writes per variant:
- ``profile.json``: wall, kernel-busy and GPU-idle time per step, the idle gaps by size, and the CUDA
  runtime calls (graph launches, synchronizations, copies) and ATen ops outside the graphs per step;
- ``profile.txt``: the same, the profiler's table and cProfile's top functions of the exit variant.

    PYTHONPATH=$PWD python bench/gpu_profile.py --out out/gpu   # on a GPU; --device cpu runs its flow here
"""
import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from gpu_bench import Bench  # noqa: E402  (the bench's model, heads, schedule and variants)

VARIANTS = ("adadecode_cudagraphs_inductor_full_depth", "adadecode_cudagraphs_inductor")


def intervals_union(spans):
    total, end = 0.0, None
    for s, e in sorted(spans):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def analyse(prof, steps: int, wall_s: float) -> dict:
    """Kernel-busy time, idle gaps between kernels, and CPU-side calls per step (microseconds)."""
    kernels, runtime, aten = [], {}, {}
    for ev in prof.events():
        dt = ev.device_type == torch.autograd.DeviceType.CUDA
        if dt and ev.time_range.end > ev.time_range.start:
            kernels.append((ev.time_range.start, ev.time_range.end))
        elif ev.name.startswith("cuda") or ev.name.startswith("cu"):
            r = runtime.setdefault(ev.name, [0, 0.0])
            r[0] += 1
            r[1] += ev.time_range.elapsed_us()
        elif ev.name.startswith("aten::") and ev.cpu_parent is None:
            a = aten.setdefault(ev.name, [0, 0.0])
            a[0] += 1
            a[1] += ev.time_range.elapsed_us()
    out = {"steps": steps, "wall_us_per_step": wall_s * 1e6 / steps}
    if kernels:
        kernels.sort()
        busy = intervals_union(kernels)
        span = kernels[-1][1] - kernels[0][0]
        gaps, end = [], kernels[0][1]
        for s, e in kernels[1:]:
            if s > end:
                gaps.append(s - end)
            end = max(end, e)
        out.update(kernel_busy_us_per_step=busy / steps, kernel_span_us_per_step=span / steps,
                   gpu_idle_us_per_step=(span - busy) / steps,
                   idle_gaps_per_step={f">{lo}us": sum(1 for g in gaps if g > lo) / steps for lo in (5, 20, 50, 100)},
                   idle_us_per_step_in_gaps_over_20us=sum(g for g in gaps if g > 20) / steps)
    out["cuda_runtime_per_step"] = {k: {"calls": round(c / steps, 2), "us": round(t / steps, 1)}
                                    for k, (c, t) in sorted(runtime.items(), key=lambda kv: -kv[1][1])[:12]}
    out["top_level_aten_per_step"] = {k: {"calls": round(c / steps, 2), "us": round(t / steps, 1)}
                                      for k, (c, t) in sorted(aten.items(), key=lambda kv: -kv[1][1])[:15]}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schedule", default="bench/data/qwen2.5-coder-0.5b.schedule.json")
    p.add_argument("--out", default="out/gpu")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-new-tokens", type=int, default=128)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    schedule = json.load(open(args.schedule))
    schedule["records"] = schedule["records"][:1]
    bench_args = argparse.Namespace(device=args.device, dtype="bfloat16", max_new_tokens=args.max_new_tokens,
                                    methods=VARIANTS, schedule=args.schedule, build_deadline=1e9)
    bench = Bench(bench_args, schedule)
    ids = torch.tensor([schedule["records"][0]["prompt_ids"]], device=args.device)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    report, text = {"machine": bench.report["machine"], "commit": bench.report["commit"],
                    "max_new_tokens": args.max_new_tokens}, []
    for name in VARIANTS:
        bench.add_variant(name)
        bench.warm(name)
        run = bench.methods[name].run
        run(ids)
        sync()
        t0 = time.perf_counter()
        _, stats = run(ids)
        sync()
        wall = time.perf_counter() - t0
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            run(ids)
            sync()
        rec = analyse(prof, stats["steps"], wall)
        rec["stats"] = {k: stats[k] for k in ("steps", "early_emitted", "rejected", "critical_path_layers")}
        report[name] = rec
        text += [f"== {name}", json.dumps(rec, indent=1),
                 prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)]
        if name == VARIANTS[-1]:
            pr = cProfile.Profile()
            pr.enable()
            run(ids)
            sync()
            pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
            text.append(s.getvalue())
        json.dump(report, open(os.path.join(args.out, "profile.json"), "w"), indent=1)
        open(os.path.join(args.out, "profile.txt"), "w").write("\n".join(text))
        print(f"{name}: " + json.dumps({k: v for k, v in rec.items() if not isinstance(v, dict)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
