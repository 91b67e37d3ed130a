#!/usr/bin/env python
"""What stops the exits from paying more: a better exit decision, a richer head, or cheaper overheads?

Three steps, each replayed on the model's own greedy continuations with the runtime's schedule
(`adadecode_fx.heads.evaluation.simulate`) and the costs a bench run measured:

    records       per token and exit layer: the probe's token, confidence and agreement with the final
                  layer (+ the hidden state at the shallow exit layers), on held-out "fit" prompts and on
                  the bench's own prompts (bench --seed 0 draws the same ones)
    train-hidden  one layer's hidden states and the final argmax over the heads' training sequences
    analyse       (1) exit decisions from more than the max probability: a per-token bias, a linear read of
                  the hidden state (fitted on the fit prompts, judged on the bench's);
                  (2) what the shipped configuration would model with free probes, free deferred rows, no
                  wrong exits, a perfect decision, another max_pending;
                  (3) with --train-hidden: richer heads (adapter + a low-rank SiLU branch) and a
                  cross-entropy adapter, trained on the heads' training tokens.

Numbers and commands: docs/heads.md ("What stops the code targets"). Example:

    python bench/exit_bounds.py records --model qwen2.5-coder-0.5b --heads /work/heads/qwen-fn --out q.pt
    python bench/exit_bounds.py train-hidden --model qwen2.5-coder-0.5b --heads /work/heads/qwen-fn --out qh.pt
    python bench/exit_bounds.py analyse --records q.pt --train-hidden qh.pt --model qwen2.5-coder-0.5b \\
        --heads /work/heads/qwen-fn --costs docs/bench_qwen_bf16_n20_shipped_kernel_probe.json --json out.json
    python bench/exit_bounds.py plot --json out.json --targets 1.3 --out out.png
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

from adadecode_fx.build import build_program
from adadecode_fx.config import AdaDecodeConfig
from adadecode_fx.heads import ExitHeads
from adadecode_fx.heads.format import shipped_heads
from adadecode_fx.heads.evaluation import _replayed, report
from adadecode_fx.heads.readout import agreement, collect_hidden, final_argmax
from adadecode_fx.heads.training import distillation_sequences
from adadecode_fx.zoo import models
from adadecode_fx.zoo.data import prompt_sources, source_texts

# name: (--data specs, prompts, seed, new tokens). "fit" sets choose gammas and fit decisions; the others judge.
SETS = {"fit_pkg": (["package-functions"], 80, 3, 128), "fit_he": (["humaneval"], 40, 7, 128),
        "fit_chat": (["gsm8k:chat"], 40, 3, 128), "bench_he": (["humaneval"], 20, 0, 256),
        "bench_chat": (["gsm8k:chat"], 10, 0, 256)}
FIT = ("fit_pkg", "fit_he", "fit_chat")
JUDGE = ("bench_he", "bench_chat")
HIDDEN_UP_TO = 11  # hidden states are kept for exit layers up to this one (the decisions that matter most)


def load(args):
    heads = ExitHeads.load(args.heads)
    model, tok = models.load(args.model, dtype="bfloat16")
    return heads, model, tok, build_program(model, heads, AdaDecodeConfig(exit_layers=heads.layers))


@torch.no_grad()
def cmd_records(args):
    heads, model, tok, program = load(args)
    layers = tuple(sorted({*heads.layers, program.num_layers - 1}))
    out = {"model": args.model, "heads": args.heads, "num_layers": program.num_layers, "sets": {}}
    for name, (specs, n, seed, new) in SETS.items():
        t0 = time.time()
        recs = prompt_sources(specs, "eval", n=n, seed=seed)
        prompts = source_texts(tok, recs)
        seqs = distillation_sequences(model, tok, prompts, new, 20)
        per = []
        for ids, p in zip(seqs, prompts):
            start = len(tok(p).input_ids) - 1
            hidden, final = collect_hidden(program, [ids], heads.layers, program.gm.meta["kv_shapes"], torch.bfloat16)
            res, target = agreement(program, heads, hidden, final, layers=layers)
            sl = slice(start, len(ids) - 1)
            per.append({"target": target[sl].clone(), "token": {l: r["token"][sl].clone() for l, r in res.items()},
                        "conf": {l: r["conf"][sl].float().clone() for l, r in res.items()},
                        "agree": {l: r["agree"][sl].clone() for l, r in res.items()},
                        "h": {l: hidden[l][sl].clone() for l in heads.layers if l <= HIDDEN_UP_TO}})
        out["sets"][name] = {"ids": [r["id"] for r in recs], "seqs": per}
        print(f"{name}: {len(per)} prompts, {sum(len(s['target']) for s in per)} tokens, {time.time() - t0:.0f} s")
    torch.save(out, args.out)


@torch.no_grad()
def cmd_train_hidden(args):
    heads, model, tok, program = load(args)
    seqs = torch.load(f"{args.heads}/sequences.pt", weights_only=False)["seqs"]
    hs, ys = [], []
    for i in range(0, len(seqs), 8):
        hidden, final = collect_hidden(program, seqs[i:i + 8], (args.layer,), program.gm.meta["kv_shapes"],
                                       torch.bfloat16)
        hs.append(hidden[args.layer].clone())
        ys.append(final_argmax(program, final).clone())
    torch.save({"layer": args.layer, "h": torch.cat(hs), "target": torch.cat(ys)}, args.out)
    print(f"{sum(map(len, seqs))} tokens of {len(seqs)} training sequences, layer {args.layer}")


def auc(conf: torch.Tensor, right: torch.Tensor) -> float:
    """P(confidence of a right exit > that of a wrong one): how well the score ranks them."""
    pos, neg = conf[right], conf[~right]
    if not len(pos) or not len(neg):
        return float("nan")
    ranks = torch.cat([pos, neg]).argsort().argsort().float()
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) - 1) / 2) / (len(pos) * len(neg)))


class Replay:
    def __init__(self, data, costs):
        self.sets, self.L, self.costs = data["sets"], data["num_layers"], costs
        self.layers = sorted(self.sets["bench_he"]["seqs"][0]["conf"])
        judged = {i for s in JUDGE for i in self.sets[s]["ids"]}
        for name in FIT:  # a fit prompt that is also a bench prompt would leak into the judgement
            keep = [k for k, i in enumerate(self.sets[name]["ids"]) if i not in judged]
            self.sets[name] = {"ids": [self.sets[name]["ids"][k] for k in keep],
                               "seqs": [self.sets[name]["seqs"][k] for k in keep]}

    def records(self, name, key="conf", layers=None):
        layers = layers or self.layers
        return [{"conf": {l: s[key][l].tolist() for l in layers},
                 "agree": {l: s["agree"][l].int().tolist() for l in layers}} for s in self.sets[name]["seqs"]]

    def gain(self, recs, layers, gamma, max_pending=5, costs=None):
        return _replayed(recs, layers, self.L, costs or self.costs, max_pending, gamma)

    def choose(self, key="conf"):
        """Exit layers and gammas as `eval-heads --set-threshold` picks them, on the fit prompts."""
        recs = [{**r, "source": n} for n in FIT for r in self.records(n, key)]
        rec = report(recs, self.L, probe_cost=self.costs[0], row_cost=self.costs[1],
                     epilogue_cost=self.costs[2])["recommended"]
        g = rec["gamma"]
        return rec["exit_layers"], ({int(k): v for k, v in g.items()} if isinstance(g, dict) else g)

    def judge(self, key="conf"):
        layers, gamma = self.choose(key)
        row = {"exit_layers": layers, "gamma": gamma}
        for name in JUDGE:
            s = self.gain(self.records(name, key), layers, gamma)
            flat = lambda f: torch.cat([f(x) for x in self.sets[name]["seqs"]])  # noqa: E731
            row[name] = {"modelled_gain": s["modelled_gain"], "early_exit_rate": s["early_exit_rate"],
                         "acceptance": s["acceptance"],
                         "auc": {l: auc(flat(lambda x: x[key][l]), flat(lambda x: x["agree"][l])) for l in self.layers}}
        return row


def logit(p):
    p = p.clamp(1e-4, 1 - 1e-4)
    return torch.log(p) - torch.log1p(-p)


def fit_decision(rp: Replay, layer: int, token: bool, hidden: bool):
    """sigmoid(a logit(p1) + b [+ u[token]] [+ w . standardised h]), fitted by L-BFGS on the fit prompts
    (L2 on u and w): the probability that the exit is right, to compare with gamma instead of p1."""
    seqs = [s for n in FIT for s in rp.sets[n]["seqs"]]
    conf = torch.cat([s["conf"][layer] for s in seqs])
    right = torch.cat([s["agree"][layer] for s in seqs]).float()
    tok = torch.cat([s["token"][layer] for s in seqs])
    vocab = 1 + max(int(s["token"][layer].max()) for v in rp.sets.values() for s in v["seqs"])
    p = {"a": torch.ones(1, requires_grad=True), "b": torch.zeros(1, requires_grad=True)}
    if token:
        p["u"] = torch.zeros(vocab, requires_grad=True)
    if hidden:
        h = torch.cat([s["h"][layer] for s in seqs]).float()
        mu, sd = h.mean(0), h.std(0) + 1e-3
        p["w"] = torch.zeros(h.shape[1], requires_grad=True)

    def score(c, t, hh):
        z = p["a"] * logit(c) + p["b"]
        if token:
            z = z + p["u"][t]
        if hidden:
            z = z + ((hh.float() - mu) / sd) @ p["w"]
        return z

    opt = torch.optim.LBFGS(list(p.values()), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(score(conf, tok, h if hidden else None), right)
        loss = loss + sum((p[k] ** 2).sum() for k in ("u", "w") if k in p) / len(right)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        for v in rp.sets.values():
            for s in v["seqs"]:
                s.setdefault(f"dec_{token}_{hidden}", {})[layer] = torch.sigmoid(
                    score(s["conf"][layer], s["token"][layer], s["h"].get(layer) if hidden else None))


def decisions(rp: Replay) -> dict:
    out = {"max probability": rp.judge()}
    for name, token, hidden in (("+ token bias", True, False), ("+ hidden state", False, True),
                                ("+ token bias + hidden state", True, True)):
        key = f"dec_{token}_{hidden}"
        for l in rp.layers:
            if hidden and l > HIDDEN_UP_TO:
                for v in rp.sets.values():
                    for s in v["seqs"]:
                        s.setdefault(key, {})[l] = s["conf"][l]
            else:
                fit_decision(rp, l, token, hidden)
        out[name] = rp.judge(key)
    return out


def bounds(rp: Replay, layers, gamma) -> dict:
    """The bench prompts at one configuration, with one thing changed at a time."""
    recs = rp.records("bench_he", layers=layers)
    p, r, e = rp.costs
    out = {"config": {"exit_layers": layers, "gamma": gamma}, "as measured": rp.gain(recs, layers, gamma)["modelled_gain"]}
    out.update({f"max_pending {m}": rp.gain(recs, layers, gamma, m)["modelled_gain"] for m in (1, 2, 3, 8, 12)})
    out["free probes"] = rp.gain(recs, layers, gamma, costs=(0, r, e))["modelled_gain"]
    out["free deferred rows"] = rp.gain(recs, layers, gamma, costs=(p, 0, e))["modelled_gain"]
    out["free probes and rows"] = rp.gain(recs, layers, gamma, costs=(0, 0, e))["modelled_gain"]
    veto = [{"conf": {l: [c if a else 0.0 for c, a in zip(x["conf"][l], x["agree"][l])] for l in layers},
             "agree": x["agree"]} for x in recs]
    out["no wrong exits (same gammas)"] = rp.gain(veto, layers, gamma)["modelled_gain"]
    sure = [{"conf": {l: [float(a) for a in x["agree"][l]] for l in layers}, "agree": x["agree"]} for x in recs]
    out["perfect decision"] = rp.gain(sure, layers, 0.5)["modelled_gain"]
    return out


class Head(torch.nn.Module):
    """adapter [+ W2 silu(W1 rmsnorm(h))] -> the model's final norm -> shortlist LM head."""

    def __init__(self, adapter, norm, lm_rows, rank=0):
        super().__init__()
        d = adapter.shape[0]
        self.adapter = torch.nn.Parameter(adapter.float().clone())
        self.norm, self.lm_rows, self.rank = norm, lm_rows, rank
        if rank:
            self.w1 = torch.nn.Parameter(torch.randn(rank, d) / d ** 0.5)
            self.w2 = torch.nn.Parameter(torch.zeros(d, rank))

    def forward(self, h):
        h = h.float()
        x = h @ self.adapter.t()
        if self.rank:
            x = x + F.silu((h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)) @ self.w1.t()) @ self.w2.t()
        return self.norm(x) @ self.lm_rows.t()


