"""Calibration of exit heads and the speed-up they can buy (``adadecode eval-heads``).

On held-out prompts we record, for every position of the model's own greedy continuation, each
head's (token, confidence) and whether it matches the final layer. Because the runtime's corrected
tokens are exactly those greedy tokens, replaying its schedule on these records (`simulate`) gives
the critical path it will really take, without running it: layers per token on the critical path,
exit rate and acceptance for each threshold.

Every ``speedup_bound`` here is over the same program at full depth (all layers per token, no probes):
a bound on what ``adadecode bench`` measures as ``heads_gain``, not on the speed-up over HF greedy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..report_files import write_report

GAMMAS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99)
BOUND_OVER = ("the same program at full depth (num_layers decoder layers per token, no probes); "
              "adadecode bench measures this ratio as heads_gain")


@dataclass
class Schedule:
    tokens: int
    critical_layers: int
    early: int
    accepted: int
    rejected: int
    probes: int
    deferred_rows: int = 0  # layer rows run beside the critical one (deferred layers of early tokens)
    epilogue_calls: int = 0  # final norm + LM head calls: one per verifying step, whatever its rows

    @property
    def layers_per_token(self) -> float:
        return self.critical_layers / max(1, self.tokens)


def simulate(conf: dict, agree: dict, num_layers: int, threshold, max_pending: int = 5) -> Schedule:
    """Replay the runtime on one sequence. ``conf[l][t]``/``agree[l][t]``: head l's confidence and
    correctness when predicting generated token t; ``threshold``: one gamma or ``{layer: gamma}``.
    Mirrors AdaDecoder step for step: token 0 comes from the prefill (counted at full depth, as the
    runtime's stats count it); then exit at the first confident head while fewer than ``max_pending``
    early tokens wait (a head after the last layer only while every pending token was drafted there
    too); a full-depth step verifies them and restarts after the first wrong one; at the end a flush
    runs the deferred layers of the last early tokens.

    Exact when every step sees the records' context, which holds for ``max_pending=1`` or right early
    tokens. After a wrong early token the runtime keeps stepping on the wrong context until it
    verifies; the replay uses the right-context confidences for those steps, an approximation of how
    much work the rollback throws away."""
    layers = sorted(conf)
    gamma = threshold if isinstance(threshold, dict) else dict.fromkeys(layers, threshold)
    n = len(next(iter(conf.values()))) if conf else 0
    t, pending, cost, probes = 1, [], (num_layers if n else 0), 0  # pending: (token index, exit layer, correct)
    early = accepted = rejected = rows = 0
    epilogues = 1 if n else 0  # the prompt pass

    def verify():
        nonlocal accepted, rejected, pending, rows, epilogues
        rows += sum(num_layers - (e + 1) for _, e, _ in pending)
        epilogues += 1
        wrong = next((i for i, _, ok in pending if not ok), None)
        accepted += sum(1 for i, _, _ in pending if wrong is None or i < wrong)
        rejected += wrong is not None
        pending = []
        return wrong

    while True:
        if t >= n:
            if not pending:
                break
            flush = num_layers - (min(e for _, e, _ in pending) + 1)
            cost += flush
            rows -= flush  # the flush's first row is the critical path, not beside it
            wrong = verify()
            if wrong is None:
                break
            t = wrong + 1
            continue
        exit_layer = None
        if len(pending) < max_pending:
            for l in layers:
                if l == num_layers - 1 and any(e < l for _, e, _ in pending):
                    break  # the runtime drafts after the last layer only behind drafts of that kind
                probes += 1
                if conf[l][t] >= gamma[l]:
                    exit_layer = l
                    break
        if exit_layer is not None:
            cost += exit_layer + 1
            early += 1
            pending.append((t, exit_layer, bool(agree[exit_layer][t])))
            t += 1
            continue
        cost += num_layers
        wrong = verify()
        t = t + 1 if wrong is None else wrong + 1
    return Schedule(n, cost, early, accepted, rejected, probes, rows, epilogues)


def oracle_layers_per_token(agree: dict, num_layers: int) -> float:
    """Every token exits at the first layer whose head already agrees (no pending limit, no misses)."""
    layers = sorted(agree)
    n = len(next(iter(agree.values())))
    cost = 0
    for t in range(n):
        first = next((l for l in layers if agree[l][t]), None)
        cost += num_layers if first is None else first + 1
    return cost / max(1, n)


def report(records: list[dict], num_layers: int, probe_cost: float, max_pending: int = 5,
           row_cost: float = 0.0, epilogue_cost: float = 0.0) -> dict:
    """``records``: per sequence {"conf": {l: list}, "agree": {l: list}}. Costs in units of one decoder
    layer on one row (measured: `measure_costs`): ``probe_cost`` one probe, ``row_cost`` one more row in
    a layer call, ``epilogue_cost`` one call of the final norm + LM head (a block of rows costs about one
    row's: the LM head's weights are read once). Returns per-layer calibration and, per threshold and
    subset of heads, ``speedup_bound`` (layers and probes only) and ``modelled_gain`` (all four costs,
    against full depth at ``num_layers + epilogue_cost`` per token); the recommendation maximises the
    modelled gain (one gamma per layer where that models better). ``perfect_confidence``: the best
    subset's modelled gain if each head were confident exactly when it agrees with the final layer.

    Records tagged with a ``"source"`` (several --data sources) are also scored per source, and the choice
    maximises the *worst* source's modelled gain (``worst_source_gain``): pooled tokens would let the larger
    or easier source pick gammas that cost the other one."""
    layers = sorted(records[0]["conf"])
    flat_conf = {l: torch.tensor([c for r in records for c in r["conf"][l]]) for l in layers}
    flat_agree = {l: torch.tensor([a for r in records for a in r["agree"][l]]) for l in layers}
    sources = list(dict.fromkeys(r.get("source") for r in records))
    per_layer = {}
    for l in layers:
        c, a = flat_conf[l], flat_agree[l].float()
        rows = []
        for g in GAMMAS:
            m = c >= g
            rows.append({"gamma": g, "coverage": m.float().mean().item(),
                         "precision": a[m].mean().item() if m.any() else None})
        per_layer[str(l)] = {"agreement": a.mean().item(), "curve": rows}
        if len(sources) > 1:
            per_layer[str(l)]["per_source"] = {
                src: sum(sum(r["agree"][l]) for r in records if r.get("source") == src)
                / max(1, sum(len(r["agree"][l]) for r in records if r.get("source") == src)) for src in sources}
    costs = (probe_cost, row_cost, epilogue_cost)
    per_gamma = _sweep(records, layers, num_layers, costs, max_pending)
    subsets, perfect = [], []  # a weak early head can cost more than it saves: try every subset of the heads
    for mask in range(1, 1 << len(layers)):
        sub = [l for i, l in enumerate(layers) if mask >> i & 1]
        best_row = max(_sweep(records, sub, num_layers, costs, max_pending), key=_objective)
        subsets.append({"layers": sub, **_per_layer_gammas(records, sub, num_layers, costs, max_pending, best_row)})
        sure = [{**r, "conf": {l: [float(a) for a in r["agree"][l]] for l in sub}} for r in records]
        perfect.append({"exit_layers": sub, **_replayed(sure, sub, num_layers, costs, max_pending, 0.5)})
    chosen = max(subsets, key=_objective)
    best = max(per_gamma, key=_objective)
    free = free_exits(records, chosen["layers"], chosen["gamma"], num_layers, epilogue_cost, max_pending)
    oracle = sum(oracle_layers_per_token(r["agree"], num_layers) * len(r["agree"][layers[0]]) for r in records)
    oracle /= sum(len(r["agree"][layers[0]]) for r in records)
    return {"bound_over": BOUND_OVER, "layers": layers, "num_layers": num_layers, "tokens": sum(len(r["agree"][layers[0]]) for r in records),
            "probe_cost_layers": probe_cost, "row_cost_layers": row_cost, "epilogue_cost_layers": epilogue_cost,
            "max_pending": max_pending,
            "per_layer": per_layer,
            "per_gamma": per_gamma, "recommended_gamma": best["gamma"], "per_subset": subsets,
            "recommended": {"exit_layers": chosen["layers"], "gamma": chosen["gamma"],
                            "speedup_bound": chosen["speedup_bound"], "modelled_gain": chosen["modelled_gain"],
                            "per_source": chosen.get("per_source")},
            "oracle_layers_per_token": oracle, "oracle_speedup_bound": num_layers / oracle,
            # the same heads with a perfect exit decision (confident exactly when right): how much of the gap
            # to the oracle is the confidence signal rather than the heads' agreement
            "perfect_confidence": {k: v for k, v in max(perfect, key=lambda r: r["modelled_gain"]).items()
                                   if k in ("exit_layers", "modelled_gain", "early_exit_rate", "layers_per_token")},
            # the recommended configuration if probes and deferred rows cost nothing: what cheaper exits can reach
            "free_exits": {"exit_layers": chosen["layers"], "gamma": chosen["gamma"], "modelled_gain": free}}


def free_exits(records, layers, gamma, num_layers: int, epilogue_cost: float, max_pending: int) -> float:
    """The modelled gain of exiting at ``layers`` with ``gamma`` (one, or per layer; JSON string keys
    accepted) if probes and deferred rows were free: the most that making the exits themselves cheaper
    can buy, since the layers on the critical path, the rollbacks and the LM-head calls stay."""
    if isinstance(gamma, dict):
        gamma = {int(l): g for l, g in gamma.items()}
    return _replayed(records, layers, num_layers, (0.0, 0.0, epilogue_cost), max_pending, gamma)["modelled_gain"]


def modelled_gain(num_layers: int, layers_per_token: float, per_token: tuple, costs: tuple) -> float:
    """Full depth (``num_layers`` + one epilogue per token) over the schedule's cost per token: its
    critical-path layers plus ``per_token`` (probes, deferred rows, epilogue calls) at ``costs``."""
    probe_cost, row_cost, epilogue_cost = costs
    probes, rows, epilogues = per_token
    spent = layers_per_token + probe_cost * probes + row_cost * rows + epilogue_cost * epilogues
    return (num_layers + epilogue_cost) / spent


def schedule_summary(runs: list[Schedule], num_layers: int, costs: tuple) -> dict:
    """Rates per token of replayed ``runs`` and what they buy over full depth: ``speedup_bound`` (layers
    and probes) and ``modelled_gain`` (also deferred rows and LM-head calls at ``costs``)."""
    tok = sum(s.tokens for s in runs)
    if not tok:
        return {"layers_per_token": None, "speedup_bound": None, "modelled_gain": None}
    early, acc = sum(s.early for s in runs), sum(s.accepted for s in runs)
    lpt = sum(s.critical_layers for s in runs) / tok
    per_token = tuple(sum(getattr(s, k) for s in runs) / tok for k in ("probes", "deferred_rows", "epilogue_calls"))
    return {"layers_per_token": lpt, "early_exit_rate": acc / tok, "acceptance": acc / early if early else None,
            "rejections": sum(s.rejected for s in runs), "probes_per_token": per_token[0],
            "deferred_rows_per_token": per_token[1], "epilogue_calls_per_token": per_token[2],
            "speedup_bound": num_layers / (lpt + costs[0] * per_token[0]),
            "modelled_gain": modelled_gain(num_layers, lpt, per_token, costs)}


def _sweep(records, layers, num_layers, costs, max_pending) -> list[dict]:
    return [_replayed(records, layers, num_layers, costs, max_pending, g) for g in GAMMAS]


def _replayed(records, layers, num_layers, costs, max_pending, gamma) -> dict:
    runs = [simulate({l: r["conf"][l] for l in layers}, {l: r["agree"][l] for l in layers},
                     num_layers, gamma, max_pending) for r in records]
    row = {"gamma": gamma, **schedule_summary(runs, num_layers, costs)}
    sources = list(dict.fromkeys(r.get("source") for r in records))
    if len(sources) > 1:
        row["per_source"] = {src: schedule_summary([s for s, r in zip(runs, records) if r.get("source") == src],
                                                   num_layers, costs)["modelled_gain"] for src in sources}
        gains = [g for g in row["per_source"].values() if g is not None]  # None: a source without tokens
        if gains:
            row["worst_source_gain"] = min(gains)
    return row


def _objective(row: dict) -> float:
    """What the calibration maximises: the worst source's modelled gain (the pooled one for one source)."""
    return row.get("worst_source_gain", row["modelled_gain"])


def _per_layer_gammas(records, layers, num_layers, costs, max_pending, row: dict, rounds: int = 2) -> dict:
    """From the best single-gamma ``row``, coordinate ascent over one gamma per layer (each layer's in
    turn, over GAMMAS, ``rounds`` times). An exit after the last layer only drafts and a deep one saves
    layers, so their best gammas differ. Returns the best row; ``gamma`` a dict only if that beats one gamma."""
    if len(layers) < 2:
        return row
    best, gamma = row, dict.fromkeys(layers, row["gamma"])
    for _ in range(rounds):
        for l in layers:
            for g in GAMMAS:
                trial = _replayed(records, layers, num_layers, costs, max_pending, {**gamma, l: g})
                if _objective(trial) > _objective(best) + 1e-9:
                    best, gamma = trial, {**gamma, l: g}
    if best is not row:
        best = {**best, "gamma": {str(l): g for l, g in gamma.items()}}  # JSON keys, as heads.json stores them
    return best


def plot(rep: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for l, d in rep["per_layer"].items():
        xs = [r["coverage"] for r in d["curve"]]
        ys = [r["precision"] if r["precision"] is not None else float("nan") for r in d["curve"]]
        a.plot(xs, ys, marker="o", label=f"layer {l} (agree {d['agreement']:.0%})")
    a.set_xlabel("coverage (share of tokens with confidence >= gamma)")
    a.set_ylabel("precision (head == final)")
    a.set_title("exit heads: coverage vs precision, gamma 0.5..0.95")
    a.legend()
    g = [r["gamma"] for r in rep["per_gamma"]]
    b.plot(g, [r["speedup_bound"] for r in rep["per_gamma"]], marker="o",
           label="bound over full depth (probe cost incl.)")
    b.plot(g, [r["early_exit_rate"] for r in rep["per_gamma"]], marker="s", label="early-exit rate")
    b.axhline(rep["oracle_speedup_bound"], ls="--", c="gray", label=f"oracle bound {rep['oracle_speedup_bound']:.2f}x")
    b.set_xlabel("gamma")
    b.set_ylabel("speed-up over the same program at full depth / rate")
    b.set_title(f"replayed schedule (recommended gamma {rep['recommended_gamma']})")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rep: dict, json_path=None, png_path=None) -> None:
    write_report(rep, json_path, png_path, plot=plot)


def _one_row(program, heads):
    """A decode step's inputs at slot 64 after a 64-token prefill: ``(sync, hidden [1, 64, d] of the
    prefill at a probed layer, prologue outputs and graph inputs for one row, K/V views, the state)``.
    ``sync`` waits for CUDA kernels (time the kernels, not the launches)."""
    from ..runtime.kv_state import KVState
    from .readout import segment_device

    device = segment_device(program)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    state = KVState(program.gm.meta["kv_shapes"], 128, heads_dtype(program), device, 64, sources=program.kv_sources)
    keep, _ = program.hidden_states(list(range(1, 65)), {_probed_layer(program, heads)}, state)
    kv = state.views(65)
    top = program.top_inputs([1], 64, kv)
    return sync, keep[_probed_layer(program, heads)], program.prologue(top), top, kv, state


def _probed_layer(program, heads) -> int:
    """A layer the program probes (its first exit layer), else the heads' first."""
    return min(program.probe_fns) if program.probe_fns else heads.layers[0]


@torch.no_grad()
def _in_layers(program, heads, call, repeats: int) -> float:
    """Median time of ``call(hidden)`` over the median time of the middle decoder layer, both on one row."""
    import statistics
    import time

    sync, hidden, pro, top, kv, _ = _one_row(program, heads)
    h = hidden[:, -1:]
    layer_t, call_t = [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        program.layer(program.num_layers // 2, h, pro, top, kv)
        sync()
        t1 = time.perf_counter()
        call(h)
        sync()
        layer_t.append(t1 - t0)
        call_t.append(time.perf_counter() - t1)
    return statistics.median(call_t) / statistics.median(layer_t)


def measure_probe_cost(program, heads, repeats: int = 30) -> float:
    """One exit probe on one row, in decoder layers on one row. ``program`` must carry the probes
    (``AdaDecoder(...).program``)."""
    return _in_layers(program, heads, lambda h: program.probe(_probed_layer(program, heads), h), repeats)


def measure_epilogue_cost(program, heads, repeats: int = 20) -> float:
    """One call of the final norm + LM head on one row, in decoder layers on one row."""
    return _in_layers(program, heads, program.epilogue, repeats)


def measure_costs(program, heads) -> dict:
    """The costs `report` models, in decoder layers on one row: ``probe_cost``, ``row_cost``,
    ``epilogue_cost`` (its keyword arguments)."""
    return {"probe_cost": measure_probe_cost(program, heads), "row_cost": measure_row_cost(program, heads),
            "epilogue_cost": measure_epilogue_cost(program, heads)}


@torch.no_grad()
def measure_row_cost(program, heads, rows=(2, 3, 4, 6), repeats: int = 20) -> float:
    """What one more row adds to a decoder-layer call, in units of that layer on one row: the median over
    block sizes T of (time(T) / time(1) - 1) / (T - 1), each time a median over ``repeats`` calls of the
    middle layer at 64 positions. Blocks of T > 1 rows are how deferred layers run."""
    import statistics
    import time

    sync, hidden, _, _, _, state = _one_row(program, heads)
    layer = program.num_layers // 2
    times = {}
    for T in (1, *rows):
        kv = state.views(64 + T)
        top = program.top_inputs(list(range(1, T + 1)), 64, kv)  # rows at slots 64 .. 64 + T - 1
        pro = program.prologue(top)
        h = hidden[:, -T:]
        samples = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            program.layer(layer, h, pro, top, kv)
            sync()
            samples.append(time.perf_counter() - t0)
        times[T] = statistics.median(samples)
    # timing noise can make a block look cheaper than one row (tiny models, busy cores); a row is never free
    return max(0.0, statistics.median((times[T] / times[1] - 1) / (T - 1) for T in rows))


def heads_dtype(program):
    from .readout import epilogue_weight

    return epilogue_weight(program).dtype


@torch.no_grad()
def head_records(program, heads, seqs: list[list[int]], prompt_lens: list[int], sources=None) -> list[dict]:
    """Per sequence: each head's confidence and agreement with the final argmax at every position that
    predicts a generated token, and its ``source`` (from ``sources``, for `report`'s worst-source choice).
    The last layer is always scored too: a probe there drafts from the model's own head over the
    shortlist and defers only the LM head."""
    from .readout import agreement, collect_hidden

    out = []
    dtype = heads_dtype(program)
    layers = tuple(sorted({*heads.layers, program.num_layers - 1}))
    for i, (ids, p) in enumerate(zip(seqs, prompt_lens)):
        hidden, final = collect_hidden(program, [ids], heads.layers, program.gm.meta["kv_shapes"], dtype)
        res, _ = agreement(program, heads, hidden, final, layers=layers)
        sl = slice(p - 1, len(ids) - 1)
        out.append({"conf": {l: r["conf"][sl].tolist() for l, r in res.items()},
                    "agree": {l: r["agree"][sl].tolist() for l, r in res.items()},
                    **({"source": sources[i]} if sources else {})})
    return out
