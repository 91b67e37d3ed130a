"""Slow one-time steps announce themselves on stderr: what runs, roughly how long, what is kept."""
import torch

from adadecode_fx import AdaDecodeConfig, build_program
from adadecode_fx.notices import roughly
from tests.conftest import tiny_model


def test_roughly():
    assert [roughly(s) for s in (1, 21, 40, 150, 600)] == ["about 5 s", "about 20 s", "about 40 s", "about 2 min",
                                                           "about 10 min"]


def test_capture_and_compilation_are_announced_once(monkeypatch, capsys, tmp_path):
    import adadecode_fx.build as build

    monkeypatch.setenv("ADADECODE_CAPTURE_CACHE", str(tmp_path))  # a structure this cache has not seen
    monkeypatch.setattr(build, "lower", lambda program, config: program)  # no compiling: only the notice
    model = tiny_model("llama", dtype=torch.float32, seed=5)  # a model object no other test captured
    build_program(model, None, AdaDecodeConfig(backend="inductor"))
    err = capsys.readouterr().err
    assert "[adadecode] capturing LlamaForCausalLM with torch.export" in err and "5 layer segments" in err
    assert "compiling the segments with inductor" in err and "caches the kernels on disk" in err
    build_program(model, None, AdaDecodeConfig())
    assert "capturing" not in capsys.readouterr().err  # kept for this model object
    monkeypatch.setenv("ADADECODE_QUIET", "1")
    build_program(model, None, AdaDecodeConfig(backend="inductor"))
    assert capsys.readouterr().err == ""
