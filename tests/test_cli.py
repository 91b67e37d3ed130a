"""`adadecode generate` in-process, against a tiny Llama and a word-level tokenizer saved to disk."""
import json
import re

import pytest

from adadecode_fx import ExitHeads, cli
from adadecode_fx.heads import format as heads_format
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
                       "--exit-layers", "5")
    assert rc == 2 and out == ""
    assert "out of range" in err


def test_repetition_penalty_and_no_repeat_ngrams_give_hfs_text(model_dir, capsys):
    import torch

    rc, out, err = run(capsys, "--model", str(model_dir), "--dtype", "fp64", "--prompt", "w5 w17 w3 w99 w42 w8",
                       "--json", "--exit-layers", "1,2", "--threshold", "0.01", "--max-new-tokens", "20",
                       "--repetition-penalty", "1.5", "--no-repeat-ngram-size", "3")
    assert rc == 0, err
    data = json.loads(out)
    model, _ = models.load(str(model_dir), dtype="fp64")
    ids = torch.tensor([data["prompt_ids"]])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20, pad_token_id=0,
                         repetition_penalty=1.5, no_repeat_ngram_size=3)[0, ids.shape[1]:].tolist()
    assert data["generated_ids"] == ref != hf_greedy(model, data["prompt_ids"], 20)
    assert data["stats"]["early_emitted"] > 0
    # a batch: each row as HF's generate decodes it in the same left-padded batch. The penalty skips the
    # pads: the second row's output holds the pad id (0), which a penalty over its pad slots would demote
    prompts = ["w5 w17 w3 w99 w42 w8", "w1 w36"]
    rc, out, err = run(capsys, "--model", str(model_dir), "--dtype", "fp64", "--prompt", prompts[0], "--prompt",
                       prompts[1], "--json", "--exit-layers", "1,2", "--threshold", "0.01", "--max-new-tokens", "20",
                       "--repetition-penalty", "1.5", "--no-repeat-ngram-size", "3")
    assert rc == 0, err
    rows = json.loads(out)["prompt_ids"]
    ids = torch.tensor([[0] * (6 - len(r)) + r for r in rows])
    ref = model.generate(ids, attention_mask=(ids != 0).long(), do_sample=False, max_new_tokens=20, pad_token_id=0,
                         repetition_penalty=1.5, no_repeat_ngram_size=3)[:, 6:].tolist()
    assert json.loads(out)["generated_ids"] == ref and 0 in ref[1]
    for bad in (["--repetition-penalty", "0"], ["--no-repeat-ngram-size", "0"]):
        rc, out, err = run(capsys, "--model", str(model_dir), "--prompt", "w1 w2", *bad)
        assert rc == 2 and bad[0] in err and out == ""


@pytest.mark.slow
def test_stop_ends_each_row_where_hfs_stop_strings_end_it(capsys):
    """--stop on real SmolLM2 bf16 (HF's stop strings need a real tokenizer): one prompt, and a batch in
    which one row reaches the text and the other does not."""
    import torch
    from tests.conftest import smollm2

    model, tokenizer = smollm2("bfloat16")
    prompts = ["def fibonacci(n):", "The capital of France is"]
    kw = dict(do_sample=False, max_new_tokens=24, pad_token_id=0)
    ids = [tokenizer(p, return_tensors="pt").input_ids for p in prompts]
    full = [model.generate(x, attention_mask=torch.ones_like(x), **kw)[0, x.shape[1]:].tolist() for x in ids]
    stop = tokenizer.decode(full[0][10:12])
    assert stop.strip() and stop not in tokenizer.decode(full[1])
    ref = model.generate(ids[0], attention_mask=torch.ones_like(ids[0]), stop_strings=[stop], tokenizer=tokenizer,
                         **kw)[0, ids[0].shape[1]:].tolist()
    assert len(ref) < len(full[0])
    base = ["--model", "smollm2-135m", "--dtype", "bf16", "--json", "--max-new-tokens", "24", "--threshold", "0.3",
            "--stop", stop.replace("\\", "\\\\").replace("\n", "\\n")]
    rc, out, err = run(capsys, *base, "--prompt", prompts[0])
    assert rc == 0, err
    assert json.loads(out)["generated_ids"] == ref
    rc, out, err = run(capsys, *base, "--prompt", prompts[0], "--prompt", prompts[1])
    assert rc == 0, err
    assert json.loads(out)["generated_ids"] == [ref, full[1]]


