#!/usr/bin/env python
"""Which transformers decoder families AdaDecode decodes: parity with forced exits, or a clear error.

For each model type (default: every causal-LM type transformers registers, less the encoders and
encoder-decoders), a tiny random model of that type (4 layers, width 32, its LM head sharpened so greedy
choices are clear-cut) decodes two prompts with random exit heads after layers 0 and 2 at gamma 0.02, so
most probes exit and many early tokens are wrong, under each backend; where no probe reaches 0.02, at
gamma 1e-9 (every probe exits). A family passes when every generation equals HF greedy token for token.
float64 where the model's kernels take it, else float32 (MoE kernels). Each family runs in a process of
its own with a time limit: one that crashes or hangs costs only its own row.

``--window N`` sets every sliding-window and attention-chunk size a config has to N (local layers on),
so the windows bind within the sweep's 23-45 positions. ``--dtype bfloat16`` (or ``float16``) builds the
models 128 wide in that dtype: there blocks of deferred rows must round exactly as one row at a time (the
eager backend's promise; `cudagraphs` reads the whole static K/V in one call per block and promises no
low-precision bits).

Outcomes per backend: ``ok`` (with early tokens and rejections), ``mismatch``, ``weak`` (equal, but
without both early tokens and rejections even at gamma 1e-9: proves little), ``refused`` (an
AdaDecodeError: the clear error a user gets) or ``error`` (anything else: a bug to fix). ``no_model``:
the sweep could not build a tiny model of the type or HF itself could not generate with it (a limit of
this script's generic config, not a verdict on AdaDecode), or the type wraps sub-models (multimodal,
speech) whose text decoder is a type of its own here.

    PYTHONPATH=$PWD python bench/family_sweep.py --json docs/families.json --jobs 2
    PYTHONPATH=$PWD python bench/family_sweep.py --families llama,mixtral --backends eager
    PYTHONPATH=$PWD python bench/family_sweep.py --window 5 --json docs/families_window5.json
    PYTHONPATH=$PWD python bench/family_sweep.py --dtype bfloat16 --backends eager --json docs/families_bf16.json
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# tiny sizes under every name the configs use for them; each family takes the ones it has
SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=256, n_embd=32, n_layer=4, n_head=4,
             n_positions=256, ffn_dim=64, n_inner=64, d_model=32, num_layers=4, num_heads=4,
             moe_intermediate_size=32, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
             n_routed_experts=4, shared_expert_intermediate_size=32, pad_token_id=0, bos_token_id=1,
             eos_token_id=2, tie_word_embeddings=False, rotary_dim=4, first_k_dense_replace=1, kv_lora_rank=16,
             q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_layers=4, n_heads=4,
             max_seq_len=256, expansion_ratio=2)
# --dtype bfloat16 / float16: wide enough that the linears take the same kernels as real models' (blocks of
# rows must round like one row at a time), and a vocabulary where low-precision near-ties happen
LOW_PRECISION_SIZES = dict(vocab_size=512, hidden_size=128, intermediate_size=256, n_embd=128, d_model=128,
                           head_dim=32, ffn_dim=256, n_inner=256, moe_intermediate_size=128,
                           shared_expert_intermediate_size=128, global_head_dim=32,
                           vocab_size_per_layer_input=512)
_MLA = dict(qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)
LEAVE_OUT = {"falcon": ("head_dim",), "deepseek_v2": ("head_dim",), "deepseek_v3": ("head_dim",),
             "youtu": ("head_dim",)}
EXTRA = {"gpt_neo": {"attention_types": [[["global", "local"], 2]]},
         "exaone4": {"sliding_window_pattern": 2, "sliding_window": 6},
         "dots1": {"n_shared_experts": 1},
         "deepseek_v2": dict(_MLA, n_shared_experts=1, n_group=1, topk_group=1),
         "deepseek_v3": dict(_MLA, n_shared_experts=1, n_group=1, topk_group=1),
         "youtu": _MLA,
         # MLA models whose K/V heads must equal the query heads
         **{t: _MLA for t in ("glm4_moe_lite", "minicpm3", "sarvam_mla", "axk2", "glm_moe_dsa", "dots3_note_text")},
         # DeepSeek-style routing in groups: one group of the sweep's 4 experts
         **{t: dict(_MLA, n_group=1, topk_group=1) for t in ("axk1", "deepseek_v32")},
         "beam": dict(n_group=1, topk_group=1),
         "longcat_flash": dict(_MLA, ffn_hidden_size=64, expert_ffn_hidden_size=32, moe_topk=2, zero_expert_num=2),
         "gemma4_text": dict(global_head_dim=8, vocab_size_per_layer_input=128, hidden_size_per_layer_input=8),
         # its last layers share K/V, as every released Gemma 3n does
         "gemma3n_text": dict(vocab_size_per_layer_input=128, hidden_size_per_layer_input=8, laurel_rank=4,
                              layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2),
         "dbrx": dict(attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                      ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2})}
# a sub-config of one of these names is a whole tower (multimodal, speech): its text decoder is a type of
# its own here. Others (MPT's and DBRX's attn_config / ffn_config) are parts of the decoder, set above.
TOWERS = ("text_config", "vision_config", "audio_config")
NOT_DECODERS = ("bert", "roberta", "electra", "xlm", "xlnet", "camembert", "ernie", "data2vec", "megatron",
                "rembert", "roc_bert", "roformer", "big_bird", "bigbird", "bart", "blenderbot", "marian", "mbart",
                "mvp", "pegasus", "plbart", "prophetnet", "trocr", "whisper", "xmod", "reformer", "git",
                "musicgen", "moshi", "cpmant", "ctrl", "openai-gpt", "modernbert", "emu3", "fuyu", "got_ocr2",
                "mllama", "phi4_multimodal", "blt")
# --window N: every local-attention setting a config has, so the windows bind within the sweep's lengths
WINDOW_FIELDS = {"sliding_window": None, "attention_chunk_size": None, "use_sliding_window": True,
                 "max_window_layers": 0}
PROMPTS = ([5, 6, 7], list(range(20, 45)))
NEW_TOKENS = 20
# 0.02 mixes right and wrong exits; where no probe reaches it (a logit scale that flattens every
# distribution, as Cohere's), every probe exits at the second
GAMMAS = (0.02, 1e-9)


def all_families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if not t.startswith(NOT_DECODERS))


def _has(config, name: str) -> bool:
    """``hasattr``, where a per-layer attribute (Gemma 4's ``head_dim``) raises rather than answer: it is set."""
    try:
        return hasattr(config, name)
    except Exception:  # noqa: BLE001  transformers' AmbiguousGlobalPerLayerAttributeError
        return True


def _per_layer_lists(default, layers: int, sizes: dict) -> dict:
    """The default config's per-layer lists (``layer_types``, ``mlp_layer_types``...) cut to ``layers``
    entries: the first ``layers - 1`` and the last, so both the leading kinds (dense MLPs, local attention)
    and the final one stay. Not where ``sizes`` sets the field (Gemma 3n's per-layer MLP widths)."""
    depth = next((getattr(default, k) for k in ("num_hidden_layers", "n_layers", "num_layers")
                  if isinstance(getattr(default, k, None), int)), None)
    out = {}
    for k, v in vars(default).items():
        if depth and isinstance(v, list) and len(v) == depth and depth > layers and k not in sizes:
            out[k] = v[:layers - 1] + v[-1:]
    return out


def check_family(model_type: str, backends: list[str], window: int | None = None, dtype: str = "float64") -> dict:
    """One family, in this process (the worker side of `main`)."""
    import torch
    import transformers as tf

    from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
    from adadecode_fx.errors import AdaDecodeError

    out = {"family": model_type}
    try:
        cls = tf.CONFIG_MAPPING[model_type]
        default = cls()
        towers = set(getattr(default, "sub_configs", None) or ()) & set(TOWERS)
        if towers:  # its default towers are full size; SMALL reaches none
            return {**out, "no_model": f"wraps sub-models ({', '.join(default.sub_configs)}): its text decoder "
                                       "is swept as a type of its own"}
        low = dtype in ("bfloat16", "float16")
        sizes = {**SMALL, **LOW_PRECISION_SIZES} if low else SMALL
        kw = {k: v for k, v in sizes.items() if _has(default, k) and k not in LEAVE_OUT.get(model_type, ())}
        kw.update(_per_layer_lists(default, SMALL["num_hidden_layers"], kw))
        if window:
            kw.update({k: window if v is None else v for k, v in WINDOW_FIELDS.items() if hasattr(default, k)})
        extra = {k: LOW_PRECISION_SIZES.get(k, v) if low else v for k, v in EXTRA.get(model_type, {}).items()}
        config = cls(**{**kw, **extra})
    except Exception as e:  # noqa: BLE001  a config this script cannot make small
        return {**out, "no_model": f"config: {type(e).__name__}: {str(e)[:200]}"}

    def reference(dtype):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config).to(dtype).eval()
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(4.0)
        model.generation_config.eos_token_id = model.generation_config.pad_token_id = None
        refs = []
        for p in PROMPTS:
            ids = torch.tensor([p])
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, pad_token_id=0)
            refs.append(seq[0, len(p):].tolist())
        return model, refs

    try:
        try:
            model, refs = reference(getattr(torch, dtype))
        except Exception:  # noqa: BLE001  MoE kernels take no float64
            if low:
                raise
            model, refs = reference(torch.float32)
    except Exception as e:  # noqa: BLE001
        return {**out, "no_model": f"HF generate: {type(e).__name__}: {str(e)[:200]}"}
    out["dtype"] = str(model.dtype).removeprefix("torch.")
    if window:  # as the config took it (prompts and generations run past it)
        out["window"] = getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None)
    for backend in backends:
        t0 = time.perf_counter()
        try:
            heads = ExitHeads.random(model, (0, 2), scale=0.5, seed=1)
            for gamma in GAMMAS:
                dec = AdaDecoder(model, heads, AdaDecodeConfig(backend=backend, threshold=gamma, max_pending=3))
                same, early, rejected = True, 0, 0
                for p, ref in zip(PROMPTS, refs):
                    res = dec.generate(p, NEW_TOKENS, eos_token_id=None)
                    same &= res.new_tokens == ref
                    early, rejected = early + res.stats.early_emitted, rejected + res.stats.rejected
                if not same or (early and rejected):  # a mismatch at either gamma is the row's outcome
                    break
            outcome = "mismatch" if not same else "ok" if early and rejected else "weak"
            out[backend] = {"outcome": outcome, "gamma": gamma, "early": early, "rejected": rejected,
                            "seconds": round(time.perf_counter() - t0, 1)}
        except AdaDecodeError as e:
            out[backend] = {"outcome": "refused", "message": str(e)[:400]}
        except Exception as e:  # noqa: BLE001  the rows a sweep is for
            out[backend] = {"outcome": "error", "message": f"{type(e).__name__}: {str(e)[:400]}"}
    return out


