"""`train-heads --corpus`: text read teacher-forced in fixed windows; each way a corpus can be unusable
fails with one clear message before anything is written; a tiny corpus run trains, records its data and
resumes without the corpus files."""
import gzip
import json

import pytest
import torch

from adadecode_fx import ExitHeads
from adadecode_fx.errors import AdaDecodeError
from adadecode_fx.heads.corpus import TEXT_FIELDS, corpus_files, read_corpus
from adadecode_fx.heads.training import TrainConfig, train_heads
from tests.conftest import save_tiny_model_dir, tiny_model

V = 128  # the tiny model's vocabulary; the word tokenizer maps "w<i>" to i


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(save_tiny_model_dir(tmp_path_factory.mktemp("tok")))


def words(n, start=0):
    return " ".join(f"w{(start + i) % (V - 1)}" for i in range(n))


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read(specs, tok, budget=40, window=8, vocab=V):
    return read_corpus([str(s) for s in specs], tok, vocab, budget, window, progress=False)


def test_windows_are_fixed_length_and_recorded(tmp_path, tok):
    (tmp_path / "a.py").write_text(words(30))
    jsonl(tmp_path / "b.jsonl", [{"question": words(12, 40)}, {"text": words(10, 80), "question": "ignored"},
                                 {"content": "   "}])
    c = read([tmp_path], tok, budget=41, window=8)
    assert len(c.windows) == 6 and all(len(w) == 8 for w in c.windows)  # ceil(41 / 8) whole windows
    r = c.record
    assert r["tokens"] == 48 and r["tokens_requested"] == 41 and r["window"] == 8 and r["files_matched"] == 2
    assert r["text_fields"] == {"(whole file)": 1, "question": 1, "text": 1}
    assert len(r["ids_sha256"]) == 64 and r["specs"] == [str(tmp_path)]
    # the same seed reads the same windows; the text is tokenized, not taken as bytes
    assert read([tmp_path], tok, budget=41, window=8).windows == c.windows
    assert {i for w in c.windows for i in w} <= set(range(V - 1))


def test_python_sources_of_this_interpreter(tok):
    files = corpus_files(["python-stdlib"])
    assert len(files) > 100 and all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    c = read(["python-stdlib"], tok, budget=64, window=32)
    assert len(c.windows) == 2 and c.record["files_used"] >= 1


def test_missing_path_and_empty_glob(tmp_path, tok):
    with pytest.raises(AdaDecodeError, match="no such file or directory"):
        read([tmp_path / "nope.jsonl"], tok)
    with pytest.raises(AdaDecodeError, match="the glob matches no files"):
        read([str(tmp_path / "**" / "*.nothing")], tok)


def test_binary_and_empty_files_are_skipped_and_counted(tmp_path, tok):
    (tmp_path / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02" * 50)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 20)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(AdaDecodeError, match=r"no usable text in 4 file\(s\) \(2 binary or not UTF-8 and 2 empty"):
        read([tmp_path], tok)
    (tmp_path / "good.txt").write_text(words(50))
    c = read([tmp_path], tok)
    assert c.record["skipped_binary"] + c.record["skipped_empty"] == c.record["files_read"] - 1


def test_too_few_tokens_says_how_many_there_are(tmp_path, tok):
    (tmp_path / "a.txt").write_text(words(21))
    with pytest.raises(AdaDecodeError, match=r"holds 21 tokens \(2 whole windows of 8\).*fewer than "
                                             r"--corpus-tokens 100: lower --corpus-tokens to at most 16"):
        read([tmp_path / "a.txt"], tok, budget=100)


def test_jsonl_without_a_text_field(tmp_path, tok):
    path = jsonl(tmp_path / "c.jsonl", [{"text": words(5)}, {"body": "x", "id": 3}])
    with pytest.raises(AdaDecodeError) as e:
        read([path], tok)
    msg = str(e.value)
    assert f"{path}:2" in msg and "['body', 'id']" in msg and all(f in msg for f in TEXT_FIELDS)


def test_corpus_for_another_tokenizer(tmp_path, tok):
    path = jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 50_000, 6]}])
    with pytest.raises(AdaDecodeError, match=r"ids.jsonl:2: token id 50000 is outside this model's vocabulary "
                                             r"\(0..127\): this corpus was tokenized for another tokenizer"):
        read([path], tok)
    # a tokenizer whose ids the model does not have: text tokenized for another model
    (tmp_path / "t.txt").write_text(words(40, 60))
    with pytest.raises(AdaDecodeError, match="this tokenizer belongs to another model"):
        read([tmp_path / "t.txt"], tok, vocab=64)


