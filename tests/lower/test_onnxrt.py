"""ONNX Runtime backend: export (present K/V), parity with eager AdaDecode, manifest errors, CLI export."""
import json
import shutil
import sys

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from adadecode_fx import AdaDecodeConfig, AdaDecodeError, AdaDecoder, ExitHeads, MissingPackageError  # noqa: E402
from adadecode_fx.export import export_onnx  # noqa: E402
from adadecode_fx.lower import onnxrt  # noqa: E402
from adadecode_fx.runtime.kv_state import KVState  # noqa: E402
from tests.conftest import hf_greedy, tiny_model  # noqa: E402

EXITS = [1, 2]
PROMPTS = [[7], list(range(3, 12)), [int(x) for x in torch.randint(1, 128, (30,), generator=torch.Generator().manual_seed(3))]]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_heads(tiny):
    return ExitHeads.random(tiny, EXITS, scale=3.0, seed=0)


@pytest.fixture(scope="module")
def tiny_config():
    # gamma ~ 0: every allowed probe exits, and these noisy heads are mostly wrong -> exits AND rejections;
    # one gamma per exit layer, which the export's manifest must carry back
    return AdaDecodeConfig(threshold={1: 1e-6, 2: 2e-6}, max_pending=3)


@pytest.fixture(scope="module")
def tiny_export(tiny, tiny_heads, tiny_config, tmp_path_factory):
    return export_onnx(tiny, tiny_heads, tiny_config, tmp_path_factory.mktemp("onnx") / "tiny")


# ---- (a) structure: the exported layer returns its present K/V ----------------------------------------
def test_present_kv_rewrite_is_out_of_place(tiny, tiny_heads, tiny_config):
    gm = AdaDecoder(tiny, tiny_heads, tiny_config).gm
    layer, info = onnxrt.present_kv_layer(gm.layer_0)
    targets = {n.target for n in layer.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.index_copy_.default in {n.target for n in gm.layer_0.graph.nodes}
    assert torch.ops.aten.index_copy_.default not in targets
    assert torch.ops.aten.index_copy.default in targets
    outs = next(n for n in layer.graph.nodes if n.op == "output").args[0]
    assert len(outs) == 3  # hidden, K rows, V rows
    assert sorted(k["kind"] for k in info["kv"]) == [0, 1]
    assert [n.name for n in layer.graph.nodes if n.op == "placeholder"][-1] == "kv_len"
    gm.layer_0.graph.lint()  # the original segment is untouched
    assert torch.ops.aten.index_copy_.default in {n.target for n in gm.layer_0.graph.nodes}


def test_exported_layer_graph_returns_present_kv(tiny_export):
    import onnx

    manifest = json.loads((tiny_export / "manifest.json").read_text())
    for i in range(manifest["num_layers"]):
        model = onnx.load(str(tiny_export / f"layer_{i}.onnx"), load_external_data=False)
        outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
        inputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.input}
        assert list(outputs) == ["hidden_out", "present_key", "present_value"]
        assert outputs["present_key"][0] == 1 and isinstance(outputs["present_key"][2], str)  # [1, H, T, D]
        assert isinstance(inputs["past_key"][2], str) and isinstance(inputs["kv_len"][0], str)  # dynamic C, S
        assert manifest["segments"][f"layer_{i}"]["outputs"] == list(outputs)
    assert manifest["cloned_segments"] >= manifest["num_layers"] - 1  # identical layers: one export, clones
    assert (tiny_export / "heads" / "heads.safetensors").exists()


@pytest.mark.parametrize("start,n,capacity,bucket", [(0, 1, 9, 1), (4, 3, 11, 1), (5, 1, 16, 8), (0, 6, 6, 1)])
def test_ort_layer_updates_kv_views_like_fx(tiny, tiny_heads, tiny_config, tiny_export, start, n, capacity, bucket):
    eager = AdaDecoder(tiny, tiny_heads, tiny_config).program
    ort = onnxrt.load_program(tiny_export)
    results = []
    for prog in (eager, ort):
        torch.manual_seed(0)
        state = KVState(eager.kv_shapes, capacity, torch.float32, "cpu", bucket)
        for k, v in state.buffers:
            k.normal_(), v.normal_()
        kv = state.views(start + n)
        top = prog.top_inputs(list(range(5, 5 + n)), start, kv)
        pro = prog.prologue(top)
        hidden = prog.embeddings(pro, n)
        for i in range(prog.num_layers):
            hidden = prog.layer(i, hidden, pro, top, kv)
        results.append((prog.epilogue(hidden), [t.clone() for kvs in state.buffers for t in kvs]))
    (la, ba), (lb, bb) = results
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)
    for a, b in zip(ba, bb):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


