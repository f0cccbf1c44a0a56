"""The prepared GPU check (tests/test_cuda.py, ``make gpu-check``) must not rot between the sessions that have a GPU:
its test logic runs here on CPU tensors (``SYNCNORM_TEST_DEVICE=cpu``; the CUDA-only checks skip), in a subprocess,
since the module reads the setting at import."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_logic_passes_on_cpu_tensors():
    env = {**os.environ, "SYNCNORM_TEST_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 20, tail  # the oracles, not only the skips
