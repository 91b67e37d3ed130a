"""Heads that are always wrong or always right: output unchanged, stats exactly as the schedule implies."""
import pytest

from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
from tests.conftest import hf_greedy, tiny_model


def scripted_decoder(model, layers, reference, wrong, **cfg):
    """A decoder whose exit probe guesses the reference token (oracle) or a wrong one (adversary),
    always confident: plugged in through the probe seam."""
    vocab = model.config.vocab_size

    def probe(layer, hidden_last, rows):
        right = reference[len(rows[0])]
        return [(right + 1) % vocab if wrong else right], [1.0]

    return AdaDecoder(model, ExitHeads.identity(model, layers), AdaDecodeConfig(**cfg), probe=probe)


def expected_schedule(new_tokens: int, max_pending: int):
    """(early tokens, full-depth tokens, flush at the end?) when every exit is taken and every early
    token is right."""
    made, early, final, flush = 1, 0, 1, False  # prefill makes the first token at full depth
    while made < new_tokens:
        e = min(max_pending, new_tokens - made)
        early, made = early + e, made + e
        if made < new_tokens:
            final, made = final + 1, made + 1
        else:
            flush = e > 0  # the last tokens were early: their deferred layers run once more to verify
    return early, final, flush


@pytest.mark.parametrize("max_pending", [1, 3, 5])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_oracle_heads(family, max_pending):
    model = tiny_model(family)
    prompt, n = list(range(5, 25)), 33
    ref = hf_greedy(model, prompt, n)
    dec = scripted_decoder(model, [1, 3], prompt + ref, wrong=False, threshold=0.75, max_pending=max_pending)
    out = dec.generate(prompt, max_new_tokens=n)
    assert out.new_tokens == ref
    early, final, flush = expected_schedule(n, max_pending)
    s = out.stats
    L = model.config.num_hidden_layers
    assert (s.accepted, s.rejected, s.early_emitted) == (early, 0, early)
    assert s.exit_histogram() == {1: early, L - 1: final}
    # critical path: an early token runs 2 layers (exit after layer 1), a full-depth token L (the
    # prefill's first token too), the final flush the L - 2 deferred layers; deferred rows add nothing
    assert s.critical_path_layers == 2 * early + L * final + (L - 2) * flush


@pytest.mark.parametrize("max_pending", [0, 1, 4])
@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_adversarial_heads(family, max_pending):
    model = tiny_model(family)
    prompt, n = list(range(7, 19)), 21
    ref = hf_greedy(model, prompt, n)
    dec = scripted_decoder(model, [0, 2], prompt + ref, wrong=True, threshold=0.75, max_pending=max_pending)
    out = dec.generate(prompt, max_new_tokens=n)
    assert out.new_tokens == ref
    s = out.stats
    L = model.config.num_hidden_layers
    assert s.accepted == 0
    assert s.exit_histogram() == {L - 1: n}
    # every verification after an early exit finds the first early token wrong: one rollback per token
    assert s.rejected == (n - 1 if max_pending else 0)
    expected_early = sum(min(max_pending, n - g) for g in range(1, n)) if max_pending else 0
    assert s.early_emitted == expected_early


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_drafts_after_the_last_layer_wait_behind_deep_exits(family):
    """A probe after the last layer is not asked while a token that skipped layers waits: verifying
    now beats drafting one more token on a context that may be rolled back. Early tokens here are all
    right, so the replayed schedule (`simulate`) must equal the runtime's, LM-head calls included."""
    from adadecode_fx.heads.evaluation import simulate

    model = tiny_model(family)
    L = model.config.num_hidden_layers
    prompt, n = list(range(5, 25)), 30
    ref = hf_greedy(model, prompt, n)
    P, calls = len(prompt), []
    conf = {1: [float(t % 3 == 0) for t in range(n)], L - 1: [1.0] * n}

    def probe(layer, hidden_last, rows):
        t = len(rows[0]) - P
        calls.append((layer, t, conf[layer][t]))
        return [ref[t]], [conf[layer][t]]

    heads = ExitHeads.identity(model, [1])
    dec = AdaDecoder(model, heads, AdaDecodeConfig(exit_layers=(1, L - 1), threshold=0.5, max_pending=4), probe=probe)
    epilogues = []
    real = dec.program.epilogue
    dec.program.epilogue = lambda hidden: epilogues.append(hidden.shape[1]) or real(hidden)
    out = dec.generate(prompt, max_new_tokens=n)
    assert out.new_tokens == ref
    after_deep_exit = [b for a, b in zip(calls, calls[1:]) if a[0] == 1 and a[2] == 1.0]
    assert after_deep_exit and all(layer == 1 for layer, _, _ in after_deep_exit)  # its next pass verifies
    assert any(layer == L - 1 and c == 1.0 for layer, _, c in calls)  # drafts after the last layer do happen
    sim = simulate(conf, {l: [True] * n for l in conf}, L, 0.5, max_pending=4)
    s = out.stats
    assert (sim.early, sim.accepted, sim.critical_layers) == (s.early_emitted, s.accepted, s.critical_path_layers)
    assert sim.epilogue_calls == len(epilogues)