# ---- (b) greedy parity --------------------------------------------------------------------------------
def test_tiny_parity_exported_vs_eager(tiny, tiny_heads, tiny_config, tiny_export):
    eager = AdaDecoder(tiny, tiny_heads, tiny_config)
    exported = onnxrt.load_exported(tiny_export)
    assert exported.model is None and exported.config.threshold == tiny_config.threshold
    totals = {"early": 0, "rejected": 0, "accepted": 0}
    for prompt in PROMPTS:
        ref = eager.generate(prompt, max_new_tokens=24)
        out = exported.generate(prompt, max_new_tokens=24)
        assert out.new_tokens == ref.new_tokens
        assert ref.new_tokens == hf_greedy(tiny, prompt, 24)
        totals["early"] += out.stats.early_emitted
        totals["rejected"] += out.stats.rejected
        totals["accepted"] += out.stats.accepted
    assert totals["early"] > 10 and totals["rejected"] > 0 and totals["accepted"] > 0, totals


def test_tiny_parity_backend_onnxruntime(tiny, tiny_heads):
    config = AdaDecodeConfig(threshold=1e-6, max_pending=2, kv_bucket=8, backend="onnxruntime")
    dec = AdaDecoder(tiny, tiny_heads, config)
    assert isinstance(dec.program.layer_fns[0], onnxrt.OrtLayer)
    eager = AdaDecoder(tiny, tiny_heads, AdaDecodeConfig(threshold=1e-6, max_pending=2, kv_bucket=8))
    for prompt in PROMPTS[1:]:
        out, ref = dec.generate(prompt, max_new_tokens=20), eager.generate(prompt, max_new_tokens=20)
        assert out.new_tokens == ref.new_tokens
        assert out.stats.early_emitted > 0 and out.stats.rejected > 0


def test_onnx_dir_keeps_the_export_and_reuses_it_for_the_same_program(tiny, tiny_heads, tmp_path, monkeypatch):
    config = AdaDecodeConfig(threshold=1e-6, max_pending=2, backend="onnxruntime", onnx_dir=str(tmp_path / "x"))
    first = AdaDecoder(tiny, tiny_heads, config).generate(PROMPTS[1], max_new_tokens=12).new_tokens
    written = (tmp_path / "x" / "manifest.json").stat().st_mtime_ns
    exports = []
    real_write = onnxrt.write_program
    monkeypatch.setattr(onnxrt, "write_program", lambda *a, **k: exports.append(1) or real_write(*a, **k))
    again = AdaDecoder(tiny, tiny_heads, config).generate(PROMPTS[1], max_new_tokens=12).new_tokens
    assert (again, exports) == (first, [])
    assert (tmp_path / "x" / "manifest.json").stat().st_mtime_ns == written
    # other heads (same layers) are another program: exported again, and decoding follows the new heads
    other = ExitHeads.random(tiny, EXITS, scale=3.0, seed=5)
    out = AdaDecoder(tiny, other, config).generate(PROMPTS[1], max_new_tokens=12)
    ref = AdaDecoder(tiny, other, AdaDecodeConfig(threshold=1e-6, max_pending=2)).generate(PROMPTS[1], max_new_tokens=12)
    assert exports == [1]
    assert (out.new_tokens, out.stats.early_emitted, out.stats.rejected) == \
        (ref.new_tokens, ref.stats.early_emitted, ref.stats.rejected)


@pytest.mark.slow
def test_smollm2_parity_shipped_heads(smol, tmp_path):
    from adadecode_fx.zoo.data import load_prompts
    from adadecode_fx.heads import shipped_heads

    model, tokenizer = smol
    heads = ExitHeads.load(shipped_heads("smollm2-135m"), model)
    config = AdaDecodeConfig(threshold=heads.metadata.get("recommended_threshold", 0.75), max_pending=4)
    eager = AdaDecoder(model, heads, config)
    exported = onnxrt.load_exported(export_onnx(model, heads, config, tmp_path / "smol"))
    early = 0
    for record in load_prompts("humaneval", n=1) + load_prompts("gsm8k", n=1):
        ids = tokenizer(record["prompt"][-300:]).input_ids
        ref, out = eager.generate(ids, max_new_tokens=20), exported.generate(ids, max_new_tokens=20)
        assert out.new_tokens == ref.new_tokens, record["id"]
        early += out.stats.early_emitted
    assert early > 0


