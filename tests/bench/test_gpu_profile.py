"""bench/gpu_profile.py's arithmetic: the union of kernel intervals, and the per-step figures it draws from a
profiler's events (a CPU profile here; its GPU flow runs only on a GPU)."""
import torch
from torch.profiler import ProfilerActivity, profile

from tests.conftest import bench_script


def test_busy_time_counts_overlapping_kernels_once():
    gpu_profile = bench_script("gpu_profile")
    assert gpu_profile.intervals_union([]) == 0
    assert gpu_profile.intervals_union([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17


def test_a_cpu_profile_gives_per_step_calls_and_no_kernel_figures():
    gpu_profile = bench_script("gpu_profile")
    x = torch.ones(8, 8)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            torch.cat([x, x])
    rec = gpu_profile.analyse(prof, steps=2, wall_s=0.001)
    assert rec["wall_us_per_step"] == 500
    assert rec["top_level_aten_per_step"]["aten::cat"]["calls"] == 2
    assert "kernel_busy_us_per_step" not in rec  # no kernels on a CPU
