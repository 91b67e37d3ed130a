"""eval-heads' replayed schedule predicts the runtime exactly, and its report is well formed."""
import pytest

from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
from adadecode_fx.heads.evaluation import (_replayed, _sweep, free_exits, head_records, oracle_layers_per_token,
                                          report, simulate)
from tests.conftest import hf_greedy, tiny_model


@pytest.mark.parametrize("threshold", [0.02, 0.022, 0.025, (0.025, 0.02, 0.022), (0.02, 0.03, 0.021)])
@pytest.mark.parametrize("layers", [(0, 2), (0, 2, 4)], ids=["early", "early+last"])
def test_simulated_schedule_matches_runtime(threshold, layers):
    # exact when no step runs on a wrong early token's context, i.e. max_pending=1 (with more pending
    # tokens the steps after a wrong one see other activations than the records; see simulate())
    max_pending = 1
    if isinstance(threshold, tuple):  # one gamma per exit layer
        threshold = dict(zip(layers, threshold))
    model = tiny_model("llama")
    heads = ExitHeads.random(model, layers, scale=0.5, seed=4)
    dec = AdaDecoder(model, heads, AdaDecodeConfig(threshold=threshold, max_pending=max_pending))
    prompt, n = list(range(3, 20)), 40
    cont = hf_greedy(model, prompt, n)
    rec = head_records(dec.program, heads, [prompt + cont], [len(prompt)])[0]
    probed = {l: rec["conf"][l] for l in heads.layers}, {l: rec["agree"][l] for l in heads.layers}
    sim = simulate(*probed, model.config.num_hidden_layers, threshold, max_pending)
    out = dec.generate(prompt, max_new_tokens=n).stats
    assert out.early_emitted > 3 and out.rejected > 0 and out.accepted > 0  # the case is not trivial
    assert (sim.tokens, sim.early, sim.accepted, sim.rejected, sim.critical_layers) == \
        (out.new_tokens, out.early_emitted, out.accepted, out.rejected, out.critical_path_layers)
    # rows beside the critical one: all rows of decode steps (layer_rows) less their critical path (the
    # critical path counts the prompt pass as one full-depth row; layer_rows leaves the prompt pass out)
    L = model.config.num_hidden_layers
    assert sim.deferred_rows > 0
    assert sim.deferred_rows == out.layer_rows - (out.critical_path_layers - L)
    # every step that does not end at an exit probe ends at the LM head; so does the prompt pass
    assert sim.epilogue_calls == 1 + out.steps - out.early_emitted


def test_report_and_oracle_bound():
    agree = {1: [True, False, False, True], 3: [True, True, False, True]}
    assert oracle_layers_per_token(agree, 6) == (2 + 4 + 6 + 2) / 4
    recs = [{"conf": {1: [0.9, 0.6, 0.2, 0.99], 3: [0.9, 0.8, 0.1, 0.95]}, "agree": agree}]
    rep = report(recs, 6, probe_cost=0.1, max_pending=3)
    assert rep["recommended_gamma"] in [r["gamma"] for r in rep["per_gamma"]]
    assert rep["per_layer"]["1"]["agreement"] == 0.5
    row = next(r for r in rep["per_gamma"] if r["gamma"] == 0.95)
    assert row["probes_per_token"] > 0 and row["speedup_bound"] > 0
    assert row["modelled_gain"] == row["speedup_bound"]  # row cost 0: deferred rows are free
    costly = report(recs, 6, probe_cost=0.1, max_pending=3, row_cost=0.5)
    row, row2 = (next(r for r in rp["per_gamma"] if r["gamma"] == 0.5) for rp in (rep, costly))
    assert row2["deferred_rows_per_token"] > 0 and row2["modelled_gain"] < row2["speedup_bound"] == row["speedup_bound"]
    assert costly["recommended"]["modelled_gain"] == max(r["modelled_gain"] for r in costly["per_subset"])
    # right, confident heads: three early tokens share each LM-head call, which pays more the more it costs
    sure = [{"conf": {1: [0.99] * 12, 3: [0.99] * 12}, "agree": {1: [True] * 12, 3: [True] * 12}}]
    cheap, dear = (report(sure, 6, probe_cost=0.1, max_pending=3, row_cost=0.2, epilogue_cost=e) for e in (0.0, 5.0))
    row3, row4 = (next(r for r in rp["per_gamma"] if r["gamma"] == 0.95) for rp in (cheap, dear))
    assert row3["epilogue_calls_per_token"] == row4["epilogue_calls_per_token"] == 4 / 12  # prefill + 3 verifications
    assert row4["modelled_gain"] > row3["modelled_gain"]


