"""bench/family_sweep.py: its per-family check, in process, on a family that decodes and one that is refused."""
from tests.conftest import bench_script


def test_a_family_decodes_with_exits_and_a_stateful_one_is_refused():
    sweep = bench_script("family_sweep")
    assert "llama" in sweep.all_families() and "bert" not in sweep.all_families()
    row = sweep.check_family("llama", ["eager"])
    assert row["dtype"] == "float64" and row["eager"]["outcome"] == "ok"
    assert row["eager"]["early"] >= 20 and row["eager"]["rejected"] >= 5
    assert "llama" in sweep._line(row, ["eager"]) and "ok (" in sweep._line(row, ["eager"])
    row = sweep.check_family("mamba", ["eager"])
    assert row["eager"]["outcome"] == "refused" and "attention K/V" in row["eager"]["message"]


def test_a_family_whose_probes_never_reach_gamma_is_rerun_with_every_probe_exiting():
    # Cohere's logit scale (0.0625) flattens every distribution under 0.02 on a 128-token vocabulary
    row = bench_script("family_sweep").check_family("cohere", ["eager"])
    assert row["eager"]["outcome"] == "ok" and row["eager"]["gamma"] == 1e-9
    assert row["eager"]["early"] >= 20 and row["eager"]["rejected"] >= 5


def test_windows_bind_within_the_sweeps_lengths_and_bf16_blocks_round_as_rows():
    sweep = bench_script("family_sweep")
    row = sweep.check_family("mistral", ["eager"], window=5)
    assert row["window"] == 5 and row["eager"]["outcome"] == "ok" and row["eager"]["early"] >= 20
    row = sweep.check_family("qwen2", ["eager"], dtype="bfloat16")
    assert row["dtype"] == "bfloat16" and row["eager"]["outcome"] == "ok" and row["eager"]["early"] >= 20


def test_per_layer_lists_are_cut_to_the_sweeps_depth_keeping_their_kinds():
    import transformers as tf

    sweep = bench_script("family_sweep")
    default = tf.DeepseekV32Config()  # 3 dense MLP layers, then sparse ones; indexed attention throughout
    cut = sweep._per_layer_lists(default, 4, {})
    assert cut["mlp_layer_types"] == ["dense", "dense", "dense", "sparse"]
    assert cut["layer_types"] == ["indexed_attention"] * 4
    assert "mlp_layer_types" not in sweep._per_layer_lists(default, 4, {"mlp_layer_types": ["dense"] * 4})


def test_gemma4_is_built_and_decodes_and_parts_of_a_decoder_are_not_towers():
    row = bench_script("family_sweep").check_family("gemma4_text", ["eager"])
    assert row["eager"]["outcome"] == "ok" and row["eager"]["early"] >= 20, row
    row = bench_script("family_sweep").check_family("gemma3", ["eager"])
    assert "wraps sub-models" in row["no_model"]
    row = bench_script("family_sweep").check_family("dbrx", ["eager"])  # attn_config, ffn_config: its own parts
    assert "no_model" not in row and row["eager"]["outcome"] == "refused", row
