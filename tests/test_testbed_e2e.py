"""e2e smoke of the test bed: Ray across two Slurm nodes and real vLLM with TP=2 over Ray."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import pytest

from .support.reference import greedy_chat
from .support.slurm import sacct_state, sbatch_wait

pytestmark = pytest.mark.e2e
SUPPORT = Path(__file__).parent / "support"
QUESTION = "What is a slurm node?"


def test_ray_two_nodes_vllm_tp2_matches_single_process(job_dir: Path, testbed: dict[str, str]) -> None:
    token = job_dir / "ray_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    script = shutil.copy(SUPPORT / "ray_vllm_smoke.sbatch", job_dir / "smoke.sbatch")
    os.environ["SMOKE_QUESTION"] = QUESTION
    job = sbatch_wait(Path(script), 600)
    logs = "\n".join(p.read_text()[-3000:] for p in job_dir.glob("*.log"))
    assert sacct_state(job) == "COMPLETED", logs

    nodes = json.loads((job_dir / "nodes.json").read_text())
    assert sorted(n["ip"] for n in nodes) == ["10.77.0.11", "10.77.0.12"]
    assert all(n["gpus"] == 1 for n in nodes)
    workers = json.loads((job_dir / "workers.json").read_text())
    assert sorted(workers) == ["10.77.0.11", "10.77.0.12"], f"one vLLM worker per node expected: {workers}"

    answer = json.loads((job_dir / "answer.json").read_text())["choices"][0]["message"]["content"]
    assert answer == greedy_chat(testbed["SLURM_VLLM_TEST_MODEL"], QUESTION)
    times = dict(line.split() for line in (job_dir / "times").read_text().splitlines())
    t0 = float(times["start"])
    print("smoke timings (s from the head task's start):",
          {k: round(float(v) - t0, 1) for k, v in times.items()})