def test_bad_corpus_writes_nothing(tmp_path, capsys):
    from adadecode_fx import cli

    model_dir = save_tiny_model_dir(tmp_path / "model")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.so").write_bytes(b"\x00" * 64)
    jsonl(tmp_path / "few.jsonl", [{"text": words(10)}])
    capsys.readouterr()  # the model folder's own progress output
    cases = {str(tmp_path / "missing" / "*.py"): "the glob matches no files",
             str(tmp_path / "bin"): "no usable text",
             str(tmp_path / "few.jsonl"): "holds 10 tokens"}
    for i, (spec, expected) in enumerate(cases.items()):
        out = tmp_path / f"out{i}"
        rc = cli.main(["train-heads", "--model", str(model_dir), "--corpus", spec, "--corpus-tokens", "64",
                       "--corpus-window", "16", "--layers", "1", "--out", str(out)])
        _, err = capsys.readouterr()
        last = err.strip().splitlines()[-1]  # above it only progress bars (loading weights, reading the corpus)
        assert rc == 2 and last.startswith("adadecode: error: --corpus") and expected in last, err
        assert "Traceback" not in err
        assert not out.exists()
    rc = cli.main(["train-heads", "--model", str(model_dir), "--layers", "1", "--out", str(tmp_path / "o")])
    assert rc == 2 and "--corpus" in capsys.readouterr().err


