"""The cudagraphs backend: static K/V, runs of layers as static calls per block length.

On a CPU the static calls run uncaptured over the same static buffers, so these tests check its logic
(copies in and out, runs, capacity, padding) against HF greedy and our eager path; the CUDA tests at
the end (skipped without a GPU) check that the captured graphs replay the same tokens and that
nothing is captured after warm-up."""
import pytest
import torch
from torch._dynamo.utils import counters

import adadecode_fx
from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
from adadecode_fx.errors import AdaDecodeError
from adadecode_fx.heads import shipped_heads
from adadecode_fx.lower.static_segments import layers_read_token_ids
from adadecode_fx.lower.static_graphs import StaticCall

from tests.conftest import cuda_model, hf_greedy, smollm2_parity, tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FORCED = dict(threshold=0.02, max_pending=3)  # random heads at a tiny gamma: many exits, many rollbacks


def _pair(model, layers=(1, 3), seed=1, compile_segments=False, **config):
    heads = ExitHeads.random(model, layers, scale=0.5, seed=seed)
    settings = {**FORCED, **config}
    static = AdaDecodeConfig(backend="cudagraphs", compile_segments=compile_segments, **settings)
    return (AdaDecoder(model, heads, static),
            AdaDecoder(model, heads, AdaDecodeConfig(**settings)))


def _expected_calls(decoder) -> int:
    """Runs (their probes inside): layer 0 for T = 1, deeper runs for T = 1..max_pending + 1; the
    epilogue for as many rows, unless the last run computes it."""
    runner = decoder.program.runner
    return 1 + (len(runner.runs) - 1) * runner.max_rows + (0 if runner.epilogue_folded else runner.max_rows)


# gemma2: eager attention with a float mask and sliding-window layers; gemma4: per-layer inputs from the
# token ids, which runs past layer 0 must read for their own rows; fp64 models are shared with the
# property tests (one capture each per session)
@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("llama", torch.float64),
                                          ("qwen2", torch.float32), ("gemma2", torch.float64),
                                          ("gpt_neox", torch.float64), ("gemma4", torch.float64)])
def test_parity_with_hf_and_eager_with_forced_exits_and_rollbacks(family, dtype):
    model = tiny_model(family, dtype=dtype)
    static, eager = _pair(model)
    assert static.program.runs == [(0, 1), (2, 3), (4, 4)]
    early = rejected = 0
    for prompt in ([5, 6, 7], list(range(20, 45))):
        out = static.generate(prompt, 25, eos_token_id=None)
        ref = eager.generate(prompt, 25, eos_token_id=None)
        assert out.new_tokens == hf_greedy(model, prompt, 25)
        assert out.new_tokens == ref.new_tokens
        # same exit decisions, same verdicts: the schedule does not depend on how the runs execute
        for key in ("early_emitted", "accepted", "rejected", "steps", "critical_path_layers", "layer_rows"):
            assert getattr(out.stats, key) == getattr(ref.stats, key), key
        early += out.stats.early_emitted
        rejected += out.stats.rejected
    assert early >= 20 and rejected >= 5, (early, rejected)


def test_only_models_whose_layers_read_the_token_ids_keep_them_per_slot():
    """Llama's layers read only the embeddings of the ids: its runs keep no token buffer (nothing added to
    a step). Gemma 4's per-layer inputs are computed from the ids, so its runs read each row's own."""
    llama, _ = _pair(tiny_model("llama", dtype=torch.float64))
    assert not layers_read_token_ids(llama.program) and llama.program.runner.tokens is None
    gemma4, _ = _pair(tiny_model("gemma4", dtype=torch.float64))
    runner = gemma4.program.runner
    assert layers_read_token_ids(gemma4.program) and runner.tokens.shape == (1, runner.capacity)
    gemma4.generate([5, 6, 7], 4, eos_token_id=None)
    assert runner.tokens[0, :3].tolist() == [5, 6, 7]


def test_a_probe_after_the_last_layer_keeps_the_epilogue_out_of_the_last_run():
    """A probe after the last layer may draft from the last run's block, so the LM head is a graph of its
    own there (per T), and drafted rows reach it with the next block."""
    model = tiny_model("llama", dtype=torch.float64)
    static, eager = _pair(model, layers=(1, 4))
    runner = static.program.runner
    assert not runner.epilogue_folded and runner.made == _expected_calls(static) == 1 + 4 + 4
    early = 0
    for prompt in ([5, 6, 7], list(range(20, 45))):
        out = static.generate(prompt, 25, eos_token_id=None)
        ref = eager.generate(prompt, 25, eos_token_id=None)
        assert out.new_tokens == ref.new_tokens == hf_greedy(model, prompt, 25)
        for key in ("early_emitted", "accepted", "rejected", "steps", "critical_path_layers", "layer_rows"):
            assert getattr(out.stats, key) == getattr(ref.stats, key), key
        assert out.stats.token_exit_layers == ref.stats.token_exit_layers
        early += out.stats.early_emitted
    assert early >= 10 and runner.made == _expected_calls(static) and runner.unfolded_probes == 0


