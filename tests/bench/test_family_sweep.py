"""bench/family_sweep.py: its per-family check, in process, on a family that decodes and one that is refused."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _sweep():
    spec = importlib.util.spec_from_file_location("family_sweep", ROOT / "bench" / "family_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_family_decodes_with_exits_and_a_stateful_one_is_refused():
    sweep = _sweep()
    assert "llama" in sweep.all_families() and "bert" not in sweep.all_families()
    row = sweep.check_family("llama", ["eager"])
    assert row["dtype"] == "float64" and row["eager"]["outcome"] == "ok"
    assert row["eager"]["early"] >= 20 and row["eager"]["rejected"] >= 5
    assert "llama" in sweep._line(row, ["eager"]) and "ok (" in sweep._line(row, ["eager"])
    row = sweep.check_family("mamba", ["eager"])
    assert row["eager"]["outcome"] == "refused" and "attention K/V" in row["eager"]["message"]
