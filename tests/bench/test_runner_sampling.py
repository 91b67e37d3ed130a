"""`adadecode bench --do-sample` on a tiny random Llama: every method samples with the same warpers from the
same seed and the baseline is HF sampling. The program at full depth draws HF's very tokens from that seed;
AdaDecode with exits draws its own way, and its parity is reported as not measured rather than as a match."""
import argparse

import pytest
import torch

from adadecode_fx import AdaDecodeError, ExitHeads
from adadecode_fx.bench import BenchConfig, run_bench
from adadecode_fx.bench.batch import batch_table
from adadecode_fx.bench.report import plot, summary_table
from adadecode_fx.bench.command import _sampling
from adadecode_fx.bench.runner import check_sampling
from tests.conftest import hf_greedy, tiny_model

T = 12
SAMPLING = {"temperature": 2.0, "top_p": 0.95}  # no top_k: HF's default of 50 must not creep into HF's runs


@pytest.fixture(scope="module")
def report():
    model = tiny_model("llama")
    heads = ExitHeads.random(model, [1, 2], scale=0.5, seed=4)
    prompts = [{"id": "a", "input_ids": list(range(3, 15))}, {"id": "b", "input_ids": list(range(40, 49))}]
    cfg = BenchConfig(max_new_tokens=T, methods=("hf_greedy", "full_depth"), backends=("eager",),
                      threshold={1: 0.005, 2: 0.01}, max_pending=3, sampling=SAMPLING, sampling_seed=7)
    return model, heads, prompts, run_bench(model, heads, prompts, cfg, progress=False, log=lambda m: None)


def test_every_method_samples_from_the_same_seed_and_parity_is_not_claimed(report):
    model, _, prompts, rep = report
    assert rep["baseline"] == "hf_sample" and rep["methods"][0] == "hf_sample"
    assert set(rep["methods"]) == {"hf_sample", "adadecode_eager", "adadecode_eager_full_depth"}
    assert rep["config"]["sampling"] == SAMPLING and "sampled tokens" in rep["config"]["length_scheme"]
    assert rep["oracle_bound"] == {"skipped": "sampling: the oracle bound replays greedy sequences"}
    for i, (p, row) in enumerate(zip(prompts, rep["per_prompt"])):
        assert row["sampling_seed"] == 7 + i
        # the baseline is HF's own sampling with these warpers from that seed
        torch.manual_seed(7 + i)
        ids = torch.tensor([p["input_ids"]])
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=T,
                            pad_token_id=0, top_k=0, **SAMPLING)
        assert row["reference_ids"] == hf[0, ids.shape[1]:].tolist()
        for name, entry in row["methods"].items():
            assert entry["new_tokens"] == T and len(entry["ids"]) == T and "recheck" not in entry, name
        assert row["methods"]["adadecode_eager"]["identical"] is None
    # one draw per token from the same distribution and seed: the program at full depth samples HF's tokens
    pm = rep["per_method"]
    assert pm["hf_sample"]["parity"] == pm["adadecode_eager_full_depth"]["parity"] == 1.0
    assert pm["adadecode_eager"]["parity"] is None and pm["adadecode_eager"]["info"]["own_draws"]
    # sampled, not greedy: at temperature 2 some prompt leaves the greedy path in each method
    for name in rep["methods"]:
        assert any(row["methods"][name]["ids"] != hf_greedy(model, p["input_ids"], T)
                   for p, row in zip(prompts, rep["per_prompt"])), name
    ada = rep["per_method"]["adadecode_eager"]
    assert ada["early_emitted"] > 0 and ada["accepted"] + ada["rejected"] > 0  # exits drafted and judged
    assert rep["per_method"]["adadecode_eager_full_depth"]["early_emitted"] == 0
    assert rep["heads_gain"]["eager"]["n"] == 2
    table = summary_table(rep)
    row = next(ln for ln in table.splitlines() if ln.startswith("| adadecode_eager |"))
    assert "| n/a |" in row
    row = next(ln for ln in table.splitlines() if ln.startswith("| adadecode_eager_full_depth |"))
    assert "| 100% (2/2) |" in row