def test_the_last_run_answers_the_epilogue_for_a_tail_of_its_block():
    model = tiny_model("llama", dtype=torch.float32)
    static, _ = _pair(model)
    program, runner = static.program, static.program.runner
    state = program.kv_state(40, 1)
    program.step_inputs([[5, 6, 7]], 8, None, state)
    hidden = program.run_layers(4, 4, torch.randn(1, 3, model.config.hidden_size), 3, None, {}, state.views(11))
    logits = program.epilogue(hidden[:, 1:])
    assert logits.data_ptr() == runner.logits[:, 1:].data_ptr()  # rows of what the run computed
    assert torch.allclose(logits, runner.epilogue.fn(hidden[:, 1:].clone())[0], atol=1e-6)
    made = runner.made
    other = program.epilogue(hidden[:, 1:].clone())  # not the run's block: computed, nothing made
    assert torch.equal(other, logits) and runner.made == made
    # greedy verification reads the argmax the run's graph took of those rows; of other logits, its own
    assert program.read_predictions(logits) == logits.argmax(dim=-1).tolist()
    runner.predictions.fill_(-5)
    assert program.read_predictions(logits) == [[-5, -5]]
    assert program.read_predictions(other) == logits.argmax(dim=-1).tolist()


def test_nothing_is_made_after_warm_up_across_generation_lengths():
    model = tiny_model("qwen2", dtype=torch.float32)
    static, _ = _pair(model, max_pending=4)
    runner = static.program.runner
    assert runner.made == _expected_calls(static) == 1 + 2 * 5
    for prompt, new in (([1], 3), ([5, 6, 7], 30), (list(range(20, 45)), 12), ([9, 9], 1)):
        out = static.generate(prompt, new, eos_token_id=None)
        assert out.new_tokens == hf_greedy(model, prompt, new)
    assert runner.made == _expected_calls(static), "a generation made a static call after warm-up"
    assert runner.unfolded_probes == 0, "a probe ran outside the run that ends at its layer"


def test_without_heads_the_whole_stack_is_one_run():
    model = tiny_model("qwen2", dtype=torch.float32)
    static = AdaDecoder(model, None, AdaDecodeConfig(backend="cudagraphs", max_pending=2))
    # one graph per step: layer 0 to the LM head
    assert static.program.runs == [(0, 4)] and static.program.runner.made == _expected_calls(static) == 1
    assert static.program.lowering["compile_segments"] is False  # the default compiles on a GPU only
    for prompt in ([5, 6, 7], [1]):
        assert static.generate(prompt, 12, eos_token_id=None).new_tokens == hf_greedy(model, prompt, 12)
    assert static.program.runner.made == 1


def test_capacity_grows_before_decoding_and_then_stays():
    model = tiny_model("llama", dtype=torch.float32)
    static, _ = _pair(model, max_cache_len=16)
    runner = static.program.runner
    calls = _expected_calls(static)
    prompt = list(range(10, 22))
    assert static.generate(prompt, 3, eos_token_id=None).new_tokens == hf_greedy(model, prompt, 3)
    assert runner.capacity == 16 and runner.made == calls
    out = static.generate(prompt, 20, eos_token_id=None)  # needs 33 slots: grows to 256, warms up again
    assert out.new_tokens == hf_greedy(model, prompt, 20)
    assert runner.capacity == 256 and runner.made == 2 * calls
    static.generate(prompt, 20, eos_token_id=None)
    assert runner.made == 2 * calls


def test_a_left_padded_prompt_reads_its_padding_inside_the_runs():
    """Positions are slots - pad, computed inside each run from a static pad value; K/V rows of the
    padding slots are masked (and stale from the previous generation, which must not matter)."""
    model = tiny_model("llama", dtype=torch.float32)
    static, _ = _pair(model)
    prompt = [5, 6, 7, 8]
    static.generate(list(range(30, 60)), 10, eos_token_id=None)  # leave rows of another prompt behind
    ids = torch.tensor([[0, 0, 0] + prompt])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    out = static.generate(ids, 20, attention_mask=mask, eos_token_id=None)
    assert out.new_tokens == hf_greedy(model, prompt, 20)


