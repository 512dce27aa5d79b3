"""The CUDA kernels compile with nvcc (plain CUDA C++, no torch headers): for Hopper and nvcc's default target.

Skipped where nvcc is absent. Nothing runs on a GPU here; numerical checks of the CUDA ops need a CUDA torch.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CU_FILES = ("fused_kl_cuda.cu", "scaled_masked_softmax_cuda.cu")
NVCC = shutil.which("nvcc")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")


@pytest.mark.parametrize("arch", [["-arch=sm_90"], []], ids=["sm_90", "nvcc-default"])
def test_cuda_sources_compile(tmp_path, arch):
    # both files compile concurrently: on a 2-core machine that halves the wall time
    procs = []
    for name in CU_FILES:
        cmd = [NVCC, "-std=c++17", "-O3", *arch, "-Xcompiler", "-Wall", "-Werror", "all-warnings"]
        cmd += ["-I", str(CSRC), "-c", str(CSRC / name), "-o", str(tmp_path / (name + ".o"))]
        procs.append(
            (name, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        )
    for name, proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"nvcc failed on csrc/{name}:\n{out}"
        assert (tmp_path / (name + ".o")).stat().st_size > 0
