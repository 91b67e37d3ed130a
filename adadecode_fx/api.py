"""``adadecode_fx.generate``: one verb for the three ways in.

1. ``adadecode_fx.generate(compiled, input_ids, max_new_tokens=64)`` where
   ``compiled = torch.compile(model, backend="adadecode", options={...})``: options come from the
   compile call.
2. ``model.generate(**inputs, custom_generate=adadecode_fx.generate, exit_heads=..., adadecode=...)``:
   Hugging Face prepares inputs, the generation config, stopping criteria and the streamer, then
   hands over its loop to us (transformers >= 5 calls ``custom_generate(model, input_ids, ...)``).
3. ``adadecode_fx.generate(model, input_ids, ...)`` directly.

Decoders are cached per model and settings, so the capture and any compilation happen once.
"""
from __future__ import annotations

import weakref

import torch

from .capture import check_supported
from .backend import compiled_in_place_options, compiled_options, is_compiled, parse_options
from .config import AdaDecodeConfig, check_names, config_fields
from .errors import AdaDecodeError
from .heads.format import ExitHeads, find_shipped_heads
from .runtime.decoder import AdaDecoder
from .runtime.sampling import SamplingConfig

_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def resolve_heads(model, spec) -> ExitHeads:
    """``spec``: an `ExitHeads`, a directory, or ``"shipped"`` (the heads packaged for this model)."""
    if isinstance(spec, ExitHeads):
        return spec
    if spec is None or spec == "shipped":
        folder = find_shipped_heads(model)
        if folder is None:
            raise AdaDecodeError(
                "no exit heads ship for this model; train some (adadecode train-heads --model ... --out DIR) "
                "and pass exit_heads=DIR (or options={'heads': DIR} to torch.compile)")
        return ExitHeads.load(folder)
    return ExitHeads.load(spec)


def decoder_for(model, config=None, heads=None) -> AdaDecoder:
    """The cached `AdaDecoder` for ``model`` (a model, or a module compiled with backend="adadecode":
    ``torch.compile(model, ...)`` or in place, ``model.compile(...)``).

    ``config``: an `AdaDecodeConfig` or a dict of its fields (exit layers and threshold left out come
    from the heads' calibration, see `AdaDecodeConfig.resolve`); for a compiled module, its compile options."""
    if is_compiled(model):
        compiled, model = compiled_options(model), model._orig_mod
    else:
        compiled = compiled_in_place_options(model)
    check_supported(model)  # before heads are looked up for it: a model's forward is not a model
    if compiled is not None:
        options, options_heads = parse_options(compiled)
        config = options if config is None else config
        heads = options_heads if heads is None else heads
    heads_key = id(heads) if isinstance(heads, ExitHeads) else str(heads)
    config_key = config.to_json() if isinstance(config, AdaDecodeConfig) else repr(sorted((config or {}).items()))
    per_model = _DECODERS.setdefault(model, {})
    key = (config_key, heads_key)
    if key not in per_model:
        if not isinstance(config, AdaDecodeConfig):
            check_names(config or {}, config_fields(), "adadecode setting(s)")
            config = AdaDecodeConfig(**(config or {}))
        per_model[key] = AdaDecoder(model, resolve_heads(model, heads), config)
    return per_model[key]


# what HF's generation config may ask for beyond the output ids and scores, which AdaDecode does not return
_HF_OUTPUTS = ("output_attentions", "output_hidden_states")


def _check_hf_mode(generation_config, assistant_model) -> None:
    """Refuse a decoding mode other than greedy search or sampling: HF would hand it to us all the same
    (``custom_generate`` replaces its loop), and decoding greedily instead would change the output."""
    if generation_config.num_beams not in (None, 1):
        raise AdaDecodeError("beam search is not supported by AdaDecode; use num_beams=1")
    mode = str(getattr(generation_config.get_generation_mode(assistant_model), "value", ""))
    if mode == "assisted_generation":
        raise AdaDecodeError("assisted generation (assistant_model, prompt_lookup_num_tokens, assistant_early_exit) "
                             "and AdaDecode are two ways to speed up the same decoding: pass one of them")
    if mode not in ("greedy_search", "sample"):
        raise AdaDecodeError(f"HF's {mode.replace('_', ' ')} mode is not supported by AdaDecode, which decodes "
                             "greedily or samples: drop penalty_alpha, dola_layers, constraints and force_words_ids")
    asked = [name for name in _HF_OUTPUTS if getattr(generation_config, "return_dict_in_generate", False)
             and getattr(generation_config, name, False)]
    if asked:
        raise AdaDecodeError(f"AdaDecode returns token ids, scores and logits; {', '.join(asked)} are not "
                             "available (drop them, or run a forward pass over the returned sequences)")


