"""Every Triton kernel variant the GPU engine launches for a Qwen2.5-1.5B-shaped model (bf16, int4 with its
q8_0 LM head, three batch buckets and a prefill) compiles for Hopper (sm_90) with the ptxas in Triton's
wheel: the GPU compiler's rules and shared-memory limits, which the interpreter does not apply, checked
without a GPU. The full matrix (every format, dtype and bucket): python -m services.worker.engine.layers.gpu.aot"""

from __future__ import annotations

import os
import subprocess
import sys


def test_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "services.worker.engine.layers.gpu.aot", "--lean"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "kernel variants compile for sm_90" in run.stdout
    count = int(run.stdout.strip().splitlines()[-1].split()[0])
    assert count >= 15, run.stdout  # GEMV, GEMM per bucket, dequant, attention, fused ops