def test_seeded_sampling_matches_the_eager_path():
    model = tiny_model("llama", dtype=torch.float64)
    static, eager = _pair(model, threshold=0.3)
    for seed in (0, 1):
        options = dict(do_sample=True, temperature=0.8, top_k=20, seed=seed, eos_token_id=None)
        out = static.generate([5, 6, 7], 20, **options)
        assert out.new_tokens == eager.generate([5, 6, 7], 20, **options).new_tokens


def test_batches_are_refused_and_options_checked():
    model = tiny_model("llama", dtype=torch.float32)
    static, _ = _pair(model)
    with pytest.raises(AdaDecodeError, match="one sequence"):
        static.generate([[1, 2, 3], [4, 5]], 4)
    with pytest.raises(AdaDecodeError, match="max_cache_len"):
        AdaDecodeConfig(backend="cudagraphs", max_cache_len=0)
    with pytest.raises(AdaDecodeError, match="backend='cudagraphs' only"):
        AdaDecodeConfig(backend="eager", compile_segments=True)
    with pytest.raises(AdaDecodeError, match="compile_segments must be"):
        AdaDecodeConfig(backend="cudagraphs", compile_segments="yes")


def test_segments_are_compiled_by_default_on_a_gpu_only():
    """compile_segments=None (the default): inductor's kernels where graphs are captured (1.8x faster
    graphs on an H200), ATen's where the static program runs uncaptured; True and False are kept."""
    from adadecode_fx.lower.cudagraphs import compiles_segments

    auto = AdaDecodeConfig(backend="cudagraphs")
    assert auto.compile_segments is None
    assert compiles_segments(auto, "cuda") and compiles_segments(auto, torch.device("cuda", 0))
    assert not compiles_segments(auto, "cpu")
    assert not compiles_segments(AdaDecodeConfig(backend="cudagraphs", compile_segments=False), "cuda")
    assert compiles_segments(AdaDecodeConfig(backend="cudagraphs", compile_segments=True), "cpu")
    assert AdaDecodeConfig(backend="eager").compile_segments is None  # no error: None is every backend's


def test_compiled_segments_match_eager_and_hf_without_recompiling():
    """compile_segments: the static segments through inductor (shared layer template, dynamic T and
    capacity), run by the same static calls; same tokens and schedule, nothing compiled or made after
    warm-up."""
    model = tiny_model("llama", dtype=torch.float32)
    static, eager = _pair(model, compile_segments=True)
    assert static.program.lowering["compiled_templates"] == 4  # one layer kind, prologue, epilogue, probe
    runner = static.program.runner
    before = counters["stats"]["unique_graphs"]
    assert before > 0 and runner.made == _expected_calls(static)
    early = rejected = 0
    for prompt, new in (([5, 6, 7], 25), (list(range(20, 45)), 25), ([1], 6)):
        out = static.generate(prompt, new, eos_token_id=None)
        ref = eager.generate(prompt, new, eos_token_id=None)
        assert out.new_tokens == ref.new_tokens == hf_greedy(model, prompt, new)
        for key in ("early_emitted", "accepted", "rejected", "steps", "critical_path_layers"):
            assert getattr(out.stats, key) == getattr(ref.stats, key), key
        early += out.stats.early_emitted
        rejected += out.stats.rejected
    assert counters["stats"]["unique_graphs"] == before, "a generation recompiled after warm-up"
    assert runner.made == _expected_calls(static), "a generation made a static call after warm-up"
    assert early >= 20 and rejected >= 5, (early, rejected)


def test_compile_backend_and_custom_generate_reach_it():
    model = tiny_model("llama", dtype=torch.float32)
    heads = ExitHeads.random(model, (1, 3), scale=0.5, seed=1)
    options = {"backend": "cudagraphs", "heads": heads, **FORCED}
    compiled = torch.compile(model, backend="adadecode", options=options)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(compiled(ids).logits, model(ids).logits, atol=1e-5)
    ref = hf_greedy(model, [5, 6, 7, 8], 16)
    seq = adadecode_fx.generate(compiled, ids, max_new_tokens=16, eos_token_id=None)
    assert seq[0, 4:].tolist() == ref
    assert adadecode_fx.api.decoder_for(compiled).program.backend == "cudagraphs"
    seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                         pad_token_id=0, custom_generate=adadecode_fx.generate, exit_heads=heads,
                         adadecode={"backend": "cudagraphs", **FORCED})
    assert seq[0, 4:].tolist() == ref


