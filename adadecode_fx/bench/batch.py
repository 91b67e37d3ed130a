"""Batch throughput: AdaDecode against HF greedy at batch sizes 1, 4, 8 (``adadecode bench --batch-sizes``).

For each batch size ``B`` the prompts are cut into consecutive groups of ``B`` (a remainder is dropped);
every group is decoded by HF ``generate`` greedy (left-padded, the same honest-length generation config
as `adadecode_fx.bench`) and by AdaDecode with each backend, the methods interleaved with a rotating
order. Throughput is generated tokens over wall time, summed over the group's rows.

Parity is per row against that row's *unbatched* HF greedy output (the ``B = 1`` run, done first), which
is what a user means by "the same output". HF's own batched rows are held to the same reference: with
left padding the attention reductions run over a longer, padded width, and in low precision that can flip
a near-tie, so ``hf_greedy`` itself may score below 100% here.
"""
from __future__ import annotations

import statistics
import time

from .methods import _gen_config
from ..errors import AdaDecodeError


def _hf_batch(model, max_new_tokens: int):
    import torch

    gc = _gen_config(model, max_new_tokens)

    @torch.no_grad()
    def run(prompts):
        width = max(map(len, prompts))
        ids = torch.tensor([[gc.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(ids, attention_mask=mask, generation_config=gc)
        return out[:, width:].tolist(), None
    return run


def _ada_batch(decoder, max_new_tokens: int):
    def run(prompts):
        res = decoder.generate(prompts, max_new_tokens=max_new_tokens, eos_token_id=None)
        return res.new_tokens, res.stats.to_dict()  # a list of token lists in, one list per row out
    return run


def run_batch_bench(model, decoders: dict, prompts: list[list[int]], batch_sizes, max_new_tokens: int,
                    log=print) -> dict:
    """``decoders``: ``{"adadecode_<backend>": AdaDecoder}``. Returns ``{"batch_sizes": [...], "per_batch":
    {B: {method: {...}}}}``."""
    sizes = sorted({int(b) for b in batch_sizes} | {1})
    if sizes[0] < 1 or sizes[-1] > len(prompts):
        raise AdaDecodeError(f"--batch-sizes must lie in 1..{len(prompts)} (the number of prompts), got {sizes}")
    methods = {"hf_greedy": _hf_batch(model, max_new_tokens)}
    methods.update({name: _ada_batch(dec, max_new_tokens) for name, dec in decoders.items()})
    for name, run in methods.items():  # warm-up at every size (compiles the batch graphs)
        for B in sizes:
            run(prompts[:B])
    reference: dict[int, list[int]] = {}
    per_batch = {}
    for B in sizes:
        groups = [list(range(g, g + B)) for g in range(0, len(prompts) - B + 1, B)]
        results = {name: [] for name in methods}
        for k, group in enumerate(groups):
            names = list(methods)
            names = names[k % len(names):] + names[:k % len(names)]
            for name in names:
                t0 = time.perf_counter()
                rows, stats = methods[name]([prompts[i] for i in group])
                seconds = time.perf_counter() - t0
                if B == 1 and name == "hf_greedy":
                    reference[group[0]] = rows[0]
                results[name].append({"group": group, "seconds": seconds, "rows": rows, "stats": stats,
                                      "tok_s": sum(map(len, rows)) / seconds})
        per_batch[B] = {}
        for name, runs in results.items():
            same = [rows == reference[i] for r in runs for i, rows in zip(r["group"], r["rows"])]
            entry = {"groups": len(runs), "tok_s_median": statistics.median(r["tok_s"] for r in runs),
                     "parity": sum(same) / len(same), "rows": len(same)}
            stats = [r["stats"] for r in runs if r["stats"]]
            if stats:
                entry["early_exit_rate"] = statistics.mean(s["early_exit_rate"] for s in stats)
                entry["acceptance_rate"] = statistics.mean(s["acceptance_rate"] for s in stats)
            per_batch[B][name] = entry
        base = per_batch[B]["hf_greedy"]["tok_s_median"]
        for entry in per_batch[B].values():
            entry["speedup_vs_hf_same_batch"] = entry["tok_s_median"] / base if base else None
        log(f"batch {B}: " + ", ".join(f"{n} {e['tok_s_median']:.1f} tok/s parity {e['parity']:.0%}"
                                       for n, e in per_batch[B].items()))
    return {"batch_sizes": sizes, "max_new_tokens": max_new_tokens, "prompts": len(prompts),
            "per_batch": {str(B): v for B, v in per_batch.items()}}


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def batch_table(batching: dict) -> str:
    lines = ["| batch | method | tok/s (median over groups) | vs HF greedy, same batch | parity (rows = unbatched "
             "HF greedy) | early-exit | acceptance |", "|---|---|---|---|---|---|---|"]
    for B, methods in batching["per_batch"].items():
        for name, e in methods.items():
            lines.append(f"| {B} | {name} | {e['tok_s_median']:.2f} | {e['speedup_vs_hf_same_batch']:.2f}x | "
                         f"{e['parity']:.0%} ({round(e['parity'] * e['rows'])}/{e['rows']}) | "
                         f"{_pct(e.get('early_exit_rate'))} | {_pct(e.get('acceptance_rate'))} |")
    return "\n".join(lines)


__all__ = ["batch_table", "run_batch_bench"]
