"""`adadecode generate` in-process, against a tiny Llama and a word-level tokenizer saved to disk."""
import json
import re

import pytest

from adadecode_fx import cli
from adadecode_fx.zoo import models
from tests.conftest import hf_greedy, save_tiny_model_dir, tiny_model

VOCAB = 128  # tokenizer vocab == model vocab: every generated id decodes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    assert tiny_model("llama").config.vocab_size == VOCAB
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


def run(capsys, *argv):
    rc = cli.main(["generate", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_json_matches_hf_greedy(model_dir, capsys):
    prompt = "w5 w17 w3 w99 w42 w8"
    rc, out, err = run(capsys, "--model", str(model_dir), "--dtype", "fp64", "--prompt", prompt, "--json",
                       "--exit-layers", "1,2", "--threshold", "0.01", "--max-new-tokens", "12")
    assert rc == 0, err
    data = json.loads(out)
    assert {"prompt", "prompt_ids", "generated_ids", "text", "stats"} <= set(data)
    assert data["prompt"] == prompt
    assert data["prompt_ids"] == [5, 17, 3, 99, 42, 8]
    assert data["config"]["exit_layers"] == [1, 2] and data["config"]["threshold"] == 0.01

    model, tokenizer = models.load(str(model_dir), dtype="fp64")
    assert model.generation_config.eos_token_id is None  # so both run the full 12 tokens
    expected = hf_greedy(model, data["prompt_ids"], 12)
    assert data["generated_ids"] == expected
    assert data["text"] == tokenizer.decode(expected, skip_special_tokens=True)

    stats = data["stats"]
    assert stats["new_tokens"] == 12 and stats["prompt_tokens"] == 6
    assert len(stats["token_exit_layers"]) == 12
    # with gamma = 0.01 the untrained heads exit almost always: early tokens were made and checked
    assert stats["early_emitted"] > 0
    assert stats["early_emitted"] >= stats["accepted"] + stats["rejected"] > 0
    assert set(stats["exit_histogram"]) <= {"1", "2", "4"}


def test_repeated_prompt_decodes_a_batch(model_dir, capsys):
    prompts = ["w5 w17 w3 w99 w42 w8", "w60 w61"]
    rc, out, err = run(capsys, "--model", str(model_dir), "--dtype", "fp64", "--prompt", prompts[0], "--prompt",
                       prompts[1], "--json", "--exit-layers", "1,2", "--threshold", "0.01", "--max-new-tokens", "9")
    assert rc == 0, err
    data = json.loads(out)
    model, _ = models.load(str(model_dir), dtype="fp64")
    assert data["prompt_ids"] == [[5, 17, 3, 99, 42, 8], [60, 61]]
    assert data["generated_ids"] == [hf_greedy(model, ids, 9) for ids in data["prompt_ids"]]
    assert data["stats"]["batch_size"] == 2 and data["stats"]["new_tokens"] == 18
    rc, out, err = run(capsys, "--model", str(model_dir), "--prompt", "w1", "--prompt", "w2", "--stream")
    assert rc != 0 and "--stream" in err


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(model_dir, capsys, prompt):
    rc, out, err = run(capsys, "--model", str(model_dir), "--prompt", prompt)
    assert rc == 2 and out == ""
    assert "adadecode: error:" in err and "--prompt is empty" in err


def test_threshold_out_of_range(model_dir, capsys):
    rc, out, err = run(capsys, "--model", str(model_dir), "--dtype", "fp64", "--prompt", "w1 w2",
                       "--threshold", "2")
    assert rc == 2 and out == ""
    assert "threshold must be in (0, 1]" in err and "Traceback" not in err


def test_exit_layer_out_of_range(model_dir, capsys):
    rc, out, err = run(capsys, "--model", str(model_dir), "--dtype", "fp64", "--prompt", "w1 w2",
                       "--exit-layers", "4")
    assert rc == 2 and out == ""
    assert "out of range" in err


def test_unknown_model(capsys):
    rc, out, err = run(capsys, "--model", "no-such-model", "--prompt", "hi")
    assert rc == 2 and "unknown model 'no-such-model'" in err


def test_missing_prompt_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--model", "x"])
    assert e.value.code == 2


def test_malformed_exit_layers(model_dir, capsys):
    rc, out, err = run(capsys, "--model", str(model_dir), "--dtype", "fp64", "--prompt", "w1 w2",
                       "--exit-layers", "1,a")
    assert rc == 2 and "exit-layers" in err


def test_stream_prints_the_same_text_as_it_is_verified(model_dir, capsys):
    prompt = "w5 w17 w3 w99 w42 w8"
    common = ("--model", str(model_dir), "--dtype", "fp64", "--prompt", prompt, "--exit-layers", "1,2",
              "--threshold", "0.01", "--max-new-tokens", "12")
    rc, out, _ = run(capsys, *common, "--json")
    assert rc == 0
    rc, streamed, err = run(capsys, *common, "--stream")
    assert rc == 0
    assert int(re.search(r"(\d+) rejected", err).group(1)) > 0  # rollbacks happened while streaming
    assert streamed.split() == prompt.split() + json.loads(out)["text"].split()
    rc, _, err = run(capsys, *common, "--stream", "--json")
    assert rc != 0 and "cannot be combined with --json" in err