def capacity(rp: Replay, args, layers, gamma) -> dict:
    heads = ExitHeads.load(args.heads)
    model, _ = models.load(args.model, dtype="float32")
    for q in model.parameters():
        q.requires_grad_(False)
    train = torch.load(args.train_hidden, weights_only=False)
    layer = train["layer"]
    lm_rows = model.get_output_embeddings().weight.detach()[heads.vocab].float()
    index = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
    index[heads.vocab] = torch.arange(len(heads.vocab))
    y = index[train["target"]]
    h, y = train["h"][y >= 0], y[y >= 0]  # a final token outside the shortlist cannot be agreed with
    norm = model.model.norm
    other = next(l for l in layers if l > layer)  # the deeper exit the shipped configuration pairs it with
    g_other = gamma[other] if isinstance(gamma, dict) else gamma
    torch.manual_seed(0)

    def fit(head, hh, yy, epochs, lr):
        opt = torch.optim.Adam(head.parameters(), lr=lr)
        total = epochs * (len(hh) // 256)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + torch.cos(torch.tensor(s / total * torch.pi))).item())
        for _ in range(epochs):
            order = torch.randperm(len(hh))
            for i in range(len(hh) // 256):
                b = order[i * 256:(i + 1) * 256]
                loss = F.cross_entropy(head(hh[b]), yy[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        return head

    def judge(head):
        row = {}
        for name in ("fit_he",) + JUDGE:
            seqs = rp.sets[name]["seqs"]
            with torch.no_grad():
                conf, tok = torch.softmax(head(torch.cat([s["h"][layer] for s in seqs])), -1).max(-1)
            right = heads.vocab[tok] == torch.cat([s["target"] for s in seqs])
            recs, k = [], 0
            for s in seqs:
                n = len(s["target"])
                recs.append({"conf": {layer: conf[k:k + n].tolist(), other: s["conf"][other].tolist()},
                             "agree": {layer: right[k:k + n].int().tolist(), other: s["agree"][other].int().tolist()}})
                k += n
            gains = {g: rp.gain(recs, [layer, other], {layer: g, other: g_other})["modelled_gain"]
                     for g in (0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)}
            row[name] = {"agreement": float(right.float().mean()), "modelled_gain_by_gamma": gains}
        best = max(row["fit_he"]["modelled_gain_by_gamma"], key=row["fit_he"]["modelled_gain_by_gamma"].get)
        row["gamma_chosen_on_fit_he"] = best  # layer `other` keeps the shipped gamma
        return row

    base = heads.weight(layer)
    out = {"layer": layer, "paired_with": other, "train_tokens": len(h), "shipped adapter (KL)": judge(Head(base, norm, lm_rows))}
    for name, rank, epochs, lr in (("adapter, cross-entropy", 0, 2, 1e-3), ("adapter + rank-256 SiLU branch", 256, 2, 1e-3),
                                   ("adapter + rank-1024 SiLU branch", 1024, 2, 1e-3)):
        t0 = time.time()
        out[name] = judge(fit(Head(base, norm, lm_rows, rank), h, y, epochs, lr))
        print(f"  {name}: {time.time() - t0:.0f} s")
    bench = rp.sets["bench_he"]["seqs"]
    hb = torch.cat([s["h"][layer] for s in bench])
    yb = index[torch.cat([s["target"] for s in bench])]
    for name, rank in (("adapter fitted to the bench tokens themselves", 0), ("rank-1024 branch fitted to the bench tokens", 1024)):
        head = fit(Head(base, norm, lm_rows, rank), hb[yb >= 0], yb[yb >= 0], 10, 1e-3)
        with torch.no_grad():
            out[name] = {"bench_he_agreement": float((heads.vocab[head(hb).argmax(-1)] == torch.cat([s["target"] for s in bench])).float().mean())}
    return out


def cmd_analyse(args):
    data = torch.load(args.records, weights_only=False)
    bench = json.load(open(args.costs))["oracle_bound"]
    costs = (bench["probe_cost_layers"], bench["row_cost_layers"], bench["epilogue_cost_layers"])
    rp = Replay(data, costs)
    shipped = shipped_heads(data["model"])  # the configuration users get; else the heads' own
    rec = ExitHeads.load(shipped or args.heads).recommended()
    layers = list(rec["exit_layers"])
    gamma = rec["threshold"]
    out = {"command": "python bench/exit_bounds.py " + " ".join(args.argv), "records": args.records,
           "costs_from": args.costs, "costs_layers": dict(zip(("probe", "row", "epilogue"), costs)),
           "tokens": {n: sum(len(s["target"]) for s in v["seqs"]) for n, v in rp.sets.items()},
           "decisions": decisions(rp), "bounds_at_shipped_default": bounds(rp, layers, gamma)}
    if args.train_hidden:
        out["heads"] = capacity(rp, args, layers, gamma)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1, default=str)
    for name, row in out["decisions"].items():
        print(f"{name:30s} {row['exit_layers']} {row['gamma']}: " + ", ".join(
            f"{s} {row[s]['modelled_gain']:.3f}x (AUC {row[s]['auc'][rp.layers[0]]:.3f})" for s in JUDGE))
    for k, v in out["bounds_at_shipped_default"].items():
        print(f"{k:30s} {v if isinstance(v, dict) else f'{v:.3f}x'}")
    for k, v in out.get("heads", {}).items():
        if isinstance(v, dict) and "bench_he" in v:
            g = v["gamma_chosen_on_fit_he"]
            v = (f"agreement bench_he {v['bench_he']['agreement']:.3f}, bench_chat {v['bench_chat']['agreement']:.3f}; "
                 f"gamma {g} (chosen on fit_he): bench_he {v['bench_he']['modelled_gain_by_gamma'][g]:.3f}x, "
                 f"bench_chat {v['bench_chat']['modelled_gain_by_gamma'][g]:.3f}x")
        print(f"{k:30s} {v}")


def cmd_plot(args):
    """One panel per analysis JSON: the shipped configuration's replay with one thing changed at a time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = [json.load(open(path)) for path in args.json]
    fig, axes = plt.subplots(1, len(reports), figsize=(6 * len(reports), 4.5), squeeze=False)
    for ax, rep, target in zip(axes[0], reports, args.targets or [None] * len(reports)):
        b = rep["bounds_at_shipped_default"]
        names = ["as measured", "free probes", "free deferred rows", "free probes and rows",
                 "no wrong exits (same gammas)", "perfect decision"]
        decisions = {f"decision: {k}": v["bench_he"]["modelled_gain"] for k, v in rep["decisions"].items() if k != "max probability"}
        labels, values = names + list(decisions), [b[n] for n in names] + list(decisions.values())
        ax.barh(labels[::-1], values[::-1], color=["tab:gray" if "decision:" in x else "tab:blue" for x in labels[::-1]])
        if target:
            ax.axvline(target, ls="--", c="tab:red", label=f"target {target}x")
            ax.legend(loc="lower right")
        ax.set_xlim(1.0, max(values) * 1.02)
        ax.set_xlabel("modelled heads gain over full depth, bench HumanEval prompts")
        ax.set_title(f"{rep['command'].split('--model ')[1].split()[0]}: {b['config']['exit_layers']}")
    fig.suptitle("bench/exit_bounds.py: what free exits or better decisions would buy (CPU-512, bf16)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


def main():
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("plot")
    pl.add_argument("--json", nargs="+", required=True, help="analyse outputs, one panel each")
    pl.add_argument("--targets", nargs="*", type=float, help="a target heads gain per JSON (a dashed line)")
    pl.add_argument("--out", required=True)
    for name in ("records", "train-hidden", "analyse"):
        s = sub.add_parser(name)
        s.add_argument("--model", required=True)
        s.add_argument("--heads", required=True, help="heads directory (train-hidden reads its sequences.pt)")
    sub.choices["records"].add_argument("--out", required=True)
    sub.choices["train-hidden"].add_argument("--out", required=True)
    sub.choices["train-hidden"].add_argument("--layer", type=int, default=7)
    a = sub.choices["analyse"]
    a.add_argument("--records", required=True)
    a.add_argument("--costs", required=True, help="a bench JSON: its measured probe, row and LM-head costs")
    a.add_argument("--train-hidden", help="train-hidden's output: also train richer heads")
    a.add_argument("--json", required=True)
    args = p.parse_args()
    args.argv = sys.argv[1:]
    {"records": cmd_records, "train-hidden": cmd_train_hidden, "analyse": cmd_analyse, "plot": cmd_plot}[args.cmd](args)


if __name__ == "__main__":
    main()