def _hf_output(generation_config, result, prompt: torch.Tensor, processors):
    """HF's output object: ``scores`` are the final layer's logits through ``processors`` with each
    token's prefix, as HF's loop computes them; ``logits`` the raw ones (float32, ``[1, V]`` per token)."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    scores = logits = None
    if result.logits is not None:
        logits = tuple(l[None] for l in result.logits)
        if generation_config.output_scores:
            seq, P = result.sequences, prompt.shape[-1]
            scores = tuple(processors(seq[:, :P + i], l.clone()) if processors else l.clone()
                           for i, l in enumerate(logits))
        if not generation_config.output_logits:
            logits = None
    return GenerateDecoderOnlyOutput(sequences=result.sequences, scores=scores, logits=logits)


def _hf_generate_local(name: str):
    """The argument ``name`` of the HF ``generate`` call that called us (None if there is none or we were
    called otherwise): transformers 5.24 passes a callable ``custom_generate`` only the arguments that
    HF's own ``_sample`` does not take, so ``streamer=`` and ``assistant_model=`` do not reach us. Read
    from the caller's frame, by name; a version of HF that calls us from elsewhere simply yields None."""
    import inspect

    frame = inspect.currentframe()
    ours = frame.f_back if frame is not None else None
    caller = ours.f_back if ours is not None else None
    try:
        if caller is None or caller.f_code.co_name != "generate":
            return None
        return caller.f_locals.get(name)
    finally:
        del frame, ours, caller


def with_stop_strings(stopping_criteria, stop_strings, tokenizer):
    """``stopping_criteria`` plus HF's criterion for ``stop_strings`` (a string or a list of them)."""
    from transformers import StoppingCriteriaList, StopStringCriteria

    if tokenizer is None:
        raise AdaDecodeError("stop_strings need the model's tokenizer to find the strings in the tokens: pass "
                             "tokenizer=...")
    try:
        criterion = StopStringCriteria(tokenizer, stop_strings)
    except Exception as exc:  # HF's criterion reads the vocabulary; some tokenizers it cannot read
        raise AdaDecodeError(f"HF's StopStringCriteria cannot read this tokenizer's vocabulary ({type(exc).__name__}: "
                             f"{exc}); stop on a token instead (eos_token_id=[...]) or pass stopping_criteria of "
                             "your own") from exc
    return StoppingCriteriaList([*(stopping_criteria or []), criterion])


def _beyond_the_runtime(stopping_criteria, max_length: int, eos):
    """The criteria among HF's prepared ones that the runtime does not apply itself: its own length and
    EOS checks cover HF's default `MaxLengthCriteria` and `EosTokenCriteria`. Asking those about every
    verified token would rebuild the row as a tensor each time (~0.1 ms at 300 tokens, ~1 ms at 8,000)."""
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList

    eos_ids = {int(e) for e in ([eos] if isinstance(eos, int) else (eos or []))}

    def covered(criterion) -> bool:
        if type(criterion) is MaxLengthCriteria:
            return criterion.max_length >= max_length
        if type(criterion) is EosTokenCriteria:
            return {int(e) for e in criterion.eos_token_id.flatten().tolist()} <= eos_ids
        return False
    return StoppingCriteriaList([c for c in (stopping_criteria or []) if not covered(c)])


def stop_function(stopping_criteria, input_ids):
    """The runtime's ``stop(tokens)`` asking HF stopping criteria about one row (None without criteria)."""
    if not stopping_criteria:
        return None
    device = getattr(input_ids, "device", None)

    def stop(tokens):
        return bool(stopping_criteria(torch.tensor([tokens], device=device), None).any())
    return stop


