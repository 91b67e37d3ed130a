"""`adadecode bench` on a tiny random Llama: report fields, parity computed from token ids, the PNG."""
import copy
import json

import pytest

from adadecode_fx import ExitHeads
from adadecode_fx.bench import BenchConfig, run_bench
from adadecode_fx.bench.methods import Method
from adadecode_fx.bench.report import heads_gain_lines, summary_table, write
from tests.conftest import hf_greedy, tiny_model

T = 10


def corrupted(model):
    """HF greedy with the last token changed: must break parity, or parity is not checking ids."""
    def run(ids):
        toks = hf_greedy(model, ids[0].tolist(), T)
        toks[-1] = (toks[-1] + 1) % model.config.vocab_size
        return toks, None
    return Method("corrupted_greedy", run, {"note": "test only"})


@pytest.fixture(scope="module")
def report():
    model = tiny_model("llama")
    heads = ExitHeads.random(model, [1, 2], scale=0.5, seed=4)
    prompts = [{"id": "a", "input_ids": list(range(3, 15))}, {"id": "b", "input_ids": list(range(40, 49))}]
    cfg = BenchConfig(max_new_tokens=T, methods=("hf_greedy", "hf_prompt_lookup", "hf_early_exit", "full_depth"),
                      backends=("eager", "no_such_backend"), threshold={1: 0.02, 2: 0.03}, max_pending=3,
                      batch_sizes=(2,))  # one gamma per exit layer: full depth must still build without heads
    return model, run_bench(model, heads, prompts, cfg, extra_methods=(corrupted(model),), progress=False,
                            log=lambda m: None)