def test_tiny_corpus_run_trains_records_and_resumes(tmp_path):
    model = tiny_model("llama", seed=3, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    corpus = jsonl(tmp_path / "ids.jsonl", [{"input_ids": torch.randint(0, V, (40,), generator=g).tolist()}
                                            for _ in range(8)])
    prompts = [torch.randint(1, V, (6,), generator=g).tolist() for _ in range(3)]
    cfg = dict(layers=(1, 2), gen_tokens=6, batch_tokens=32, shortlist=32, corpus=(str(corpus),),
               corpus_tokens=150, corpus_window=16)
    out = tmp_path / "heads"
    first = train_heads(model, None, prompts, TrainConfig(epochs=1, **cfg), out, progress=False)
    data = first.metadata["training_data"]
    assert data["corpus"]["tokens"] == 160 and data["corpus"]["windows"] == 10
    assert data["corpus"]["text_fields"] == {"input_ids": 8} and data["corpus"]["specs"] == [str(corpus)]
    assert data["continuations"]["sequences"] == 3 and data["continuations"]["tokens"] == 3 * (6 + 6)
    assert first.metadata["tokens"] == 160 + 36 and list(first.metadata["train"]["corpus"]) == [str(corpus)]
    assert json.loads((out / "heads.json").read_text())["metadata"]["training_data"] == data
    # resume: the windows come from the saved state, so the corpus file is not needed any more
    corpus.unlink()
    second = train_heads(model, None, prompts, TrainConfig(epochs=2, **cfg), out, progress=False)
    assert second.metadata["steps"] == 2 * first.metadata["steps"]
    assert second.metadata["training_data"] == data
    # another corpus in the same --out is another run
    with pytest.raises(AdaDecodeError, match="belongs to another run"):
        train_heads(model, None, prompts, TrainConfig(epochs=2, **{**cfg, "corpus_tokens": 64}), out, progress=False)
    ExitHeads.load(out, model)


def test_gzipped_jsonl_and_the_help_names_the_fields(tmp_path, tok):
    from adadecode_fx import cli

    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(gzip.compress(json.dumps({"document": words(20)}).encode()))
    assert read([path], tok, budget=16).record["text_fields"] == {"document": 1}
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    text = " ".join(sub.choices["train-heads"].format_help().split())
    assert all(f"'{f}'" in text for f in TEXT_FIELDS) and "--corpus-tokens" in text and "python-stdlib" in text


def test_cli_trains_on_prompts_and_corpus_then_eval_heads_reports_over_full_depth(tmp_path, capsys):
    from adadecode_fx import cli

    model_dir = save_tiny_model_dir(tmp_path / "model")
    prompts = jsonl(tmp_path / "prompts.jsonl", [{"prompt": words(6, 7 * i)} for i in range(6)])
    more = jsonl(tmp_path / "more.jsonl", [{"prompt": words(5, 5 * i)} for i in range(4)])
    corpus = jsonl(tmp_path / "corpus.jsonl", [{"text": words(30, 3 * i)} for i in range(10)])
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text(words(200, 11))
    heads = tmp_path / "heads"
    rc = cli.main(["train-heads", "--model", str(model_dir), "--data", str(prompts), "--data", str(more),
                   "--max-prompts", "2", "--gen-tokens", "6", "--corpus", str(corpus), "--corpus", str(tmp_path / "src" / "*.py"),
                   "--corpus-tokens", "300", "--corpus-window", "32", "--layers", "1,2", "--epochs", "1",
                   "--batch-tokens", "64", "--shortlist", "16", "--out", str(heads)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    from adadecode_fx import ExitHeads

    assert len(ExitHeads.load(heads).vocab) == 16  # the probe's vocabulary, as --shortlist asked
    assert "320 from the corpus" in out and "[train-heads] corpus: 320 tokens in 10 windows of 32" in err
    meta = json.loads((heads / "heads.json").read_text())["metadata"]
    assert meta["training_data"]["corpus"]["files_matched"] == 2 and meta["train"]["corpus_window"] == 32
    assert meta["training_data"]["continuations"]["sequences"] == 4  # --max-prompts from each --data source
    assert meta["train"]["data"] == f"{prompts},{more}" and len(meta["train"]["record_ids"]) == 4

    rc = cli.main(["eval-heads", "--model", str(model_dir), "--heads", str(heads), "--data", str(prompts),
                   "--data", str(more), "--n", "1", "--max-new-tokens", "6", "--json", str(tmp_path / "eval.json")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert len(json.loads((tmp_path / "eval.json").read_text())["record_ids"]) == 2
    assert "over the same program at full depth" in out
    assert "full depth" in json.loads((tmp_path / "eval.json").read_text())["bound_over"]


def test_a_chat_source_without_a_chat_template_is_refused_before_anything_is_written(tmp_path, capsys):
    from adadecode_fx import cli

    model_dir = save_tiny_model_dir(tmp_path / "model")  # its tokenizer has no chat template
    prompts = jsonl(tmp_path / "prompts.jsonl", [{"prompt": words(6, 7 * i)} for i in range(4)])
    rc = cli.main(["train-heads", "--model", str(model_dir), "--data", f"{prompts}:chat", "--layers", "1",
                   "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc != 0 and "chat template" in err and "drop ':chat'" in err
    assert not (tmp_path / "o").exists()


def test_a_budget_beyond_free_memory_is_refused_up_front(tmp_path, monkeypatch):
    import psutil

    model = tiny_model("llama", seed=3, dtype=torch.float32)
    corpus = jsonl(tmp_path / "ids.jsonl", [{"input_ids": list(range(100))}])
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("vm", (), {"available": 10_000})())
    out = tmp_path / "heads"
    cfg = TrainConfig(layers=(1, 2), corpus=(str(corpus),), corpus_tokens=96, corpus_window=16)
    with pytest.raises(AdaDecodeError, match=r"~96 tokens keeps ~0.0 GiB of hidden states \(3 layers x 32"):
        train_heads(model, None, [], cfg, out, progress=False)
    assert not out.exists()