def generate(model, input_ids=None, logits_processor=None, stopping_criteria=None, generation_config=None,
             synced_gpus=False, streamer=None, exit_heads=None, adadecode=None, stream=None, seed=None, **kwargs):
    """AdaDecode generation (greedy, or sampling); returns ``[B, prompt + new]`` token ids like ``model.generate``.

    Batches: ``input_ids [B, T]`` with a left-padding ``attention_mask`` (``tokenizer.padding_side = "left"``);
    rows that end early are padded with ``pad_token_id`` (see `AdaDecoder.generate` for how rows share steps).

    Called by HF (``custom_generate``), ``generation_config`` holds the length and EOS settings and
    ``stopping_criteria`` is honoured after every verified token (HF drops ``tokenizer=`` for a callable, so
    its ``stop_strings=`` fail there: pass ``StopStringCriteria(tok, [...])`` among the criteria). Called
    directly, pass ``max_new_tokens`` / ``eos_token_id`` / ``stopping_criteria`` / ``stop_strings`` (with
    ``tokenizer``) as keywords. ``exit_heads`` and ``adadecode`` (an
    `AdaDecodeConfig` or a dict of its fields) choose the heads and settings.

    Streaming through HF: transformers 5.24 passes a callable ``custom_generate`` only the arguments
    that HF's own ``_sample`` does not take, so ``streamer=`` does not reach us as an argument, although
    HF has put the prompt into it (a ``TextIteratorStreamer``'s reader would then wait for ever). So
    the streamer is taken from HF's ``generate`` call itself (`_hf_generate_local`). ``stream=`` does the
    same explicitly; either receives the prompt, the verified tokens as they are final, and ``end()``.

    Sampling: through HF, ``do_sample=True`` (with ``temperature``, ``top_k``, ``top_p``...) applies HF's
    prepared ``logits_processor`` list to the exit heads' and the final layer's logits alike; the output is
    distributed as HF sampling. ``seed=`` (an int) seeds a private generator; without it, torch's global
    RNG is used (``torch.manual_seed`` makes runs reproducible). Called directly, pass ``do_sample=True``
    and `SamplingConfig` fields (``temperature``, ``top_k``, ``top_p``, ``min_p``) as keywords. Beam
    search is refused.

    Greedy with processors (``repetition_penalty``, ``no_repeat_ngram_size``, ``bad_words_ids``... through
    HF; ``logits_processor=`` called directly): the tokens of HF's greedy search with them. Processors
    that keep state across calls are refused, as for sampling.
    """
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    if kwargs.get("inputs_embeds") is not None:
        raise AdaDecodeError("inputs_embeds are not supported: AdaDecode runs the model from token ids (every "
                             "step, deferred rows included, starts at the embedding layer); pass input_ids instead")
    if input_ids is None:
        raise AdaDecodeError("generate needs input_ids (a [batch, length] LongTensor)")
    sampling = None
    if generation_config is not None:  # called by HF generate: refuse what would change the output
        assistant = kwargs.get("assistant_model")
        _check_hf_mode(generation_config, _hf_generate_local("assistant_model") if assistant is None else assistant)
        if getattr(generation_config, "do_sample", False):
            sampling = SamplingConfig(logits_processor=logits_processor, seed=seed)
        elif seed is not None:
            raise AdaDecodeError("seed= only applies when sampling: pass do_sample=True")
    mask = kwargs.pop("attention_mask", None)
    pad_id = kwargs.pop("pad_token_id", None)
    if generation_config is not None and pad_id is None:
        pad_id = generation_config.pad_token_id
    if stream is None and streamer is None and generation_config is not None:
        from transformers.generation.streamers import BaseStreamer

        streamer = _hf_generate_local("streamer")  # HF has put the prompt into it already
        streamer = streamer if isinstance(streamer, BaseStreamer) else None
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[0] > 1 and (
            stream is not None or streamer is not None):
        raise AdaDecodeError("a streamer takes one sequence (as in HF); drop it for a batch")
    decoder = decoder_for(model, adadecode, exit_heads)
    if stream is not None:
        stream.put(torch.as_tensor(input_ids).cpu())  # HF streamers take the prompt first
        streamer = stream
    elif streamer is not None and generation_config is None:
        streamer.put(torch.as_tensor(input_ids).cpu())
    if generation_config is not None:  # called by HF generate
        prompt_len = input_ids.shape[-1]
        max_new = generation_config.max_new_tokens
        if max_new is None:
            max_new = generation_config.max_length - prompt_len
        eos = generation_config.eos_token_id
        stop = stop_function(_beyond_the_runtime(stopping_criteria, prompt_len + max_new, eos), input_ids)
        greedy = {"logits_processor": logits_processor} if sampling is None and logits_processor else {}
        as_dict = getattr(generation_config, "return_dict_in_generate", False)
        scored = as_dict and (generation_config.output_scores or generation_config.output_logits)
        result = decoder.generate(input_ids, max_new_tokens=max_new, eos_token_id=eos, stop=stop, streamer=streamer,
                                  attention_mask=mask, pad_token_id=pad_id, sampling=sampling,
                                  output_logits=bool(scored), **greedy)
        if as_dict:
            return _hf_output(generation_config, result, input_ids, logits_processor)
        return result.sequences
    max_new = kwargs.pop("max_new_tokens", 64)
    eos = kwargs.pop("eos_token_id", "default")
    stop_strings, tokenizer = kwargs.pop("stop_strings", None), kwargs.pop("tokenizer", None)
    if stop_strings:
        stopping_criteria = with_stop_strings(stopping_criteria, stop_strings, tokenizer)
    do_sample = bool(kwargs.pop("do_sample", False))
    options = {k: kwargs.pop(k) for k in ("temperature", "top_k", "top_p", "min_p") if k in kwargs}
    if logits_processor is not None:
        options["logits_processor"] = logits_processor
    if kwargs:
        raise AdaDecodeError(f"unexpected arguments {sorted(kwargs)}; generate takes max_new_tokens, eos_token_id, "
                             "attention_mask, pad_token_id, stopping_criteria, stop_strings (with tokenizer), streamer, "
                             "exit_heads, adadecode, and for sampling do_sample, temperature, top_k, top_p, min_p, seed")
    if seed is not None:
        options["seed"] = seed
    greedy = {}
    if not do_sample and "logits_processor" in options:  # greedy search after the processors
        greedy["logits_processor"] = options.pop("logits_processor")
    if options and not do_sample:
        raise AdaDecodeError(f"{sorted(options)} only apply when sampling: pass do_sample=True")
    return decoder.generate(input_ids, max_new_tokens=max_new, eos_token_id=eos, streamer=streamer,
                            stop=stop_function(stopping_criteria, input_ids), attention_mask=mask, pad_token_id=pad_id,
                            sampling=SamplingConfig(**options) if do_sample else None, **greedy).sequences
