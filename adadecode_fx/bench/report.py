"""What a benchmark report holds beyond the raw per-prompt timings, and how it is written out.

- `aggregate`: one method's per-prompt rows summarized (tok/s, speed-up quantiles against
  ``hf_greedy`` (``hf_sample`` when sampling), parity (``None`` for sampling methods that draw their own
  way), peak memory and, for AdaDecode methods, exit / acceptance rates and
  critical-path layers per token);
- `heads_gain`: per backend, AdaDecode tok/s over the same program's at full depth, prompt by prompt
  (median, p25, p75): what the exit heads buy, apart from what the lowering gains over HF;
- `oracle_bound`: what exits could gain at best on the reference sequences, and the replayed schedule
  of the benchmarked configuration (both from `adadecode_fx.evaluation`); both are bounds over the same
  program at full depth, i.e. on `heads_gain`;
- `machine_info`: the machine and library versions, recorded with every report; `code_commit`: the
  code's commit;
- `write` (JSON + PNG via `plot`) and `summary_table` (the Markdown table ``adadecode bench`` prints).

The report dict itself is built by `adadecode_fx.bench.run_bench`.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
from pathlib import Path

from .methods import Method
from ..report_files import write_report


def code_commit() -> str | None:
    """The commit the code runs from: ADADECODE_COMMIT where set (a GPU machine gets the tree without
    .git, so bench/gpu.sh passes what bench/gpu_wheels.sh wrote), else git's HEAD of this checkout, with
    "+changes" for a dirty tree; None outside a git checkout."""
    if os.environ.get("ADADECODE_COMMIT"):
        return os.environ["ADADECODE_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        git = ["git", "-C", str(root)]
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def machine_info(device: str = "cpu") -> dict:
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": device}
    try:
        import psutil
        info["memory_gib"] = round(psutil.virtual_memory().total / 2 ** 30, 1)
        info["load_avg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except (ImportError, OSError):
        pass
    try:
        from .. import __version__
        info["adadecode_fx"] = __version__
    except ImportError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def spread(values) -> tuple[float, float, float]:
    """Median, p25 and p75 of ``values`` (inclusive quartiles; a single value is all three)."""
    values = list(values)
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q[0], q[2]


def _quantile(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    pos = (len(xs) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def aggregate(name: str, per_prompt: list, L: int, method: Method) -> dict:
    rows = [p["methods"][name] for p in per_prompt]
    tok_s = [r["tok_s"] for r in rows]
    sp = [r["speedup"] for r in rows if r["speedup"] is not None]
    mem = [r["peak_mem_mb"] for r in rows if r["peak_mem_mb"] is not None]
    out = {"n": len(rows), "tok_s_median": statistics.median(tok_s), "tok_s_min": min(tok_s), "tok_s_max": max(tok_s),
           "speedup_median": statistics.median(sp) if sp else None, "speedup_p25": _quantile(sp, 0.25),
           "speedup_p75": _quantile(sp, 0.75), "speedup_min": min(sp) if sp else None,
           "speedup_max": max(sp) if sp else None,
           "parity": _parity(rows),
           "new_tokens_total": sum(r["new_tokens"] for r in rows),
           "peak_mem_mb": max(mem) if mem else None, "info": method.info,
           "exit_rate_per_layer": None, "early_exit_rate": None, "acceptance_rate": None,
           "critical_path_per_token": None}
    stats = [r.get("stats") for r in rows]
    if all(s is not None for s in stats):
        tokens = sum(r["new_tokens"] for r in rows)
        hist: dict[str, int] = {}
        for s in stats:
            for k, v in s["exit_histogram"].items():
                hist[k] = hist.get(k, 0) + v
        acc, rej = sum(s["accepted"] for s in stats), sum(s["rejected"] for s in stats)
        out.update(exit_histogram=dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
                   exit_rate_per_layer={k: v / tokens for k, v in sorted(hist.items(), key=lambda kv: int(kv[0]))},
                   early_exit_rate=sum(v for k, v in hist.items() if int(k) < L - 1) / tokens,
                   acceptance_rate=acc / (acc + rej) if acc + rej else None,
                   accepted=acc, rejected=rej, early_emitted=sum(s["early_emitted"] for s in stats),
                   critical_path_per_token=sum(s["critical_path_layers"] for s in stats) / tokens)
    elif name in ("hf_greedy", "hf_sample", "hf_static_compile"):
        out["critical_path_per_token"] = float(L)  # every token runs the whole stack, one after another
    return out


def _parity(rows: list) -> float | None:
    """Share of prompts whose ids equal the baseline's; ``None`` where nothing was compared (a sampling
    method that draws its own way)."""
    same = [r["identical"] for r in rows]
    return None if any(x is None for x in same) else sum(same) / len(same)


def parity_text(m: dict, sep: str = " ", count: str = "n") -> str:
    """``100% (20/20)``, or ``n/a`` where parity was not measured (a sampling method that draws its own way).
    ``count``: the key of the number of sequences compared (``"rows"`` for a batch entry)."""
    if m["parity"] is None:
        return "n/a"
    return f"{m['parity']:.0%}{sep}({round(m['parity'] * m[count])}/{m[count]})"


def heads_gain(per_prompt: list, names: list) -> dict:
    """Per backend: ``adadecode_<b>`` tok/s / ``adadecode_<b>_full_depth`` tok/s on each prompt (both ran
    interleaved on it), summarized by median, p25, p75, min and max. Backends without both are left out."""
    out = {}
    for name in names:
        base = f"{name}_full_depth"
        if not name.startswith("adadecode_") or base not in names:
            continue
        ratios = [p["methods"][name]["heads_gain"] for p in per_prompt if "heads_gain" in p["methods"][name]]
        if not ratios:
            continue
        out[name[len("adadecode_"):]] = {
            "method": name, "full_depth": base, "n": len(ratios), "median": statistics.median(ratios),
            "p25": _quantile(ratios, 0.25), "p75": _quantile(ratios, 0.75), "min": min(ratios),
            "max": max(ratios), "over": "the same program and lowering at full depth (no exit heads)"}
    return out


def heads_gain_lines(rep: dict) -> list[str]:
    """What the heads bought per backend, next to what the replayed schedule bounds it by (printed by
    ``adadecode bench`` under its table)."""
    lines = []
    for backend, g in (rep.get("heads_gain") or {}).items():
        lines.append(f"heads gain {backend}: {g['median']:.2f}x [p25 {g['p25']:.2f}, p75 {g['p75']:.2f}] over the "
                     f"same program at full depth ({g['method']} / {g['full_depth']}, n={g['n']})")
    ob = rep.get("oracle_bound") or {}
    if ob.get("costs_error"):
        lines.append(f"costs not measured (modelled gain = bound): {ob['costs_error'][:200]}")
    if ob.get("oracle_speedup_bound"):
        modelled = ob["replayed"].get("modelled_gain")
        lines.append("over the same program at full depth: replayed schedule of this config "
                     + (f"{modelled:.2f}x modelled (deferred rows, LM-head calls at their measured costs), " if modelled else "")
                     + f"{ob['replayed']['speedup_bound']:.2f}x bound (rows free), oracle {ob['oracle_speedup_bound']:.2f}x "
                     f"({ob['oracle_layers_per_token']:.1f} layers/token)")
        pc = ob.get("perfect_confidence")
        if pc:
            lines.append(f"these heads with a perfect exit decision (confident exactly when right): "
                         f"{pc['modelled_gain']:.2f}x modelled (exit layers {pc['exit_layers']})")
        free = ob["replayed"].get("modelled_gain_free_exits")
        if free:
            lines.append(f"this config with free probes and deferred rows (the most cheaper exits can buy): "
                         f"{free:.2f}x modelled")
    return lines


def oracle_bound(decoder, heads, per_prompt: list, layers, threshold, max_pending: int) -> dict:
    """On the reference (HF greedy) sequences: the oracle bound (every token exits at the first head
    that agrees with the final layer) and the replayed schedule of the benchmarked configuration,
    both from `adadecode_fx.evaluation`."""
    from ..heads.evaluation import free_exits, head_records, measure_costs, report, schedule_summary, simulate

    seqs, lens = [], []
    for p in per_prompt:
        ref = p["reference_ids"]
        seqs.append(list(p["prompt_ids"]) + ref)
        lens.append(p["prompt_tokens"])
    L = decoder.program.num_layers
    records = head_records(decoder.program, heads, seqs, lens)
    costs_error = None
    try:
        costs = measure_costs(decoder.program, heads)
    except Exception as e:  # noqa: BLE001 - the oracle bound does not need them; the report says why they are 0
        costs = {"probe_cost": 0.0, "row_cost": 0.0, "epilogue_cost": 0.0}
        costs_error = f"{type(e).__name__}: {e}"
    rep = report(records, L, max_pending=max_pending, **costs)
    runs = [simulate({l: r["conf"][l] for l in layers}, {l: r["agree"][l] for l in layers}, L, threshold, max_pending)
            for r in records]
    replayed = schedule_summary(runs, L, (costs["probe_cost"], costs["row_cost"], costs["epilogue_cost"]))
    free = free_exits(records, list(layers), threshold, L, costs["epilogue_cost"], max_pending)
    return {"bound_over": rep["bound_over"], "oracle_layers_per_token": rep["oracle_layers_per_token"],
            "oracle_speedup_bound": rep["oracle_speedup_bound"], "perfect_confidence": rep["perfect_confidence"],
            "probe_cost_layers": costs["probe_cost"], "row_cost_layers": costs["row_cost"],
            "epilogue_cost_layers": costs["epilogue_cost"], "costs_error": costs_error, "head_layers": rep["layers"],
            "agreement_per_layer": {l: d["agreement"] for l, d in rep["per_layer"].items()},
            "replayed": {"exit_layers": list(layers), "threshold": threshold,
                         **{k: replayed[k] for k in ("layers_per_token", "speedup_bound", "modelled_gain")},
                         "modelled_gain_free_exits": free},
            "best_replayed": rep["recommended"]}


def plot(rep: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batching = rep.get("batching")
    gain = rep.get("heads_gain")
    panels = 2 + bool(batching) + bool(gain)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    a, b = axes[0], axes[1]
    names = rep["methods"]
    pm = rep["per_method"]
    med = [pm[n]["speedup_median"] or 0.0 for n in names]
    lo = [max(0.0, (pm[n]["speedup_median"] or 0) - (pm[n]["speedup_p25"] or 0)) for n in names]
    hi = [max(0.0, (pm[n]["speedup_p75"] or 0) - (pm[n]["speedup_median"] or 0)) for n in names]
    colors = ["tab:gray" if n.startswith("hf_") else "tab:cyan" if n.endswith("_full_depth") else "tab:blue"
              for n in names]
    bars = a.bar(range(len(names)), med, yerr=[lo, hi], capsize=4, color=colors)
    newline = "\n"  # an f-string expression cannot hold a backslash before Python 3.12
    for bar_, n in zip(bars, names):
        top = max(bar_.get_height(), pm[n]["speedup_p75"] or 0.0)
        a.text(bar_.get_x() + bar_.get_width() / 2, top + 0.02,
               f"{pm[n]['speedup_median']:.2f}x\nparity {parity_text(pm[n], sep=newline)}", ha="center",
               va="bottom", fontsize=8)
    a.axhline(1.0, ls="--", c="k", lw=0.8)
    ob = (rep.get("oracle_bound") or {}).get("oracle_speedup_bound")
    if ob:
        a.axhline(ob, ls=":", c="tab:red", lw=1, label=f"oracle bound {ob:.2f}x (critical-path layers)")
        a.legend(fontsize=8, loc="upper left")
    a.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    a.set_ylabel(f"speed-up vs {rep.get('baseline', 'hf_greedy')} (median, bars p25-p75)")
    cfg = rep["config"]
    sampling = cfg.get("sampling")
    how = "greedy" if sampling is None else "sampling " + ", ".join(f"{k} {v}" for k, v in sampling.items())
    a.set_title(f"{rep.get('model', '')} {cfg['dtype']}, {rep.get('task', '')} n={len(rep['per_prompt'])}, "
                f"{cfg['max_new_tokens']} tokens\n{how}", fontsize=9)
    a.set_ylim(0, max(med + [ob or 0, 1.0]) * 1.35)

    L = cfg["num_layers"]
    ada = [n for n in names if pm[n].get("exit_rate_per_layer") and not n.endswith("_full_depth")]
    all_layers = sorted({int(k) for n in ada for k in pm[n]["exit_rate_per_layer"]})
    width = 0.8 / max(1, len(ada))
    for j, n in enumerate(ada):
        rates = pm[n]["exit_rate_per_layer"]
        b.bar([i + j * width for i in range(len(all_layers))], [rates.get(str(l), 0.0) for l in all_layers],
              width=width, label=n)
    b.set_xticks([i + width * (len(ada) - 1) / 2 for i in range(len(all_layers))],
                 [f"{l}" + (" (full)" if l == L - 1 else "") for l in all_layers])
    b.set_xlabel("layer that produced the output token")
    b.set_ylabel("share of output tokens")
    b.set_title("AdaDecode exit layers" if ada else "no AdaDecode method ran", fontsize=9)
    if ada:
        b.legend(fontsize=8)
    if gain:
        _plot_heads_gain(axes[2], gain, rep.get("oracle_bound"))
    if batching:
        _plot_batching(axes[-1], batching)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.text(0.005, 0.005, _provenance(rep), fontsize=6, family="monospace", va="bottom", wrap=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _provenance(rep: dict) -> str:
    """The footer a figure carries: machine, software, commit and the command that made it."""
    m = rep.get("machine", {})
    command = rep.get("command", "")
    host = f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores"
    where = f"{m['gpu']} ({m.get('device')}), host {host}" if m.get("gpu") else f"{host}, {m.get('device', 'cpu')}"
    return (f"{where}; torch {m.get('torch', '?')}, "
            f"transformers {m.get('transformers', '?')}; commit {rep.get('commit') or '?'}\n"
            f"{command if len(command) <= 230 else command[:227] + '...'}")


def _plot_heads_gain(ax, gain: dict, ob) -> None:
    backends = list(gain)
    med = [gain[b]["median"] for b in backends]
    lo = [max(0.0, gain[b]["median"] - gain[b]["p25"]) for b in backends]
    hi = [max(0.0, gain[b]["p75"] - gain[b]["median"]) for b in backends]
    bars = ax.bar(range(len(backends)), med, yerr=[lo, hi], capsize=4, color="tab:blue", width=0.5)
    for bar_, g in zip(bars, med):
        ax.text(bar_.get_x() + bar_.get_width() / 2, bar_.get_height() + 0.02, f"{g:.2f}x", ha="center",
                va="bottom", fontsize=8)
    ax.axhline(1.0, ls="--", c="k", lw=0.8)
    top = max(med + [1.0])
    replayed = ((ob or {}).get("replayed") or {}).get("speedup_bound")
    if replayed:
        ax.axhline(replayed, ls=":", c="tab:red", lw=1, label=f"replayed bound {replayed:.2f}x")
        ax.legend(fontsize=8, loc="upper left")
        top = max(top, replayed)
    ax.set_xticks(range(len(backends)), backends, fontsize=8)
    ax.set_xlim(-0.75, len(backends) - 0.25)
    ax.set_ylim(0, top * 1.35)
    ax.set_ylabel("tok/s over full-depth tok/s (median, p25-p75)")
    ax.set_title("heads gain over the same program at full depth", fontsize=9)


def _plot_batching(ax, batching: dict) -> None:
    sizes = list(batching["per_batch"])
    names = list(batching["per_batch"][sizes[0]])
    width = 0.8 / len(names)
    for j, n in enumerate(names):
        tok_s = [batching["per_batch"][B][n]["tok_s_median"] for B in sizes]
        bars = ax.bar([i + j * width for i in range(len(sizes))], tok_s, width=width, label=n,
                      color="tab:gray" if n.startswith("hf_") else None)
        for bar_, B in zip(bars, sizes):
            e = batching["per_batch"][B][n]
            parity = "n/a" if e["parity"] is None else f"{e['parity']:.0%}"
            ax.text(bar_.get_x() + bar_.get_width() / 2, bar_.get_height(),
                    f"{e['speedup_vs_hf_same_batch']:.2f}x\n{parity}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(sizes))], [f"batch {B}" for B in sizes])
    ax.set_ylabel("generated tok/s, all rows (median over groups)")
    base = batching.get("baseline", "hf_greedy")
    ax.set_title(f"batched throughput (labels: vs {base} at that batch, row parity)", fontsize=9)
    ax.legend(fontsize=8)


def write(rep: dict, json_path=None, png_path=None) -> None:
    write_report(rep, json_path, png_path, plot=plot)


def summary_table(rep: dict) -> str:
    lines = ["| method | tok/s (median) | speed-up median [p25, p75] | heads gain over full depth [p25, p75] | "
             "parity | early-exit | acceptance | critical-path layers/token | peak mem MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    gains = {g["method"]: g for g in (rep.get("heads_gain") or {}).values()}

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)
    for n in rep["methods"]:
        m = rep["per_method"][n]
        g = gains.get(n)
        gain = f"{g['median']:.2f}x [{g['p25']:.2f}, {g['p75']:.2f}]" if g else "-"
        lines.append(f"| {n} | {m['tok_s_median']:.2f} | {f(m['speedup_median'], '.2f')}x "
                     f"[{f(m['speedup_p25'], '.2f')}, {f(m['speedup_p75'], '.2f')}] | {gain} | {parity_text(m)} | "
                     f"{f(m['early_exit_rate'], '.1%')} | "
                     f"{f(m['acceptance_rate'], '.1%')} | {f(m['critical_path_per_token'], '.1f')} | "
                     f"{f(m['peak_mem_mb'], '.0f')} |")
    for n, why in rep.get("skipped", {}).items():
        lines.append(f"| {n} | skipped: {why} | | | | | | | |")
    return "\n".join(lines)


__all__ = ["aggregate", "heads_gain", "heads_gain_lines", "machine_info", "oracle_bound", "plot", "summary_table", "write"]
