#!/usr/bin/env python
"""Start-up cost of `adadecode generate`, warm and cold, against loading the same model with transformers
and calling its `generate` for the same tokens. Every run is a fresh process; the methods take turns.

- ``hf``: `AutoModelForCausalLM.from_pretrained(folder)`, its tokenizer, `generate(do_sample=False)`;
- ``warm``: `adadecode generate` with the capture cache holding this model (any run after the first);
- ``cold``: `adadecode generate` with an empty capture cache (the first run of a model structure).

The converted weights are on disk for all three (a zoo model's one-time GGUF conversion is not timed).
Every stderr line is time-stamped (the one-time notices), each adadecode run's tokens are checked
against the HF run's, and one cold and one warm process time their phases through the Python API.
Writes JSON (ratios to ``hf`` with median and spread, the phases) and prints a table.

Example:
    python bench/warm_start.py --model smollm2-135m --repeats 7 --out docs/warm_start_smollm2.json \
        --plot docs/warm_start_smollm2.png
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HF = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompt, n, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
ids = tok(prompt, return_tensors="pt").input_ids
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
print(json.dumps({"generated_ids": out[0, ids.shape[1]:].tolist()}))
"""


_PHASES = """
import json, sys, time
t0 = time.perf_counter(); marks = {}
def mark(name):
    marks[name] = round(time.perf_counter() - t0 - sum(marks.values()), 3)
import torch, adadecode_fx
from adadecode_fx import AdaDecoder, ExitHeads, build, models
from adadecode_fx.heads import shipped_heads
mark("import torch, adadecode_fx")
model, tok = models.load(sys.argv[1], dtype=sys.argv[4])
mark("load model + tokenizer")
heads = ExitHeads.load(shipped_heads(sys.argv[1]), model)
build.structural_graph(model)
mark("capture (or read the cached capture) + structural passes")
decoder = AdaDecoder(model, heads)
mark("exit probes + lowering + warm-up")
ids = tok(sys.argv[2], return_tensors="pt").input_ids
decoder.generate(ids, max_new_tokens=int(sys.argv[3]))
mark("generate (first call: traces the one-row layer steps)")
print(json.dumps({"generated_ids": [], "phases": marks}))
"""


