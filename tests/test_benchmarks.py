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


def test_scaling_benchmark_quick(tmp_path):
    """benchmarks/scaling.py --quick keeps running and prints every row of both tables (its numbers here mean
    nothing: one round)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "scaling.py"), "--quick", "--rounds", "1"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    hooks = [r for r in rows if "approximate" in r[0] or "exact" in r[0]]
    folder = [r for r in rows if r[0].strip() in ("10", "100")]
    assert len(hooks) == 22 and len(folder) == 2
    assert all(math.isfinite(float(cell.strip().rstrip(" %"))) for r in hooks + folder for cell in r[1:])
