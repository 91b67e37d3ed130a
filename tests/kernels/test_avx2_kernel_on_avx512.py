"""The AVX2 kernel's tests, run on an AVX-512 BF16 machine as if its CPU had AVX2 only.

On such a machine the suite otherwise only exercises the AVX-512 kernel. ``ATEN_CPU_CAPABILITY=avx2`` picks
ATen's AVX2 kernels (its bf16 gemm among them), and oneDNN switched off keeps bf16 matmuls on that gemm,
as on a CPU without AVX-512 BF16 (docs/notes.md, "An AVX2 CPU on an AVX-512 machine"). The kernel tests
and the bf16 parity tests then run in a child pytest against the AVX2 kernel. The child gets an inductor
cache of its own: torch 2.13's inductor cache does not key on ATen's capability, and kernels cached by
one capability give wrong results under the other."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adadecode_fx import kernels

ROOT = Path(__file__).resolve().parents[2]
on_avx512_bf16 = pytest.mark.skipif(
    kernels._variant()[0] is not kernels._AVX512 or shutil.which("c++") is None,
    reason="runs the AVX2 kernel on an AVX-512 BF16 CPU (an AVX2 CPU runs it in the main suite)")


def _avx2_env(tmp_path: Path) -> dict:
    plugin = tmp_path / "aten_avx2_plugin.py"
    plugin.write_text("import torch\ntorch.backends.mkldnn.enabled = False\n")
    return {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
            "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}


@on_avx512_bf16
def test_avx2_kernel_and_bf16_parity_under_aten_avx2(tmp_path):
    env = _avx2_env(tmp_path)
    probe = subprocess.run(
        [sys.executable, "-c", "import aten_avx2_plugin, torch\nfrom adadecode_fx import kernels\n"
         "print(torch.backends.cpu.get_cpu_capability(), kernels._variant()[0].source, kernels.block_linear_status())"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.split() == ["AVX2", "block_linear.cpp", "ok"], probe.stdout + probe.stderr[-2000:]

    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging", "-p", "aten_avx2_plugin",
         "tests/kernels/test_block_linear.py", "tests/runtime/test_parity_bf16.py",
         "tests/runtime/test_sliding_windows.py"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    tail = child.stdout[-3000:] + child.stderr[-2000:]
    assert child.returncode == 0, tail
    passed = re.search(r"(\d+) passed", child.stdout)
    # the AVX2 kernel's own tests and the parity tests ran, not only skipped (10 are AVX-512 only)
    assert passed and int(passed.group(1)) >= 15, tail
    assert torch.backends.cpu.get_cpu_capability() == "AVX512"  # the parent's ATen is untouched