def _run_one(model_type: str, backends: list[str], timeout: float, window: int | None, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", model_type, "--backends", ",".join(backends), "--dtype", dtype]
    cmd += ["--window", str(window)] if window else []
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        return {"family": model_type, "crashed": f"no answer within {timeout:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        return {"family": model_type, "crashed": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def _line(r: dict, backends: list[str]) -> str:
    if "no_model" in r or "crashed" in r:
        what = "no_model" if "no_model" in r else "CRASHED"
        return f"{r['family']:22s} {what}: {r.get('no_model', r.get('crashed'))[:90]}"
    parts = []
    for b in backends:
        v = r[b]
        parts.append(f"{b} {v['outcome']}" + (f" ({v['early']} early, {v['rejected']} rejected)" if "early" in v
                                              else f": {v['message'][:70]}"))
    return f"{r['family']:22s} {r['dtype']:8s} " + "; ".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", help="comma-separated model types (default: every causal-LM decoder type)")
    p.add_argument("--backends", default="eager,cudagraphs")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per family")
    p.add_argument("--window", type=int, help="set every sliding-window / attention-chunk size a config has to "
                                              "this (with local layers switched on), so windows bind")
    p.add_argument("--dtype", choices=("float64", "bfloat16", "float16"), default="float64",
                   help="float64 (float32 where a kernel takes no float64), or bfloat16 / float16 at width 128: "
                        "exactness of low-precision blocks, which only the eager backend promises")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    if args.worker:
        print(json.dumps(check_family(args.worker, backends, args.window, args.dtype)))
        return 0
    families = args.families.split(",") if args.families else all_families()
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda f: _run_one(f, backends, args.timeout, args.window, args.dtype), families))
    for r in rows:
        print(_line(r, backends))
    tally = {}
    for r in rows:
        key = "no_model" if "no_model" in r else "crashed" if "crashed" in r else \
            "/".join(sorted({r[b]["outcome"] for b in backends}))
        tally[key] = tally.get(key, 0) + 1
    print("families:", ", ".join(f"{n} {k}" for k, n in sorted(tally.items())))
    if args.json:
        from adadecode_fx.bench.report import code_commit, machine_info

        with open(args.json, "w") as f:
            json.dump({"machine": machine_info("cpu"), "commit": code_commit(), "argv": sys.argv,
                       "backends": backends, "dtype": args.dtype, "window": args.window, "prompts": PROMPTS,
                       "new_tokens": NEW_TOKENS, "families": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