def test_an_adadecode_run_repeats_from_its_seed(report):
    """The runner's seeding is what makes a sampled run repeatable: the same seed, the same tokens."""
    model, heads, prompts, rep = report
    from adadecode_fx.bench.methods import adadecode_method

    m, _ = adadecode_method(model, heads, "eager", {1: 0.005, 2: 0.01}, (1, 2), 3, T, sampling=SAMPLING)
    ids = torch.tensor([prompts[1]["input_ids"]])
    torch.manual_seed(8)
    assert m.run(ids)[0] == rep["per_prompt"][1]["methods"]["adadecode_eager"]["ids"]


def test_bad_sampling_settings_are_refused_before_anything_loads():
    with pytest.raises(AdaDecodeError, match="temperature must be a positive number"):
        check_sampling({"temperature": 0.0})
    with pytest.raises(AdaDecodeError, match="unknown sampling settings"):
        check_sampling({"typical_p": 0.9})
    args = argparse.Namespace(do_sample=False, temperature=None, top_k=None, top_p=0.9, min_p=None)
    with pytest.raises(AdaDecodeError, match="--top-p only applies when sampling: add --do-sample"):
        _sampling(args)
    args.do_sample = True
    assert _sampling(args) == {"top_p": 0.9}


def test_cli_parses_the_sampling_flags():
    from adadecode_fx import cli

    args = cli.build_parser().parse_args(["bench", "--do-sample", "--temperature", "0.7", "--top-p", "0.8",
                                          "--top-k", "20", "--sampling-seed", "3"])
    assert _sampling(args) == {"temperature": 0.7, "top_k": 20, "top_p": 0.8} and args.sampling_seed == 3


def test_batch_sizes_sample_against_hfs_batched_sampling(monkeypatch, tmp_path):
    """With --batch-sizes every method samples a batch with the same warpers from the same seed per group;
    a batch draws its rows together, so no row is compared with the row alone (parity n/a)."""
    from adadecode_fx.runtime import AdaDecoder

    model = tiny_model("llama")
    heads = ExitHeads.random(model, [1, 2], scale=0.5, seed=4)
    prompts = [{"id": c, "input_ids": list(range(3 + 7 * i, 12 + i + 7 * i))} for i, c in enumerate("abcd")]
    seen = []
    hf_generate, ada_generate = type(model).generate, AdaDecoder.generate

    def hf_spy(self, *args, generation_config=None, **kwargs):
        seen.append(("hf", len(args[0]), generation_config.do_sample, generation_config.top_p, torch.initial_seed()))
        return hf_generate(self, *args, generation_config=generation_config, **kwargs)

    def ada_spy(self, prompts, **kwargs):
        seen.append(("ada", len(prompts), kwargs.get("do_sample"), kwargs.get("top_p"), torch.initial_seed()))
        return ada_generate(self, prompts, **kwargs)
    monkeypatch.setattr(type(model), "generate", hf_spy)
    monkeypatch.setattr(AdaDecoder, "generate", ada_spy)
    cfg = BenchConfig(max_new_tokens=T, methods=("hf_greedy",), backends=("eager",), threshold={1: 0.005, 2: 0.01},
                      max_pending=3, sampling=SAMPLING, sampling_seed=7, batch_sizes=(2,), oracle=False)
    rep = run_bench(model, heads, prompts, cfg, progress=False, log=lambda m: None)
    batching = rep["batching"]
    assert batching["baseline"] == "hf_sample" and batching["sampling"] == SAMPLING
    for B in ("1", "2"):
        for name, entry in batching["per_batch"][B].items():
            assert entry["parity"] is None and entry["tok_s_median"] > 0, (B, name)
        assert batching["per_batch"][B]["adadecode_eager"]["early_exit_rate"] > 0
    batched = [s for s in seen if s[1] == 2][-4:]  # the timed calls of B = 2 (after the warm-up): 2 groups
    assert all(s[2] and s[3] == 0.95 for s in batched)  # HF and AdaDecode both sample, with these warpers
    assert sorted(s[:1] + s[4:] for s in batched) == [("ada", 7), ("ada", 8), ("hf", 7), ("hf", 8)]
    table = batch_table(batching)
    assert "vs hf_sample, same batch" in table and "| 2 | adadecode_eager |" in table and "n/a" in table
    plot(rep, tmp_path / "bench.png")  # the figure's batch panel too
    assert (tmp_path / "bench.png").stat().st_size > 0