def test_measured_costs_are_positive_and_in_layers():
    from adadecode_fx.heads.evaluation import measure_costs

    model = tiny_model("llama")
    heads = ExitHeads.random(model, [1, 2], seed=0)
    for exits in ((2,), (model.config.num_hidden_layers - 1,)):  # not the heads' first layer; the last layer
        dec = AdaDecoder(model, heads, AdaDecodeConfig(exit_layers=exits, threshold=0.5))
        costs = measure_costs(dec.program, heads)
        assert set(costs) == {"probe_cost", "row_cost", "epilogue_cost"}
        # a block row is cheap on a tiny model, and timing noise on busy cores can hide it: >= 0 then
        assert 0 < costs["probe_cost"] < 20 and 0 < costs["epilogue_cost"] < 20 and 0 <= costs["row_cost"] < 20, costs


def test_eval_heads_cli_reports_the_measured_costs_and_modelled_gain(tmp_path, capsys):
    import json

    from adadecode_fx import cli
    from tests.conftest import save_tiny_model_dir

    save_tiny_model_dir(tmp_path / "m")
    ExitHeads.random(tiny_model("llama"), [1, 2], seed=0).save(tmp_path / "heads")
    rc = cli.main(["eval-heads", "--model", str(tmp_path / "m"), "--heads", str(tmp_path / "heads"), "--data",
                   "humaneval", "--n", "2", "--max-new-tokens", "8", "--dtype", "fp64", "--json", str(tmp_path / "r.json")])
    rep = json.loads((tmp_path / "r.json").read_text())
    out = capsys.readouterr().out
    assert rc == 0 and "modelled gain" in out and "with free probes and deferred rows" in out
    assert rep["probe_cost_layers"] > 0 and rep["epilogue_cost_layers"] > 0 and rep["row_cost_layers"] >= 0
    assert rep["recommended"]["modelled_gain"] == max(r["modelled_gain"] for r in rep["per_subset"])
    assert rep["free_exits"]["modelled_gain"] >= rep["recommended"]["modelled_gain"]


def test_report_finds_one_gamma_per_layer_when_that_pays():
    # layer 1 is right exactly when its confidence is 0.7 (wrong at 0.65); layer 3 right at 0.99, wrong
    # at 0.9: no single gamma takes the first without the second's mistakes
    n = 60
    c1 = [0.7 if t % 2 else 0.65 for t in range(n)]
    c3 = [0.99 if t % 3 else 0.9 for t in range(n)]
    recs = [{"conf": {1: c1, 3: c3}, "agree": {1: [t % 2 == 1 for t in range(n)], 3: [t % 3 != 0 for t in range(n)]}}]
    rep = report(recs, 6, probe_cost=0.1, max_pending=3, row_cost=0.1, epilogue_cost=2.0)
    both = next(r for r in rep["per_subset"] if r["layers"] == [1, 3])
    assert both["gamma"] == {"1": 0.7, "3": 0.95}  # JSON keys; 0.95 is the first grid value above 0.9
    single = max(r["modelled_gain"] for r in _sweep(recs, [1, 3], 6, (0.1, 0.1, 2.0), 3))
    assert both["modelled_gain"] > single
    assert rep["recommended"]["modelled_gain"] >= both["modelled_gain"]
    # what --set-threshold stores resolves to the same per-layer thresholds
    from adadecode_fx.heads.format import ExitHeads as Heads

    heads = Heads.identity(tiny_model("llama"), [1, 3])
    heads.metadata.update(recommended_threshold=both["gamma"], recommended_exit_layers=[1, 3])
    assert AdaDecodeConfig().resolve(heads, 5).threshold == {1: 0.7, 3: 0.95}