def test_a_step_writes_one_static_input_and_builds_nothing_per_layer():
    """The host's part of a step is what a GPU waits for: a static program's step writes its end slot
    and newest token into one static tensor, and its K/V state hands out the runner's buffers, not a
    view per layer."""
    model = tiny_model("llama", dtype=torch.float32)
    static, _ = _pair(model)
    program = static.program
    state = program.kv_state(40, 1)
    top = program.step_inputs([[9]], 6, None, state)
    assert set(top) == {"rows"} and program.runner.step.tolist() == [7, 9]
    program.step_inputs([[5, 6]], 3, None, state)
    assert program.runner.step.tolist() == [5, 6]
    views = state.views(7)
    assert len(views) == len(program.runner.buffers)
    assert all(mine is theirs for mine, theirs in zip(views, program.runner.buffers))


def test_blocks_enter_the_next_run_where_the_previous_graph_or_the_join_wrote_them():
    """Outside the graphs a step copies only its static input: a block that goes on is read from the
    previous run's output buffer, and parked rows are joined to it straight in the next call's input."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = tiny_model("llama", dtype=torch.float32)
    static, _ = _pair(model)
    runner = static.program.runner
    calls = runner.book.calls
    for (first, prev) in runner.previous.items():
        for n in range(1, runner.max_rows + 1):
            if ("run", prev, n) in calls:
                assert calls[("run", first, n)].inputs[0] is calls[("run", prev, n)].outputs[0]

    class Copies(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.overloadpacket.__name__ == "copy_" and not runner_busy
            return func(*args, **(kwargs or {}))

    runner_busy = False
    original = StaticCall.run_uncaptured

    def body_only(call_self):  # what a replay does on a GPU: not counted
        nonlocal runner_busy
        runner_busy = True
        try:
            original(call_self)
        finally:
            runner_busy = False

    StaticCall.run_uncaptured = body_only
    try:
        with Copies() as copies:
            out = static.generate([5], 30, eos_token_id=None)
    finally:
        StaticCall.run_uncaptured = original
    assert out.stats.early_emitted >= 10 and out.stats.rejected >= 2
    # a step input per step and the prefill's, and parked rows that enter a run alone (no block to join:
    # the flush at the end, 3 here); copying every entering block cost 70 more here
    assert copies.count <= out.stats.steps + 5


def test_a_probe_reads_what_its_run_computed():
    """A run that ends at an exit layer computes the probe in its own graph; the probe call answers from
    it for that very block's last row, and anything else runs the probe itself (and is counted)."""
    model = tiny_model("llama", dtype=torch.float32)
    static, _ = _pair(model)
    program, runner = static.program, static.program.runner
    state = program.kv_state(40, 1)
    top = program.step_inputs([[5]], 8, None, state)
    hidden = program.run_layers(0, 1, None, 1, None, top, state.views(9))
    token, conf = program.probe(1, hidden[:, -1:])
    assert runner.unfolded_probes == 0
    ref_token, ref_conf = runner.probes[1].fn(hidden[:, -1:])
    assert token.tolist() == ref_token.tolist() and torch.allclose(conf, ref_conf)
    tokens, confs = program.read_probe(1, hidden[:, -1:])  # the decoder's read: one packed read-back
    assert tokens == ref_token.reshape(-1).tolist() and confs == ref_conf.reshape(-1).tolist()
    assert isinstance(tokens[0], int) and runner.unfolded_probes == 0
    program.probe(1, hidden[:, -1:].clone())  # equal values, other memory: not the run's block
    program.read_probe(3, hidden[:, -1:])     # another layer's probe
    assert runner.unfolded_probes == 2