def test_unknown_model(capsys):
    rc, out, err = run(capsys, "--model", "no-such-model", "--prompt", "hi")
    assert rc == 2 and "unknown model 'no-such-model'" in err


def test_version_names_the_package_torch_and_transformers(capsys):
    import torch
    import transformers

    import adadecode_fx

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert f"adadecode-fx {adadecode_fx.__version__}" in out and torch.__version__ in out
    assert transformers.__version__ in out


def test_python_dash_m_runs_the_command():
    import subprocess
    import sys

    import adadecode_fx

    run = subprocess.run([sys.executable, "-m", "adadecode_fx", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and f"adadecode-fx {adadecode_fx.__version__}" in run.stdout, run.stderr[-2000:]


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


# ----------------------------------------------------------------------- inputs that must fail cleanly


def assert_clean_failure(rc, out, err, *needles):
    """A non-zero exit with a short message that says what to do, and no traceback."""
    assert rc != 0 and out == ""
    assert "adadecode: error:" in err and "Traceback" not in err, err
    message = err[err.index("adadecode: error:"):]  # after HF's weight-loading bar, if any
    assert len(message.strip().splitlines()) <= 3, message
    for needle in needles:
        assert needle in message, (needle, message)


def test_chat_without_a_chat_template(model_dir, capsys):
    rc, out, err = run(capsys, "--model", str(model_dir), "--prompt", "w1 w2", "--chat", "--no-heads")
    assert_clean_failure(rc, out, err, "--chat needs a tokenizer with a chat template", "drop --chat")


@pytest.fixture
def nothing_slow(monkeypatch):
    """Loading a model or building a decoder is an error: the check must come first."""
    def fail(*a, **k):
        raise AssertionError("reached the slow part before checking the arguments")

    monkeypatch.setattr(models, "load", fail)
    import adadecode_fx.runtime as runtime
    monkeypatch.setattr(runtime, "AdaDecoder", fail)


@pytest.fixture
def no_decoder(monkeypatch):
    import adadecode_fx.runtime as runtime

    def fail(*a, **k):
        raise AssertionError("built a decoder before checking the prompt length")

    monkeypatch.setattr(runtime, "AdaDecoder", fail)


@pytest.mark.parametrize("argv,needle", [
    (("--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
    (("--threshold", "1.5"), "threshold must be in (0, 1]"),
    (("--max-pending", "-1"), "max_pending"),
    (("--dtype", "int8"), "unknown dtype"),
    (("--device", "tpu"), "unknown device 'tpu'"),
    (("--temperature", "0.5"), "--do-sample"),
    (("--do-sample", "--top-p", "2"), "top_p"),
    (("--stream", "--json"), "--stream"),
    (("--stop", ""), "--stop is empty"),
])
def test_cheap_arguments_are_checked_before_loading(nothing_slow, capsys, argv, needle):
    assert_clean_failure(*run(capsys, "--prompt", "w1", *argv), needle)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the error for a machine without CUDA")
def test_tensorrt_without_cuda_before_loading(nothing_slow, capsys):
    assert_clean_failure(*run(capsys, "--prompt", "w1", "--backend", "tensorrt"), "needs a CUDA GPU")
    assert_clean_failure(*run(capsys, "--prompt", "w1", "--device", "cuda"), "no CUDA GPU is visible")


def test_bench_checks_device_and_lengths_before_loading(nothing_slow, capsys):
    for argv, needle in ((("--device", "tpu"), "unknown device 'tpu'"), (("--max-new-tokens", "0"), "--max-new-tokens"),
                         (("--backends", "tvm"), "unknown backends/methods ['tvm']")):
        rc = cli.main(["bench", *argv])
        out, err = capsys.readouterr()
        assert_clean_failure(rc, out, err, needle)


def test_outputs_that_cannot_be_written_are_refused_before_loading(nothing_slow, tmp_path, capsys):
    """A report or a heads folder found unwritable only at the end would cost the whole run."""
    from adadecode_fx.heads import shipped_heads

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for argv, needle in ((("bench", "--json", str(a_file / "r.json")), "--json"),
                         (("bench", "--plot", str(a_file / "r.png")), "--plot"),
                         (("bench", "--json", str(tmp_path)), "is a directory"),
                         (("eval-heads", "--heads", str(shipped_heads("smollm2-135m")), "--data", "mbpp", "--json",
                           str(a_file / "r.json")), "--json"),
                         (("train-heads", "--data", "mbpp", "--out", str(a_file)), "is a file"),
                         (("train-heads", "--data", "mbpp", "--out", str(a_file / "sub")), "cannot write"),
                         (("export", "--out", str(a_file / "sub")), "cannot write")):
        rc = cli.main(list(argv))
        out, err = capsys.readouterr()
        assert_clean_failure(rc, out, err, needle)


def test_dir_without_weights(model_dir, tmp_path, capsys):
    import shutil

    for f in model_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, tmp_path / f.name)
    assert_clean_failure(*run(capsys, "--model", str(tmp_path), "--prompt", "w1"), "no weights",
                         "save_pretrained")


def test_encoder_decoder_dir(tmp_path, capsys):
    import transformers as tf

    tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                              decoder_start_token_id=0)).save_pretrained(tmp_path)
    assert_clean_failure(*run(capsys, "--model", str(tmp_path), "--prompt", "hi"), "encoder-decoder",
                         "T5ForConditionalGeneration")


def test_masked_lm_dir_without_tokenizer(tmp_path, capsys):
    import transformers as tf

    cfg = tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    tf.BertForMaskedLM(cfg).save_pretrained(tmp_path)
    assert_clean_failure(*run(capsys, "--model", str(tmp_path), "--prompt", "hi"), "BertForMaskedLM",
                         "not a causal language model")
    # the same encoder saved from its causal class, but without is_decoder: attention still looks ahead
    tf.BertLMHeadModel(cfg).save_pretrained(tmp_path)
    assert_clean_failure(*run(capsys, "--model", str(tmp_path), "--prompt", "hi"), "is_decoder")


def test_lengths_beyond_the_models_positions(model_dir, no_decoder, capsys):
    # the tiny Llama has max_position_embeddings = 256
    assert_clean_failure(*run(capsys, "--model", str(model_dir), "--prompt", "w1 w2",
                              "--max-new-tokens", "1000000000"), "max_position_embeddings", "at most 254")
    long_prompt = " ".join(f"w{i % 100}" for i in range(250))
    assert_clean_failure(*run(capsys, "--model", str(model_dir), "--prompt", long_prompt,
                              "--max-new-tokens", "8"), "250 tokens", "258 positions", "at most 6")
    assert_clean_failure(*run(capsys, "--model", str(model_dir), "--prompt", long_prompt + " " + long_prompt),
                         "500 tokens", "shorten the prompt")


def test_broken_heads_json(model_dir, tmp_path, capsys):
    from adadecode_fx import ExitHeads

    model, _ = models.load(str(model_dir), dtype="fp64")
    ExitHeads.identity(model, [1, 2]).save(tmp_path)
    (tmp_path / "heads.json").write_text("{ not json")
    assert_clean_failure(*run(capsys, "--model", str(model_dir), "--dtype", "fp64", "--heads", str(tmp_path),
                              "--prompt", "w1"), "heads.json is not valid JSON")


def test_fp32_heads_serve_the_fp16_model(model_dir, tmp_path, capsys):
    from adadecode_fx import ExitHeads

    model, _ = models.load(str(model_dir), dtype="fp32")
    ExitHeads.identity(model, [1, 2]).save(tmp_path)
    rc, out, err = run(capsys, "--model", str(model_dir), "--dtype", "fp16", "--heads", str(tmp_path),
                       "--prompt", "w5 w6 w7", "--max-new-tokens", "4", "--json")
    assert rc == 0, err
    assert json.loads(out)["config"]["dtype"] == "float16" and len(json.loads(out)["generated_ids"]) == 4


# ----------------------------------------------------------------------- help, options, what is printed


def test_help_shows_defaults_and_explains_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("(default: 64)", "(default: 5)", "(default: eager)", "--max-pending", "wait for verification",
                   "--do-sample", "--temperature", "--top-p", "--top-k", "--seed", "--device",
                   "a batch when --prompt is repeated"):
        assert needle in text, needle
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-warmup skip the untimed warm-up" in text and "--no-progress no progress bar" in text


def test_sampling_options_and_device(model_dir, capsys):
    common = ("--model", str(model_dir), "--dtype", "fp64", "--prompt", "w5 w17 w3", "--max-new-tokens", "10",
              "--exit-layers", "1,2", "--threshold", "0.01", "--json", "--device", "cpu", "--do-sample")
    runs = [json.loads(run(capsys, *common, *extra)[1])["generated_ids"]
            for extra in (("--seed", "3", "--temperature", "2.0"), ("--top-k", "1"))]
    assert len(runs[0]) == 10
    model, _ = models.load(str(model_dir), dtype="fp64")
    assert runs[1] == hf_greedy(model, [5, 17, 3], 10)  # top-k 1 is greedy: the options reach the sampler


def test_full_depth_summary_and_one_time_notices(model_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("ADADECODE_CAPTURE_CACHE", str(tmp_path / "first"))
    args = ("--model", str(model_dir), "--dtype", "fp64", "--prompt", "w1 w2", "--no-heads")
    rc, out, err = run(capsys, *args, "--max-new-tokens", "6")
    assert rc == 0
    # every token (the prompt pass's first one too) ran all 5 layers
    assert "0% early" not in err and "5.0 of 5 layers per token" in err
    assert "capturing LlamaForCausalLM with torch.export" in err and str(tmp_path / "first") in err
    rc, out2, err = run(capsys, *args, "--max-new-tokens", "6")
    assert rc == 0 and out2 == out and "capturing" not in err  # the next process reads the cached capture
    monkeypatch.setenv("ADADECODE_CAPTURE_CACHE", str(tmp_path / "second"))
    monkeypatch.setenv("ADADECODE_QUIET", "1")
    rc, out, err = run(capsys, *args, "--max-new-tokens", "2")
    assert rc == 0 and "capturing" not in err


def test_a_local_copy_of_a_zoo_model_gets_its_shipped_heads(model_dir, capsys, monkeypatch, tmp_path):
    # the CLI finds shipped heads by zoo name, else by the checkpoint's fingerprint, as the API does
    args = ("--model", str(model_dir), "--dtype", "fp64", "--prompt", "w1 w2", "--max-new-tokens", "6")
    monkeypatch.setattr(heads_format, "SHIPPED", tmp_path / "shipped")
    rc, _, err = run(capsys, *args)
    assert rc == 0 and "no exit heads ship for this model" in err and "5.0 of 5 layers per token" in err
    heads = ExitHeads.random(models.load(str(model_dir), dtype="fp64")[0], (1, 2), seed=3)
    heads.metadata.update(recommended_exit_layers=[1, 2], recommended_threshold=0.01)
    heads.save(tmp_path / "shipped" / "tiny-llama")
    rc, _, err = run(capsys, *args)
    assert rc == 0 and "no exit heads ship" not in err and "0 accepted / 0 rejected" not in err, err


def test_bench_accepts_its_default_methods_and_full_depth():
    import argparse

    from adadecode_fx.bench import command

    p = argparse.ArgumentParser()
    command.add_arguments(p)
    for argv in ([], ["--methods", "hf_greedy,full_depth", "--backends", "eager"]):
        command._check_args(p.parse_args(argv), ())  # raises AdaDecodeError on a name it does not know


def test_bench_chat_needs_a_chat_template(model_dir, tmp_path, capsys):
    # the tiny tokenizer has none: --chat must refuse, not benchmark raw prompts labelled as chat
    rc = cli.main(["bench", "--model", str(model_dir), "--task", "gsm8k", "--n", "2", "--chat", "--backends", "eager",
                   "--max-new-tokens", "2", "--json", str(tmp_path / "b.json")])
    out, err = capsys.readouterr()
    assert_clean_failure(rc, out, err, "chat template")
    assert not (tmp_path / "b.json").exists()


def test_bench_json_and_figure_say_where_they_come_from(model_dir, tmp_path, capsys):
    j, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = cli.main(["bench", "--model", str(model_dir), "--task", "humaneval", "--n", "1", "--max-new-tokens", "3",
                   "--methods", "hf_greedy", "--backends", "eager", "--no-progress", "--json", str(j),
                   "--plot", str(png)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rep = json.loads(j.read_text())
    assert rep["commit"] and rep["command"].startswith("adadecode bench --model ")
    assert {"cpu", "torch", "transformers"} <= set(rep["machine"]) and png.stat().st_size > 5000
    from adadecode_fx.bench.report import _provenance
    footer = _provenance(rep)
    assert rep["commit"] in footer and "--n 1" in footer and rep["machine"]["torch"] in footer
    gpu_rep = {**rep, "machine": {**rep["machine"], "device": "cuda", "gpu": "NVIDIA H200"}}
    assert _provenance(gpu_rep).startswith("NVIDIA H200 (cuda), host ")  # a GPU figure names its GPU