def test_perfect_confidence_separates_the_exit_decision_from_the_heads():
    # a head right on every other token but equally confident on all of them: no gamma tells them apart,
    # a perfect decision would take exactly the right half
    n = 40
    recs = [{"conf": {1: [0.9] * n}, "agree": {1: [t % 2 == 0 for t in range(n)]}}]
    rep = report(recs, 6, probe_cost=0.1, max_pending=3, row_cost=0.1, epilogue_cost=2.0)
    pc = rep["perfect_confidence"]
    assert pc["exit_layers"] == [1] and pc["modelled_gain"] > max(r["modelled_gain"] for r in rep["per_subset"])
    assert 0.4 < pc["early_exit_rate"] <= 0.5


def test_free_exits_is_the_recommended_configuration_with_free_probes_and_rows():
    # a head right on two tokens of three, confident on all: costly probes and rows eat part of its gain
    n = 60
    recs = [{"conf": {1: [0.9] * n, 3: [0.95] * n}, "agree": {1: [t % 3 != 0 for t in range(n)], 3: [True] * n}}]
    rep = report(recs, 6, probe_cost=0.5, max_pending=3, row_cost=0.3, epilogue_cost=2.0)
    rec, free = rep["recommended"], rep["free_exits"]
    assert free["exit_layers"] == rec["exit_layers"] and free["gamma"] == rec["gamma"]
    assert free["modelled_gain"] > rec["modelled_gain"]
    gamma = rec["gamma"]
    gamma = {int(l): g for l, g in gamma.items()} if isinstance(gamma, dict) else gamma
    assert free["modelled_gain"] == pytest.approx(
        _replayed(recs, rec["exit_layers"], 6, (0.0, 0.0, 2.0), 3, gamma)["modelled_gain"])
    # a per-layer gamma as heads.json stores it (string keys) means the same as integer keys
    assert free_exits(recs, [1, 3], {"1": 0.9, "3": 0.9}, 6, 2.0, 3) == free_exits(recs, [1, 3], {1: 0.9, 3: 0.9}, 6, 2.0, 3)


def test_calibration_over_several_sources_serves_the_worst_one():
    # source "a" (four prompts) is always right at confidence 0.7; source "b" is wrong whenever its head
    # says 0.75. Pooled tokens pick gamma <= 0.7, which makes b slower than full depth; the worst-source
    # choice takes 0.8, where b gains and a loses only its probes
    n = 60
    a = [{"conf": {1: [0.7] * n}, "agree": {1: [True] * n}, "source": "a"} for _ in range(4)]
    b = [{"conf": {1: [0.99 if t % 3 == 0 else 0.75 for t in range(n)]}, "agree": {1: [t % 3 == 0 for t in range(n)]},
          "source": "b"}]
    kw = dict(probe_cost=0.1, max_pending=3, row_cost=0.1, epilogue_cost=2.0)
    pooled = report([{k: v for k, v in r.items() if k != "source"} for r in a + b], 6, **kw)
    assert pooled["recommended"]["gamma"] <= 0.7 and pooled["recommended"]["per_source"] is None
    rep = report(a + b, 6, **kw)
    rec = rep["recommended"]
    assert rec["gamma"] == 0.8 and set(rec["per_source"]) == {"a", "b"}
    low = next(r for r in rep["per_gamma"] if r["gamma"] == 0.7)
    assert low["per_source"]["b"] < 1 < rec["per_source"]["b"]
    assert min(rec["per_source"].values()) == max(r["worst_source_gain"] for r in rep["per_gamma"])
    assert rep["per_layer"]["1"]["per_source"] == {"a": 1.0, "b": pytest.approx(1 / 3)}
