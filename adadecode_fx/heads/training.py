"""Self-distillation of exit heads (AdaDecode section 3): the base model is frozen, the teacher is its
own final-layer distribution on its own greedy continuations of the training prompts (and on the
prompt tokens), the loss is KL(teacher || head), adapters start at identity. With a corpus
(`adadecode_fx.heads.corpus`) the same teacher is read teacher-forced on windows of text the model did
not write; both kinds of sequence are mixed into one pool of token positions.

Hidden states come from the captured program itself (`DecodeProgram.hidden_states`), so the heads
are trained on exactly what the exit probes see at decode time. Logits are only ever materialised
for one minibatch of tokens.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import AdaDecodeError
from .format import ExitHeads, model_fingerprint, model_fingerprints
from ..build import structural_graph
from .readout import collect_hidden, final_argmax
from ..runtime.program import DecodeProgram

STATE_FILE = "train_state.pt"
SEQS_FILE = "sequences.pt"


@dataclass
class TrainConfig:
    layers: tuple[int, ...]
    epochs: int = 3
    lr: float = 5e-3
    warmup: float = 0.03          # fraction of steps with linear warm-up, then cosine decay
    batch_tokens: int = 256
    gen_tokens: int = 128         # greedy continuation length per training prompt
    gen_batch: int = 32            # rows per batched generate: 32 gives ~1.25x the tok/s of 16 on 2 cores (SmolLM2 fp32)
    gen_dtype: str = "float32"    # continuations are generated in this dtype (docs/heads.md: which is fast where)
    seed: int = 0
    shortlist: int = 4096         # probe vocabulary: the most frequent final-layer tokens (0 = full vocab)
    loss_vocab: str = "shortlist"  # "shortlist": head and teacher over the probe's vocabulary (what the probe
    #                                scores at decode time; ~50x cheaper on SmolLM2's 49k vocab); "full": all tokens
    data: str = ""
    record_ids: list = field(default_factory=list)
    corpus: tuple[str, ...] = ()  # `corpus.read_corpus` specs: paths, globs, .jsonl files, python-stdlib...
    corpus_tokens: int = 100_000  # budget, rounded up to whole windows
    corpus_window: int = 256      # tokens per teacher-forced window


def _corpus_key(cfg: dict) -> tuple:
    """What makes a saved run's corpus windows this run's too (resume must not mix two corpora)."""
    specs = tuple(cfg.get("corpus") or ())
    return (specs, cfg.get("corpus_tokens"), cfg.get("corpus_window")) if specs else ()


def distillation_sequences(model, tokenizer, prompts: list, gen_tokens: int, batch: int,
                           progress: bool = False) -> list[list[int]]:
    """prompt + the model's own greedy continuation, per prompt (batched, left-padded generation).
    Prompts are strings, or token-id lists (then ``tokenizer`` may be None)."""
    from tqdm.auto import tqdm

    if prompts and not isinstance(prompts[0], str):
        seqs = []
        for ids in prompts:
            x = torch.tensor([list(ids)])
            with torch.no_grad():
                out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                     max_new_tokens=gen_tokens, pad_token_id=0)
            seqs.append(out[0].tolist())
        return seqs
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    # batches of similar lengths: every row of a batch is padded to its longest prompt
    order = sorted(range(len(prompts)), key=lambda i: len(tokenizer(prompts[i]).input_ids))
    seqs = [None] * len(prompts)
    try:
        for i in tqdm(range(0, len(prompts), batch), desc="continuations", unit="batch", disable=not progress):
            rows = order[i:i + batch]
            enc = tokenizer([prompts[k] for k in rows], return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model.generate(**enc, do_sample=False, max_new_tokens=gen_tokens, pad_token_id=pad)
            for k, row, mask in zip(rows, out, enc.attention_mask):
                n_pad = int((mask == 0).sum())
                ids = row[n_pad:].tolist()
                while len(ids) > 1 and ids[-1] == pad:  # right padding after an early EOS
                    ids.pop()
                seqs[k] = ids
    finally:
        tokenizer.padding_side = side
    return seqs


def _continuations(model, tokenizer, prompts: list[str], cfg: TrainConfig, path: Path, fingerprints,
                   progress: bool) -> list[list[int]]:
    """`distillation_sequences` of ``prompts``, reusing those ``path`` holds from an earlier run of the same
    model and length (so adding a --data source generates only its prompts), and saving them all there."""
    def key(p):  # prompts are strings or token-id lists
        return p if isinstance(p, str) else tuple(p)

    known = {}
    saved = torch.load(path, weights_only=False) if path.exists() else None
    if saved is not None and saved["recipe"]["fingerprint"] in fingerprints and (
            saved["recipe"]["gen_tokens"] == cfg.gen_tokens):
        known = dict(zip(map(key, saved["recipe"]["prompts"]), saved["seqs"]))
    missing = list(dict.fromkeys(k for k in map(key, prompts) if k not in known))
    if known and prompts:
        print(f"[train-heads] reusing {len(prompts) - len(missing)} of {len(prompts)} continuations from {path}",
              file=sys.stderr)
    if missing:
        new = distillation_sequences(model, tokenizer, [m if isinstance(m, str) else list(m) for m in missing],
                                     cfg.gen_tokens, cfg.gen_batch, progress)
        known.update(zip(missing, new))
        torch.save({"recipe": {"prompts": list(known), "gen_tokens": cfg.gen_tokens,
                               "fingerprint": model_fingerprint(model)}, "seqs": list(known.values())}, path)
    return [known[key(p)] for p in prompts]


def kl_loss(head, adapter: torch.Tensor, h: torch.Tensor, teacher_logp: torch.Tensor):
    """KL(teacher || head) per token, averaged; head logits = ``head(h @ adapter^T)`` (rows ``[t, V']``)."""
    x = (h.float() @ adapter.t()).to(h.dtype)
    logq = F.log_softmax(head(x).float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - logq)).sum(-1).mean(), logq


def loss_head(program: DecodeProgram, vocab):
    """``x [t, d] -> logits [t, V']``: the model's epilogue, cut to the shortlist ``vocab`` if given."""
    from ..passes.insert_exit_probes import shortlist_epilogue

    epilogue = program.epilogue_fn
    if vocab is not None:
        epilogue = shortlist_epilogue(epilogue, vocab, program.gm.meta["vocab_size"])
    return lambda x: epilogue(x[None])[0][0]


def _lr(step: int, total: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def train_heads(model, tokenizer, prompts: list[str], cfg: TrainConfig, out_dir, progress: bool = True,
                generator=None) -> ExitHeads:
    """Train one adapter per layer in ``cfg.layers``; resumable from ``out_dir/train_state.pt``.

    ``generator`` (default: ``model``) writes the greedy continuations: the same weights in a dtype whose
    batched generation is fast on the machine (on AVX2 CPUs fp32, on AVX-512 BF16 CPUs bf16: docs/heads.md).
    The teacher is always ``model`` itself, on those sequences and on the
    windows of ``cfg.corpus`` (read, with its errors, before anything is written to ``out_dir``)."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    n_layers = model.config.num_hidden_layers
    if not cfg.layers or any(not 0 <= l < n_layers - 1 for l in cfg.layers):
        raise AdaDecodeError(f"training layers must lie in 0..{n_layers - 2}, got {list(cfg.layers)}")
    if not prompts and not cfg.corpus:
        raise AdaDecodeError("no training data: give prompts (--data) or a corpus (--corpus), or both")
    if cfg.loss_vocab not in ("shortlist", "full"):
        raise AdaDecodeError(f"loss_vocab must be 'shortlist' or 'full', got {cfg.loss_vocab!r}")
    torch.manual_seed(cfg.seed)
    state_path = out / STATE_FILE
    resume = torch.load(state_path, weights_only=False) if state_path.exists() else None
    fingerprints = model_fingerprints(model)
    if resume and (list(resume["config"]["layers"]) != list(cfg.layers) or resume["fingerprint"] not in fingerprints
                   or _corpus_key(resume["config"]) != _corpus_key(asdict(cfg))):
        raise AdaDecodeError(f"{state_path} belongs to another run (layers, corpus or model differ); use a new --out")
    dtype = model.get_input_embeddings().weight.dtype
    corpus = None
    if not resume and cfg.corpus:  # read before anything is written or generated: its errors come first
        from .corpus import read_corpus

        corpus = read_corpus(cfg.corpus, tokenizer, model.config.vocab_size, cfg.corpus_tokens, cfg.corpus_window,
                             cfg.seed, progress, log=lambda m: print(f"[train-heads] {m}", file=sys.stderr))
    if not resume:
        _check_memory(_token_estimate(tokenizer, prompts, cfg) + (corpus.record["tokens"] if corpus else 0),
                      model, cfg, dtype)
    out.mkdir(parents=True, exist_ok=True)
    seqs_path = out / SEQS_FILE  # the slow part: kept as soon as it exists, so a rerun skips it
    if resume:
        seqs, corpus_record = resume["seqs"], resume.get("corpus")
        n_generated = resume.get("generated", len(seqs))  # states from before corpora hold continuations only
    else:
        corpus_record = corpus.record if corpus else None
        seqs = _continuations(generator or model, tokenizer, prompts, cfg, seqs_path, fingerprints, progress)
        n_generated = len(seqs)
        seqs = seqs + (corpus.windows if corpus else [])

    program = DecodeProgram(structural_graph(model))
    hidden, final = collect_hidden(program, seqs, cfg.layers, program.gm.meta["kv_shapes"], dtype, progress=progress)
    n_tok, d = final.shape
    vocab = shortlist(final_argmax(program, final), cfg.shortlist) if cfg.shortlist else None
    loss_vocab = vocab if cfg.loss_vocab == "shortlist" else None
    head = loss_head(program, loss_vocab)
    adapters = {l: torch.eye(d, requires_grad=True) for l in cfg.layers}
    opt = torch.optim.Adam(adapters.values(), lr=cfg.lr)
    steps_per_epoch = math.ceil(n_tok / cfg.batch_tokens)
    total = steps_per_epoch * cfg.epochs
    step, curve = 0, []
    if resume:
        for l in cfg.layers:
            adapters[l].data.copy_(resume["adapters"][l])
        opt.load_state_dict(resume["optimizer"])
        step, curve = resume["step"], resume["curve"]

    def save_state():
        torch.save({"config": asdict(cfg), "fingerprint": model_fingerprint(model), "seqs": seqs, "step": step,
                    "generated": n_generated, "corpus": corpus_record, "curve": curve,
                    "adapters": {l: a.detach() for l, a in adapters.items()}, "optimizer": opt.state_dict()},
                   state_path)

    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *a: interrupted.append(True))
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    bar = tqdm(total=total, initial=step, disable=not progress, desc="train-heads", unit="step")
    t0, seen = time.perf_counter(), 0
    try:
        while step < total and not interrupted:
            epoch, k = divmod(step, steps_per_epoch)
            order = torch.randperm(n_tok, generator=torch.Generator().manual_seed(cfg.seed + epoch))
            idx = order[k * cfg.batch_tokens:(k + 1) * cfg.batch_tokens]
            with torch.no_grad():
                teacher = F.log_softmax(head(final[idx]).float(), dim=-1)
            for g in opt.param_groups:
                g["lr"] = _lr(step, total, cfg)
            opt.zero_grad(set_to_none=True)
            losses = []
            for l in cfg.layers:
                loss, _ = kl_loss(head, adapters[l], hidden[l][idx], teacher)
                loss.backward()
                losses.append(loss.item())
            stuck = [l for l, a in adapters.items() if a.grad is None]
            if stuck:  # an op without a gradient in the program's epilogue would leave the heads at identity
                raise AdaDecodeError(f"no gradient reaches the heads of layers {stuck}: an operation of the "
                                     "model's final norm / LM head has no backward; train with --dtype float32")
            opt.step()
            step += 1
            seen += len(idx)
            curve.append([step, sum(losses) / len(losses)])
            bar.set_postfix(loss=f"{curve[-1][1]:.3f}", tok_s=f"{seen / (time.perf_counter() - t0):.0f}")
            bar.update(1)
            if step % steps_per_epoch == 0:
                save_state()
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        save_state()
    heads = ExitHeads({l: a.detach().clone() for l, a in adapters.items()}, model_fingerprint(model), d, n_layers,
                      {"trained": True, "method": "self-distillation KL(final || head) over the "
                                 + ("full vocabulary" if loss_vocab is None else f"{len(loss_vocab)}-token shortlist"),
                       "train": asdict(cfg),
                       "dtype": str(dtype).replace("torch.", ""), "tokens": n_tok, "sequences": len(seqs),
                       "training_data": {
                           "continuations": {"data": cfg.data, "sequences": n_generated,
                                             "tokens": sum(map(len, seqs[:n_generated]))},
                           "corpus": corpus_record},
                       "steps": step, "complete": step >= total, "loss_curve": curve[:: max(1, len(curve) // 200)]},
                      vocab)
    heads.save(out)
    if interrupted:
        raise KeyboardInterrupt(f"training interrupted at step {step}/{total}; rerun the same command to resume")
    return heads


def _token_estimate(tokenizer, prompts, cfg: TrainConfig) -> int:
    """Upper bound on the tokens the continuations bring: prompt tokens + gen_tokens each."""
    lens = [len(p) if not isinstance(p, str) else len(tokenizer(p).input_ids) for p in prompts]
    return sum(lens) + cfg.gen_tokens * len(prompts)


def _check_memory(tokens: int, model, cfg: TrainConfig, dtype) -> None:
    """Hidden states of every training token stay in memory (each exit layer and the final one); say so
    before an hour of forward passes ends in the OOM killer."""
    try:
        import psutil
    except ImportError:
        return
    rows = len(cfg.layers) + 1
    need = tokens * rows * model.config.hidden_size * torch.empty((), dtype=dtype).element_size()
    need += need // rows  # collect_hidden concatenates one layer at a time next to the pieces
    free = psutil.virtual_memory().available
    if need > free:
        raise AdaDecodeError(f"training on ~{tokens:,} tokens keeps ~{need / 2 ** 30:.1f} GiB of hidden states "
                             f"({rows} layers x {model.config.hidden_size} x {dtype}), but {free / 2 ** 30:.1f} GiB "
                             "is free: lower --corpus-tokens or --max-prompts, or train fewer --layers")


def shortlist(targets: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size`` tokens the final layer predicts most often in the training data (sorted ids)."""
    counts = torch.bincount(targets)
    k = min(size, int((counts > 0).sum()))
    return torch.sort(torch.topk(counts, k).indices).values
