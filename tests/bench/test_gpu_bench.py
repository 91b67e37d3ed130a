"""bench/gpu_bench.py, the script a lent GPU runs once: its whole flow on the CPU (Qwen2.5-Coder's shape with
random weights, the recorded schedule, a few tokens), so a broken script is found here, not in the lease."""
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import bench_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_gpu_bench_runs_its_flow_on_the_cpu(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    gpu_bench = bench_script("gpu_bench")
    monkeypatch.setitem(gpu_bench.VARIANTS, "adadecode_eager", {"backend": "eager", "max_pending": "many"})
    monkeypatch.setattr(sys, "argv", [
        "gpu_bench", "--device", "cpu", "--json", str(out), "--prompts", "2", "--max-new-tokens", "6",
        "--schedule", str(ROOT / "bench/data/qwen2.5-coder-0.5b.schedule.json"),
        "--methods", "hf_greedy,adadecode_cudagraphs,adadecode_cudagraphs_full_depth,adadecode_eager"])
    assert gpu_bench.main() == 0
    report = json.loads(out.read_text())
    assert [p["id"] for p in report["prompts"]] == ["humaneval/HumanEval/10", "humaneval/HumanEval/66"]
    for prompt in report["prompts"]:
        run = prompt["runs"]["adadecode_cudagraphs"]
        assert run["same_as_hf_greedy"] and run["graphs_compiled"] == 0
        assert run["stats"]["replay"]["diverged"] == 0 and run["stats"]["new_tokens"] == 6
        full = prompt["runs"]["adadecode_cudagraphs_full_depth"]  # same graphs, no heads: plain greedy
        assert full["same_as_hf_greedy"] and full["stats"]["early_emitted"] == 0
    # what the exits buy: the per-prompt tok/s ratio over the same variant at full depth
    ratios = sorted(p["runs"]["adadecode_cudagraphs"]["tok_s"] / p["runs"]["adadecode_cudagraphs_full_depth"]["tok_s"]
                    for p in report["prompts"])
    gain = report["summary"]["adadecode_cudagraphs"]["heads_gain"]
    assert gain["n"] == 2 and gain["median"] == pytest.approx(sum(ratios) / 2)
    assert gain["p25"] <= gain["median"] <= gain["p75"]
    assert "heads_gain" not in report["summary"]["adadecode_cudagraphs_full_depth"]
    assert report["graphs_made_after_warm_up"] == {"adadecode_cudagraphs": 0, "adadecode_cudagraphs_full_depth": 0}
    assert report["probes_outside_their_runs"] == {"adadecode_cudagraphs": 0, "adadecode_cudagraphs_full_depth": 0}
    # the figure for docs/, made where the JSON comes back
    gpu_plot = bench_script("gpu_plot")
    assert gpu_plot.main([str(out), str(tmp_path / "bench.png")]) == 0
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert report["commit"] in gpu_plot.footer(report) and "--prompts 2" in gpu_plot.footer(report)
    gain = gpu_plot.spread(gpu_plot.ratios(report, "adadecode_cudagraphs", "adadecode_cudagraphs_full_depth"))
    assert gain[0] == pytest.approx(report["summary"]["adadecode_cudagraphs"]["heads_gain"]["median"])
    # static calls by key, weighed with each graph's GPU time (measured on CUDA only) into the GPU's share
    run = report["prompts"][0]["runs"]["adadecode_cudagraphs"]
    assert run["static_calls"]["('run', 0, 1)"] >= 5 and "graph_gpu_share" not in run
    report["graph_ms"] = {"adadecode_cudagraphs": {key: 2.0 for key in run["static_calls"]}}
    gpu_bench.gpu_share(report)
    assert run["graph_gpu_ms"] == 2.0 * sum(run["static_calls"].values())
    assert run["graph_gpu_share"] == round(run["graph_gpu_ms"] / (1000 * run["seconds"]), 3)
    assert report["summary"]["adadecode_cudagraphs"]["prompts"] == 2
    # a variant that cannot be built is recorded, and the others' figures stand
    assert set(report["failed"]) == {"adadecode_eager"} and "max_pending" in report["failed"]["adadecode_eager"]
    assert report["methods"] == ["hf_greedy", "adadecode_cudagraphs", "adadecode_cudagraphs_full_depth"]