def test_report_fields_and_parity(report, tmp_path):
    model, rep = report
    assert rep["methods"][0] == "hf_greedy"
    assert {"hf_prompt_lookup", "hf_early_exit", "adadecode_eager", "adadecode_eager_full_depth",
            "corrupted_greedy"} <= set(rep["methods"])
    assert "adadecode_no_such_backend" in rep["skipped"]  # a backend that cannot be built is recorded
    assert "adadecode_no_such_backend_full_depth" in rep["skipped"]
    pm = rep["per_method"]
    for name in rep["methods"]:
        m = pm[name]
        for key in ("tok_s_median", "speedup_median", "speedup_p25", "speedup_p75", "parity", "n", "peak_mem_mb",
                    "exit_rate_per_layer", "acceptance_rate", "critical_path_per_token"):
            assert key in m, (name, key)
        assert m["n"] == 2 and m["new_tokens_total"] == 2 * T  # honest length: every method makes T tokens
        assert m["tok_s_median"] > 0
    assert pm["hf_greedy"]["parity"] == 1.0 and pm["hf_greedy"]["speedup_median"] == pytest.approx(1.0)
    assert pm["corrupted_greedy"]["parity"] == 0.0  # parity compares ids, so it can fail
    row = rep["per_prompt"][0]["methods"]["corrupted_greedy"]
    assert row["identical"] is False and row["first_diff"] == T - 1
    assert row["recheck"] == {"method_repeats": True, "reference_repeats": True, "first_diff_again": T - 1}
    assert "recheck" not in rep["per_prompt"][0]["methods"]["adadecode_eager"]  # identical: nothing to recheck
    # fp64 tiny model: AdaDecode and the HF baselines are exact greedy
    for name in ("adadecode_eager", "adadecode_eager_full_depth", "hf_prompt_lookup", "hf_early_exit"):
        assert pm[name]["parity"] == 1.0, name
    ada = pm["adadecode_eager"]
    assert ada["early_emitted"] > 0 and 0 <= ada["acceptance_rate"] <= 1
    assert sum(ada["exit_rate_per_layer"].values()) == pytest.approx(1.0)
    assert set(ada["exit_rate_per_layer"]) <= {"1", "2", str(model.config.num_hidden_layers - 1)}
    assert ada["critical_path_per_token"] > 0  # random heads: rollbacks can push it above the depth
    assert pm["hf_greedy"]["critical_path_per_token"] == model.config.num_hidden_layers

    # the same program without heads: no exits, every token through all layers
    full = pm["adadecode_eager_full_depth"]
    L = model.config.num_hidden_layers
    assert full["early_emitted"] == 0
    assert full["critical_path_per_token"] == pytest.approx(L)  # the prefill's token counts at full depth too
    assert full["exit_rate_per_layer"] == {str(L - 1): 1.0}
    assert full["info"]["config"]["exit_layers"] == [] and full["info"]["config"]["backend"] == "eager"
    gain = rep["heads_gain"]
    assert set(gain) == {"eager"}  # the backend that was skipped has no gain
    g = gain["eager"]
    assert g["method"] == "adadecode_eager" and g["full_depth"] == "adadecode_eager_full_depth" and g["n"] == 2
    ratios = [p["methods"]["adadecode_eager"]["tok_s"] / p["methods"]["adadecode_eager_full_depth"]["tok_s"]
              for p in rep["per_prompt"]]
    assert [p["methods"]["adadecode_eager"]["heads_gain"] for p in rep["per_prompt"]] == pytest.approx(ratios)
    assert g["median"] == pytest.approx(sum(ratios) / 2) and g["p25"] <= g["median"] <= g["p75"]
    # interleaved: the full-depth run takes a different slot in each prompt's rotated order
    slots = [p["order"].index("adadecode_eager_full_depth") for p in rep["per_prompt"]]
    assert slots[0] != slots[1]
    # reference ids are HF greedy's own
    assert rep["per_prompt"][1]["reference_ids"] == hf_greedy(model, list(range(40, 49)), T)
    ob = rep["oracle_bound"]
    assert ob["oracle_speedup_bound"] >= 1.0 and ob["replayed"]["exit_layers"] == [1, 2]
    assert ob["costs_error"] is None and ob["epilogue_cost_layers"] > 0 and ob["replayed"]["modelled_gain"] > 0
    assert ob["replayed"]["modelled_gain_free_exits"] >= ob["replayed"]["modelled_gain"]
    assert any("free probes and deferred rows" in ln for ln in heads_gain_lines(rep))
    # rotated order per prompt
    assert rep["per_prompt"][0]["order"] != rep["per_prompt"][1]["order"]

    # batched throughput: rows compared with their unbatched HF greedy output
    batching = rep["batching"]
    assert batching["batch_sizes"] == [1, 2] and set(batching["per_batch"]) == {"1", "2"}
    for entry in batching["per_batch"].values():
        assert set(entry) == {"hf_greedy", "adadecode_eager"}
        assert entry["adadecode_eager"]["parity"] == 1.0 and entry["hf_greedy"]["parity"] == 1.0
        assert entry["adadecode_eager"]["tok_s_median"] > 0 and "early_exit_rate" in entry["adadecode_eager"]
    assert batching["per_batch"]["2"]["hf_greedy"]["rows"] == 2

    j, png = tmp_path / "r.json", tmp_path / "r.png"
    write(rep, j, png)
    assert json.loads(j.read_text())["per_method"]["corrupted_greedy"]["parity"] == 0.0
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    table = summary_table(rep)
    assert "corrupted_greedy" in table and "heads gain over full depth" in table
    row = next(ln for ln in table.splitlines() if ln.startswith("| adadecode_eager |"))
    assert f"{g['median']:.2f}x [{g['p25']:.2f}, {g['p75']:.2f}]" in row
    assert all(ln.count("|") == table.splitlines()[0].count("|") for ln in table.splitlines())
    assert json.loads(j.read_text())["heads_gain"]["eager"]["median"] == pytest.approx(g["median"])


def test_cli_bench_parser():
    from adadecode_fx import cli

    args = cli.build_parser().parse_args(["bench", "--model", "x", "--task", "gsm8k", "--n", "3",
                                          "--backends", "eager", "--json", "o.json", "--plot", "o.png"])
    assert args.func.__name__ == "_bench" and args.backends == "eager" and args.n == 3
    assert "full_depth" in args.methods.split(",")  # measured by default: heads_gain needs it


def test_cudagraphs_inductor_is_cudagraphs_with_inductors_kernels(report):
    """``--backends cudagraphs_inductor``: what a GPU user would pick, the static graphs with fused kernels
    (its compile is tested in tests/lower/test_cudagraphs.py; built here, not run)."""
    from adadecode_fx.bench.command import _check_args
    from adadecode_fx.bench.methods import adadecode_method
    from adadecode_fx import cli

    model, _ = report
    heads = ExitHeads.random(model, [1, 2], scale=0.5, seed=4)
    for full in (False, True):
        m, dec = adadecode_method(model, heads, "cudagraphs_inductor", 0.5, (1, 2), 3, T, full_depth=full)
        assert m.name == "adadecode_cudagraphs_inductor" + ("_full_depth" if full else "")
        assert (dec.config.backend, dec.config.compile_segments) == ("cudagraphs", True)
        assert dec.config.exit_layers == (() if full else (1, 2))
    argv = ["bench", "--backends", "cudagraphs_inductor,cudagraphs", "--device", "cpu"]
    _check_args(cli.build_parser().parse_args(argv), ())