def test_a_run_makes_its_attention_mask_additive_once_not_per_layer():
    """SDPA converts a boolean mask to an additive one on every call; a run hands its layers the additive
    mask made once (gemma2's eager attention takes float masks already: nothing to do there)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    static, _ = _pair(tiny_model("llama", dtype=torch.float32))
    runner = static.program.runner
    assert runner.mask_outputs and all(zero.dtype == torch.float32 for zero, _ in runner.mask_outputs.values())
    runner.kv_state(40)
    with Ops() as ops:
        runner.book.calls[("run", 2, 2)].run_uncaptured()  # layers 2 and 3
    assert ops.names.count("where") == 1 and "scalar_tensor" not in ops.names
    gemma, _ = _pair(tiny_model("gemma2", dtype=torch.float64))
    assert not gemma.program.runner.mask_outputs


def test_static_call_outputs_are_its_buffers_and_the_next_call_overwrites_them():
    """On every device a call returns the same output buffers, as a replayed graph does, so a caller
    that keeps an output past the next call fails on the CPU too (parked blocks are copied for that)."""
    buffer = torch.zeros(3)

    def fn(x):
        buffer.add_(x)  # writes a tensor it closes over, as runs write the K/V buffers
        return (x * 2, buffer)

    call = StaticCall(fn, (torch.ones(3),), "cpu")
    first = call(torch.ones(3))
    kept = first[0].clone()
    second = call(torch.full((3,), 5.0))
    assert second[0] is first[0] and second[0].tolist() == [10.0] * 3 and kept.tolist() == [2.0] * 3
    assert second[1].tolist() == [6.0] * 3
    assert call.inputs[0].tolist() == [5.0] * 3


def test_parked_blocks_are_copies():
    model = tiny_model("llama", dtype=torch.float32)
    static, _ = _pair(model)
    state = static.program.kv_state(40, 1)
    block = torch.ones(1, 2, 4)
    state.park(1, block)
    block.zero_()
    assert state.take_parked(1).sum() == 8


@pytest.mark.slow
def test_smollm2_fp32_with_many_exits_and_rejections(smol):
    model, tokenizer = smol
    heads = ExitHeads.load(shipped_heads("smollm2-135m"), model)
    config = dict(exit_layers=(7, 14, 21), threshold=0.2, max_pending=3)
    static = AdaDecoder(model, heads, AdaDecodeConfig(backend="cudagraphs", **config))
    eager = AdaDecoder(model, heads, AdaDecodeConfig(**config))
    made = static.program.runner.made
    stats = smollm2_parity(tokenizer, static, eager, model)
    early, rejected = sum(s.early_emitted for s in stats), sum(s.rejected for s in stats)
    assert static.program.runner.made == made
    assert early >= 5 and rejected >= 1, (early, rejected)


# --- CUDA: captured graphs ------------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gpt_neox", "gemma4"])
def test_cuda_graphs_replay_the_eager_tokens_and_capture_only_at_warm_up(family):
    model = cuda_model(family)
    static, eager = _pair(model)
    runner = static.program.runner
    assert runner.made == _expected_calls(static)
    assert all(call.graph is not None for call in runner.book.calls.values()), "a static call was not captured"
    early = 0
    for prompt, new in (([5, 6, 7], 30), ([1], 8), (list(range(20, 45)), 30)):
        out = static.generate(prompt, new, eos_token_id=None)
        assert out.new_tokens == eager.generate(prompt, new, eos_token_id=None).new_tokens
        early += out.stats.early_emitted
    assert runner.made == _expected_calls(static), "captured again after warm-up"
    assert early > 10


@cuda
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cuda_compiled_segments_replay_the_eager_tokens(family):
    """Inductor's kernels captured in our graphs: fp32 tokens equal our eager path's, every static call
    captured, nothing compiled or captured after warm-up."""
    model = cuda_model(family)
    static, eager = _pair(model, compile_segments=True)
    runner = static.program.runner
    assert all(call.graph is not None for call in runner.book.calls.values()), "a static call was not captured"
    before = counters["stats"]["unique_graphs"]
    for prompt, new in (([5, 6, 7], 30), (list(range(20, 45)), 30)):
        out = static.generate(prompt, new, eos_token_id=None)
        assert out.new_tokens == eager.generate(prompt, new, eos_token_id=None).new_tokens
    assert runner.made == _expected_calls(static), "captured again after warm-up"
    assert counters["stats"]["unique_graphs"] == before, "recompiled after warm-up"


@cuda
def test_cuda_graphs_bf16_run_and_count():
    """bf16 on a GPU is bit-exact for nobody (cuBLAS picks kernels by row count): only that it runs,
    exits, and captures nothing after warm-up."""
    model = cuda_model("llama", torch.bfloat16)
    static, _ = _pair(model)
    made = static.program.runner.made
    out = static.generate(list(range(5, 25)), 40, eos_token_id=None)
    assert len(out.new_tokens) == 40 and out.stats.early_emitted > 0
    assert static.program.runner.made == made


@cuda
def test_cuda_a_graphs_outputs_survive_the_other_graphs_replays():
    """Graphs share one memory pool for their intermediates; outputs live outside it, so replaying every
    other graph leaves a graph's outputs as they were (the decoder keeps a run's block across the next
    run's replay)."""
    model = cuda_model("llama")
    static, _ = _pair(model)
    calls = list(static.program.runner.book.calls.values())
    for call in calls:
        call.graph.replay()
        kept = [o.clone() for o in call.outputs]
        for other in calls:
            if other is not call:
                other.graph.replay()
        torch.cuda.synchronize()
        for k, o in zip(kept, call.outputs):
            torch.testing.assert_close(o, k, rtol=0, atol=0, equal_nan=True)
