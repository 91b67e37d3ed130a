"""Batch throughput: AdaDecode against HF greedy at batch sizes 1, 4, 8 (``adadecode bench --batch-sizes``).

For each batch size ``B`` the prompts are cut into consecutive groups of ``B`` (a remainder is dropped);
every group is decoded by HF ``generate`` greedy (left-padded, the same honest-length generation config
as `adadecode_fx.bench`) and by AdaDecode with each backend, the methods interleaved with a rotating
order. Throughput is generated tokens over wall time, summed over the group's rows.

Parity is per row against that row's *unbatched* HF greedy output (the ``B = 1`` run, done first), which
is what a user means by "the same output". HF's own batched rows are held to the same reference: with
left padding the attention reductions run over a longer, padded width, and in low precision that can flip
a near-tie, so ``hf_greedy`` itself may score below 100% here.

With ``sampling`` the baseline is HF's batched sampling and every method samples with those warpers,
torch's global RNG seeded with ``seed`` + the group's index before each call. A batch draws its rows
together (HF: one draw over ``[B, V]``; AdaDecode: row by row), so no row's tokens can be compared with
the row alone: parity is not measured (``None``); tests/runtime/test_sampling.py checks the distribution.
"""
from __future__ import annotations

import statistics
import time

from .methods import SAMPLING_BASELINE, _gen_config, _generation_defaults
from .report import parity_text
from ..errors import AdaDecodeError


def _hf_batch(model, max_new_tokens: int, sampling: dict | None):
    import torch

    gc = _gen_config(model, max_new_tokens, sampling)

    @torch.no_grad()
    def run(prompts):
        width = max(map(len, prompts))
        ids = torch.tensor([[gc.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with _generation_defaults(model, gc):
            out = model.generate(ids, attention_mask=mask, generation_config=gc)
        return out[:, width:].tolist(), None
    return run


def _ada_batch(decoder, max_new_tokens: int, sampling: dict | None):
    knobs = {} if sampling is None else {"do_sample": True, "seed": None, **sampling}

    def run(prompts):
        res = decoder.generate(prompts, max_new_tokens=max_new_tokens, eos_token_id=None, **knobs)
        return res.new_tokens, res.stats.to_dict()  # a list of token lists in, one list per row out
    return run


def run_batch_bench(model, decoders: dict, prompts: list[list[int]], batch_sizes, max_new_tokens: int,
                    log=print, sampling: dict | None = None, seed: int = 0) -> dict:
    """``decoders``: ``{"adadecode_<backend>": AdaDecoder}``; ``sampling``: warper settings to sample with
    (``None``: greedy). Returns ``{"batch_sizes": [...], "baseline", "per_batch": {B: {method: {...}}}}``."""
    import torch

    sizes = sorted({int(b) for b in batch_sizes} | {1})
    if sizes[0] < 1 or sizes[-1] > len(prompts):
        raise AdaDecodeError(f"--batch-sizes must lie in 1..{len(prompts)} (the number of prompts), got {sizes}")
    baseline = "hf_greedy" if sampling is None else SAMPLING_BASELINE
    methods = {baseline: _hf_batch(model, max_new_tokens, sampling)}
    methods.update({name: _ada_batch(dec, max_new_tokens, sampling) for name, dec in decoders.items()})
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
                torch.manual_seed(seed + k)
                t0 = time.perf_counter()
                rows, stats = methods[name]([prompts[i] for i in group])
                seconds = time.perf_counter() - t0
                if B == 1 and name == baseline:
                    reference[group[0]] = rows[0]
                results[name].append({"group": group, "seconds": seconds, "rows": rows, "stats": stats,
                                      "tok_s": sum(map(len, rows)) / seconds})
        per_batch[B] = {}
        for name, runs in results.items():
            same = [rows == reference[i] for r in runs for i, rows in zip(r["group"], r["rows"])]
            entry = {"groups": len(runs), "tok_s_median": statistics.median(r["tok_s"] for r in runs),
                     "parity": None if sampling is not None else sum(same) / len(same), "rows": len(same)}
            stats = [r["stats"] for r in runs if r["stats"]]
            if stats:
                entry["early_exit_rate"] = statistics.mean(s["early_exit_rate"] for s in stats)
                checked = sum(s["accepted"] + s["rejected"] for s in stats)  # none: no early token to judge
                entry["acceptance_rate"] = sum(s["accepted"] for s in stats) / checked if checked else None
            per_batch[B][name] = entry
        base = per_batch[B][baseline]["tok_s_median"]
        for entry in per_batch[B].values():
            entry["speedup_vs_hf_same_batch"] = entry["tok_s_median"] / base if base else None
        log(f"batch {B}: " + ", ".join(f"{n} {e['tok_s_median']:.1f} tok/s parity {parity_text(e, count='rows')}"
                                       for n, e in per_batch[B].items()))
    return {"batch_sizes": sizes, "max_new_tokens": max_new_tokens, "prompts": len(prompts), "baseline": baseline,
            **({"sampling": dict(sampling), "sampling_seed": seed} if sampling is not None else {}),
            "per_batch": {str(B): v for B, v in per_batch.items()}}


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def batch_table(batching: dict) -> str:
    base = batching.get("baseline", "hf_greedy")
    parity = "parity (rows = unbatched HF greedy)" if base == "hf_greedy" else "parity (n/a: rows drawn together)"
    lines = [f"| batch | method | tok/s (median over groups) | vs {base}, same batch | {parity} | early-exit | "
             "acceptance |", "|---|---|---|---|---|---|---|"]
    for B, methods in batching["per_batch"].items():
        for name, e in methods.items():
            lines.append(f"| {B} | {name} | {e['tok_s_median']:.2f} | {e['speedup_vs_hf_same_batch']:.2f}x | "
                         f"{parity_text(e, count='rows')} | {_pct(e.get('early_exit_rate'))} | "
                         f"{_pct(e.get('acceptance_rate'))} |")
    return "\n".join(lines)


__all__ = ["batch_table", "run_batch_bench"]
