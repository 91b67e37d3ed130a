"""Exit schedules: one recorded on a model replays exactly on a decisive random model of its shape."""
import torch
import transformers as tf

from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
from adadecode_fx.bench.replay import ReplayDecoder, record
from adadecode_fx.zoo.shapes import make_decisive, shape_config

from tests.conftest import FAMILIES, hf_greedy, tiny_model


def test_a_recorded_schedule_replays_step_for_step_on_a_decisive_model():
    model = tiny_model("llama", dtype=torch.float32)
    config = AdaDecodeConfig(threshold=0.02, max_pending=3)
    program = AdaDecoder(model, ExitHeads.random(model, (1, 3), scale=0.5, seed=1), config).program
    prompt = list(range(20, 30))
    schedule = record(program, prompt, 30)
    stats = schedule["stats"]
    assert stats["early_emitted"] >= 10 and stats["rejected"] >= 3, stats

    torch.manual_seed(5)
    shape = make_decisive(tf.AutoModelForCausalLM.from_config(FAMILIES["llama"]()).eval())
    shape.generation_config.eos_token_id = None
    heads = ExitHeads.random(shape, (1, 3), seed=2)
    for backend in ("eager", "cudagraphs"):
        replay = ReplayDecoder(AdaDecoder(shape, heads, AdaDecodeConfig(threshold=0.5, max_pending=3,
                                                                        backend=backend)).program)
        out, followed = replay.replay(prompt, schedule, 30)
        assert followed == {"diverged": 0, "probes_used": len(schedule["probes"]),
                            "probes_recorded": len(schedule["probes"]), "stats_equal": True}, backend
        assert out.new_tokens == hf_greedy(shape, prompt, 30) == [prompt[-1]] * 30


def test_the_shipped_qwen_shape():
    config = shape_config("qwen2.5-coder-0.5b")
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (24, 896, 4864)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (14, 2, 151936)
    assert config.tie_word_embeddings is False
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = tf.AutoModelForCausalLM.from_config(config)
    assert 620e6 < sum(p.numel() for p in model.parameters()) < 640e6  # 630M incl. both embedding matrices
