"""benchmarks/gpu_check.py on a machine without a GPU: it says so, writes its report and exits 0
(the measurements themselves need a GPU node: docs/performance.md, "GPU")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    report = tmp_path / "gpu-check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--json", str(report)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # no GPU, even on a GPU machine
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no GPU" in proc.stdout
    result = json.loads(report.read_text())
    assert result["environment"]["cuda_available"] is False
    assert result["result"].startswith("no GPU")
    assert result["environment"]["torch"] == __import__("torch").__version__
