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
