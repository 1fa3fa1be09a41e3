"""The prepared GPU benchmark keeps working: its --smoke run on the CPU prints every row (CI runs it)."""

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_benchmark_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "gpu.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    kinds = [row[0].split()[0] for row in report["rows"]]
    assert kinds.count("hooks") == 3 and kinds.count("train") == 3 and "concept" in kinds and "covariance" in kinds
    assert all(math.isfinite(row[2]) and row[2] > 0 for row in report["rows"])
    assert report["smoke"] and "| CPU, 1 thread | measure |" in run.stdout
