"""Long generations with constant rollbacks keep memory flat: K/V buffers are allocated once and the
parked (deferred) rows never exceed the pending-token bound."""

from adadecode_fx.runtime import kv_state
from tests.conftest import hf_greedy, tiny_model
from tests.runtime.test_oracle_adversarial import scripted_decoder


def test_rollbacks_do_not_grow_state(monkeypatch):
    model = tiny_model("qwen2")
    prompt, n, max_pending = list(range(4, 30)), 200, 4
    ref = hf_greedy(model, prompt, n)
    seen = {"states": 0, "max_parked": 0, "buffers": set()}
    real_init, real_park = kv_state.KVState.__init__, kv_state.KVState.park

    def init(self, *a, **k):
        real_init(self, *a, **k)
        seen["states"] += 1
        seen["buffers"] = {t.data_ptr() for kv in self.buffers for t in kv}

    def park(self, layer, hidden):
        real_park(self, layer, hidden)
        seen["max_parked"] = max(seen["max_parked"], sum(h.shape[1] for h in self.parked.values()))
        assert {t.data_ptr() for kv in self.buffers for t in kv} == seen["buffers"]  # never reallocated

    monkeypatch.setattr(kv_state.KVState, "__init__", init)
    monkeypatch.setattr(kv_state.KVState, "park", park)
    dec = scripted_decoder(model, [0, 2], prompt + ref, wrong=True, threshold=0.75, max_pending=max_pending)
    out = dec.generate(prompt, max_new_tokens=n)
    assert out.new_tokens == ref
    assert out.stats.rejected == n - 1  # a rollback for every token
    assert seen["states"] == 1
    assert 0 < seen["max_parked"] <= max_pending