def test_honest_length_past_the_models_eos():
    """A model whose own EOS comes up early still decodes exactly T tokens in every method: transformers 5
    fills a ``None`` eos_token_id from the model's generation config, so the bench must disable it
    explicitly (a short reference made every AdaDecode run look divergent one token past EOS)."""
    model = copy.deepcopy(tiny_model("llama"))
    prompt = list(range(3, 15))
    free = hf_greedy(model, prompt, T)
    model.generation_config.eos_token_id = free[2]
    heads = ExitHeads.random(model, [1, 2], scale=0.5, seed=4)
    cfg = BenchConfig(max_new_tokens=T, methods=("hf_greedy", "hf_prompt_lookup", "hf_early_exit"),
                      backends=("eager",), threshold=0.02, max_pending=3, oracle=False)
    rep = run_bench(model, heads, [{"id": "a", "input_ids": prompt}], cfg, progress=False, log=lambda m: None)
    row = rep["per_prompt"][0]
    assert row["reference_ids"] == free and row["eos_at"] == 2
    for name, entry in row["methods"].items():
        assert entry["new_tokens"] == T and entry["identical"], name


def test_ctrl_c_reports_the_prompts_measured_so_far():
    """An interrupted benchmark keeps what it measured: the prompts finished before Ctrl-C, marked as such."""
    model = tiny_model("llama")
    prompts = [{"id": c, "input_ids": list(range(3 + i, 12 + i))} for i, c in enumerate("abc")]
    stop_at = []  # first token of the prompt whose run is interrupted

    def run(ids):
        if ids[0, 0].item() in stop_at:
            raise KeyboardInterrupt
        return hf_greedy(model, ids[0].tolist(), T), None
    cfg = BenchConfig(max_new_tokens=T, methods=("hf_greedy",), backends=("eager",), batch_sizes=(2,))
    bench = dict(extra_methods=(Method("interrupting", run),), progress=False, log=lambda m: None)
    stop_at.append(4)
    rep = run_bench(model, None, prompts, cfg, **bench)
    assert rep["interrupted"] == {"prompts_measured": 1, "prompts_asked": 3}
    assert [r["id"] for r in rep["per_prompt"]] == ["a"] and rep["batching"] is None
    assert rep["per_method"]["hf_greedy"]["n"] == rep["per_method"]["interrupting"]["n"] == 1
    stop_at[:] = [3]  # the first prompt interrupts: nothing measured, nothing to report
    with pytest.raises(KeyboardInterrupt):
        run_bench(model, None, prompts, cfg, **bench)


def test_a_checkpoints_generation_defaults_reach_no_method():
    """A checkpoint's generation_config.json may set processors (Qwen2.5-Coder-Instruct's sets a repetition
    penalty and top-k). HF's generate fills every unset field from it, so the HF methods would apply them and
    AdaDecode would not: the bench runs every method with the same explicit settings only."""
    model = copy.deepcopy(tiny_model("llama"))
    prompt = list(range(3, 15))
    plain = hf_greedy(model, prompt, T)
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.repetition_penalty = 1.5
    assert hf_greedy(model, prompt, T) != plain  # the checkpoint's settings do change HF's greedy tokens
    heads = ExitHeads.random(model, [1, 2], scale=0.5, seed=4)
    cfg = BenchConfig(max_new_tokens=T, methods=("hf_greedy", "hf_prompt_lookup", "full_depth"),
                      backends=("eager",), threshold=0.02, max_pending=3, oracle=False, batch_sizes=(1,))
    rep = run_bench(model, heads, [{"id": "a", "input_ids": prompt}], cfg, progress=False, log=lambda m: None)
    row = rep["per_prompt"][0]
    assert row["reference_ids"] == plain
    assert all(entry["identical"] for entry in row["methods"].values()), row["methods"]
    # the batched HF run too: its rows are the reference there, which AdaDecode matches
    assert all(e["parity"] == 1.0 for e in rep["batching"]["per_batch"]["1"].values())
    assert model.generation_config.no_repeat_ngram_size == 1  # the model's own config is left as it was