# ---- (c) errors ----------------------------------------------------------------------------------------
def _manifest_copy(src, dst, **changes):
    dst.mkdir()
    data = json.loads((src / "manifest.json").read_text())
    data.update(changes)
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def test_bad_exports_raise_clear_errors(tiny_export, tmp_path):
    with pytest.raises(AdaDecodeError, match="not a directory"):
        onnxrt.load_exported(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdaDecodeError, match="no manifest.json.*export"):
        onnxrt.load_exported(tmp_path / "empty")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "manifest.json").write_text("{not json")
    with pytest.raises(AdaDecodeError, match="not valid JSON"):
        onnxrt.load_exported(tmp_path / "corrupt")
    with pytest.raises(AdaDecodeError, match="format version 99.*re-export"):
        onnxrt.load_exported(_manifest_copy(tiny_export, tmp_path / "v99", format_version=99))
    with pytest.raises(AdaDecodeError, match="not an adadecode-fx ONNX manifest"):
        onnxrt.load_exported(_manifest_copy(tiny_export, tmp_path / "other", format="something-else"))
    with pytest.raises(AdaDecodeError, match="lacks segment files"):
        onnxrt.load_exported(_manifest_copy(tiny_export, tmp_path / "nofiles"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_export, broken)
    (broken / "layer_2.onnx").write_bytes(b"garbage")
    with pytest.raises(AdaDecodeError, match="could not load .*layer_2.onnx"):
        onnxrt.load_exported(broken)


def test_bf16_is_refused_with_advice(tmp_path):
    model = tiny_model("llama", dtype=torch.bfloat16)
    with pytest.raises(AdaDecodeError, match="fp32"):
        export_onnx(model, None, AdaDecodeConfig(), tmp_path / "x")
    with pytest.raises(AdaDecodeError, match="fp32"):
        AdaDecoder(model, None, AdaDecodeConfig(backend="onnxruntime"))


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(MissingPackageError, match=r"pip install 'adadecode-fx\[onnx\]'"):
        onnxrt.require_onnx()


# ---- (d) CLI -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-llama-onnx")
    tiny_model("llama").save_pretrained(d)
    vocab = {f"w{i}": i for i in range(127)}
    vocab["[UNK]"] = 127
    tok = Tokenizer(tm.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(d)
    return d


def test_cli_export_then_generate(model_dir, tmp_path, capsys):
    from adadecode_fx import cli
    from adadecode_fx.zoo import models

    out = tmp_path / "exp"
    rc = cli.main(["export", "--model", str(model_dir), "--exit-layers", "1,2", "--threshold", "0.01",
                   "--format", "onnx", "--out", str(out)])
    _, err = capsys.readouterr()
    assert rc == 0, err
    assert (out / "manifest.json").exists() and (out / "tokenizer").is_dir()
    rc = cli.main(["generate", "--exported", str(out), "--prompt", "w5 w17 w3 w99", "--json", "--max-new-tokens", "10"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    data = json.loads(stdout)
    model, _ = models.load(str(model_dir), dtype="fp32")
    assert data["prompt_ids"] == [5, 17, 3, 99]
    assert data["generated_ids"] == hf_greedy(model, [5, 17, 3, 99], 10)
    assert data["config"]["backend"] == "onnxruntime" and data["config"]["exit_layers"] == [1, 2]
    assert data["stats"]["early_emitted"] > 0


def test_cli_export_unsupported_format(model_dir, tmp_path, capsys):
    from adadecode_fx import cli

    assert cli.main(["export", "--model", str(model_dir), "--format", "tensorrt", "--out", str(tmp_path / "t")]) == 2
    assert "CUDA" in capsys.readouterr().err
    assert cli.main(["export", "--model", str(model_dir), "--format", "tflite", "--out", str(tmp_path / "t")]) == 2
    assert "onnx" in capsys.readouterr().err
