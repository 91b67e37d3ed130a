#!/usr/bin/env python
"""The figure of a `bench/gpu_bench.py` run: per method, the per-prompt tok/s ratio against HF eager greedy
and against HF static cache + compile (median, bars p25-p75, labels with parity), and what the exits buy
over the same graphs at full depth. The footer says machine, software, commit and command.

    python bench/gpu_plot.py out/gpu/bench.json docs/bench_gpu_qwen_bf16_cudagraphs.png

Runs where the JSON comes back (the GPU image may have no matplotlib), from the repository root.
"""
import json
import sys

from adadecode_fx.bench.report import spread


def ratios(report: dict, method: str, base: str) -> list[float]:
    """Per prompt: tok/s of ``method`` over ``base``, where both ran on that prompt."""
    out = []
    for prompt in report["prompts"]:
        runs = prompt["runs"]
        if method in runs and base in runs and runs[base].get("tok_s"):
            out.append(runs[method]["tok_s"] / runs[base]["tok_s"])
    return out


def footer(report: dict) -> str:
    m = report.get("machine", {})
    gpu = m.get("gpu") or m.get("device", "?")
    argv = " ".join(report.get("argv", []))
    return (f"{gpu}; {m.get('cpu', '?')}; torch {m.get('torch', '?')}, transformers {m.get('transformers', '?')}; "
            f"{report.get('dtype', '?')}, {report.get('max_new_tokens', '?')} new tokens; commit "
            f"{report.get('commit') or '?'}\n{argv if len(argv) <= 230 else argv[:227] + '...'}")


def plot(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in report["methods"] if any(m in p["runs"] for p in report["prompts"])]
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    for ax, base in zip(axes[:2], ("hf_greedy", "hf_static_compile")):
        shown = [m for m in methods if m != base and ratios(report, m, base)]
        stats = [spread(ratios(report, m, base)) for m in shown]
        med = [s[0] for s in stats]
        bars = ax.bar(range(len(shown)), med, yerr=[[s[0] - s[1] for s in stats], [s[2] - s[0] for s in stats]],
                      capsize=4, color=["tab:gray" if m.startswith("hf_") else
                                        "tab:cyan" if m.endswith("_full_depth") else "tab:blue" for m in shown])
        for bar, m, s in zip(bars, shown, stats):
            runs = [p["runs"][m] for p in report["prompts"] if m in p["runs"]]
            same = sum(bool(r.get("same_as_hf_greedy")) for r in runs)
            ax.text(bar.get_x() + bar.get_width() / 2, s[2] * 1.02, f"{s[0]:.2f}x\nHF tokens {same}/{len(runs)}",
                    ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(shown)), shown, rotation=25, ha="right", fontsize=7)
        ax.set_ylabel(f"tok/s over {base} (median, bars p25-p75)", fontsize=8)
        ax.set_ylim(0, max(med + [1.0]) * 1.35)
        ax.set_title(f"vs {base}, n={len(report['prompts'])} prompts", fontsize=9)
    gains = [(m, spread(ratios(report, m, f"{m}_full_depth"))) for m in methods
             if not m.endswith("_full_depth") and ratios(report, m, f"{m}_full_depth")]
    ax = axes[2]
    ax.bar(range(len(gains)), [g[1][0] for g in gains],
           yerr=[[g[1][0] - g[1][1] for g in gains], [g[1][2] - g[1][0] for g in gains]], capsize=4)
    for i, (_, g) in enumerate(gains):
        ax.text(i, g[2] * 1.02, f"{g[0]:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(gains)), [g[0] for g in gains], rotation=25, ha="right", fontsize=7)
    ax.set_title("heads gain: over the same graphs at full depth", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.text(0.005, 0.005, footer(report), fontsize=6, family="monospace", va="bottom")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(args[0]) as f:
        plot(json.load(f), args[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