def _run(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; its wall time, its stdout's last JSON line, and each stderr line with the second it came."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    timeline, pending = [], b""
    for chunk in iter(lambda: proc.stderr.read1(4096), b""):
        pending += chunk
        *lines, pending = pending.replace(b"\r", b"\n").split(b"\n")
        now = round(time.perf_counter() - start, 2)
        timeline += [(now, ln.decode(errors="replace").strip()) for ln in lines if ln.strip()]
    out = proc.stdout.read().decode()
    wall = time.perf_counter() - start
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n" + "\n".join(t for _, t in timeline[-20:]))
    last = json.loads(out.strip().splitlines()[-1])
    return {"wall_s": round(wall, 3), "ids": last["generated_ids"], "phases": last.get("phases"),
            "timeline": [t for t in timeline if not t[1].startswith("Loading weights")]}


def _summary(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": round(statistics.median(xs), 3), "p25": round(q[0], 3), "p75": round(q[2], 3),
            "min": round(min(xs), 3), "max": round(max(xs), 3)}


def plot(rep: dict, path: Path) -> None:
    """Wall time per method (median, p25-p75) and the per-phase timeline of a cold and a warm process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    names = list(rep["methods"])
    med = [rep["methods"][n]["wall_s"]["median"] for n in names]
    err = [[m - rep["methods"][n]["wall_s"]["p25"] for n, m in zip(names, med)],
           [rep["methods"][n]["wall_s"]["p75"] - m for n, m in zip(names, med)]]
    bars = a.bar(names, med, yerr=err, capsize=4)
    for bar, n in zip(bars, names):
        ratio = rep["methods"][n].get("ratio_to_hf")
        label = f"{bar.get_height():.1f} s" + (f"\n{ratio['median']:.2f}x HF" if ratio else "")
        a.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), label, ha="center", va="bottom", fontsize=8)
    a.set_ylabel("wall seconds, fresh process (median, p25-p75)")
    a.set_title("adadecode generate vs load + HF generate", fontsize=9)
    kinds = list(rep.get("phases_in_process") or {})
    left = [0.0] * len(kinds)
    for k, phase in enumerate(next(iter(rep["phases_in_process"].values()), {}) if kinds else []):
        widths = [rep["phases_in_process"][kind][phase] for kind in kinds]
        b.barh(kinds, widths, left=left, label=phase, color=f"C{k}")
        left = [x + w for x, w in zip(left, widths)]
    b.set_xlabel("seconds (one process each, Python API)")
    b.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    b.set_title("where the time goes", fontsize=9)
    m = rep["machine"]
    fig.suptitle(f"{rep['model']} {rep['dtype']}, {rep['max_new_tokens']} tokens; {m['cpu']} x{m['cores']}, "
                 f"torch {m['torch']}; commit {rep['commit']}\n{rep['command']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="zoo name or HF folder")
    p.add_argument("--prompt", default="def fibonacci(n):")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cold-repeats", type=int, default=2, help="cold runs (each captures again: ~20 s)")
    p.add_argument("--out", default=None, help="JSON file to write")
    p.add_argument("--plot", default=None, help="PNG file to write (needs matplotlib)")
    args = p.parse_args()

    from adadecode_fx.bench.report import code_commit, machine_info
    from adadecode_fx.zoo import models

    folder = str(models._ensure_dense(models.ZOO[args.model]) if args.model in models.ZOO else Path(args.model))
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    warm_cache = tempfile.mkdtemp(prefix="adadecode-warm-")
    ours = ["adadecode", "generate", "--model", args.model, "--max-new-tokens", str(args.max_new_tokens),
            "--dtype", args.dtype, "--prompt", args.prompt, "--json"]
    hf = [sys.executable, "-c", _HF, folder, args.prompt, str(args.max_new_tokens), args.dtype]
    _run(ours, {**base_env, "ADADECODE_CAPTURE_CACHE": warm_cache})  # fills the warm cache
    runs: dict[str, list[dict]] = {"hf": [], "warm": [], "cold": []}
    for r in range(args.repeats):
        plan = [("hf", hf, base_env), ("warm", ours, {**base_env, "ADADECODE_CAPTURE_CACHE": warm_cache})]
        if r < args.cold_repeats:
            plan.append(("cold", ours, {**base_env, "ADADECODE_CAPTURE_CACHE": tempfile.mkdtemp(prefix="adadecode-cold-")}))
        for name, cmd, env in (plan if r % 2 == 0 else plan[::-1]):
            runs[name].append(_run(cmd, env))
            print(f"round {r + 1}: {name} {runs[name][-1]['wall_s']:.2f} s", file=sys.stderr, flush=True)
    phases = {}
    if args.model in models.ZOO:  # where the time goes, in one process of each kind (the zoo's shipped heads)
        for kind, where in (("cold", tempfile.mkdtemp(prefix="adadecode-cold-")), ("warm", warm_cache)):
            cmd = [sys.executable, "-c", _PHASES, args.model, args.prompt, str(args.max_new_tokens), args.dtype]
            phases[kind] = _run(cmd, {**base_env, "ADADECODE_CAPTURE_CACHE": where})["phases"]
    reference = runs["hf"][0]["ids"]
    report = {"command": " ".join(sys.argv), "machine": machine_info(), "model": args.model, "folder": folder,
              "dtype": args.dtype, "max_new_tokens": args.max_new_tokens, "prompt": args.prompt,
              "commit": code_commit(),
              "methods": {}, "phases_in_process": phases, "parity": all(run["ids"] == reference for rs in runs.values() for run in rs)}
    for name, rs in runs.items():
        if not rs:
            continue
        walls = [run["wall_s"] for run in rs]
        entry = {"wall_s": _summary(walls), "walls": walls, "timeline_first_run": rs[0]["timeline"]}
        if name != "hf":
            pairs = [run["wall_s"] / h["wall_s"] for run, h in zip(rs, runs["hf"])]
            entry["ratio_to_hf"] = _summary(pairs)
        report["methods"][name] = entry
    print(f"{'method':6} | median s | [p25, p75] | ratio to hf (median, same round)")
    for name, e in report["methods"].items():
        w, ratio = e["wall_s"], e.get("ratio_to_hf")
        print(f"{name:6} | {w['median']:.2f} | [{w['p25']:.2f}, {w['p75']:.2f}] | "
              + (f"{ratio['median']:.2f}x [{ratio['p25']:.2f}, {ratio['p75']:.2f}]" if ratio else "1.00x"))
    print(f"parity: {report['parity']}")
    for kind, marks in phases.items():
        print(f"{kind} process, seconds per phase: " + "; ".join(f"{k} {v:.2f}" for k, v in marks.items()))
    from adadecode_fx.report_files import write_report

    write_report(report, args.out, args.plot, plot=plot)


if __name__ == "__main__":
    main()
