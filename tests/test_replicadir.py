"""A replica's view of the job folder: its own head, stage, failures, env files; the shared rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from slurm_vllm.core.jobdir import JobDir
from slurm_vllm.core.records import Stage
from slurm_vllm.core.replicadir import ReplicaDir, replica_dir

pytestmark = pytest.mark.unit


def test_replica_zero_is_the_job_folder_and_the_others_keep_their_own_files(tmp_path: Path) -> None:
    top = JobDir(tmp_path / "job-7")
    top.create("name: t\n", "{}", api_key=True)
    assert replica_dir(top, 0, 2) is top
    r2 = replica_dir(top, 2, 2)
    assert isinstance(r2, ReplicaDir) and r2.verified().own == top.path / "replica-2"
    assert (r2.own.stat().st_mode & 0o777, r2.env_dir.stat().st_mode & 0o777) == (0o700, 0o700)
    own = [r2.stage_file, r2.head, r2.endpoint, r2.done, r2.ray_nodes, r2.preflight_addr, r2.env_dir,
           r2.heartbeat(1), r2.rank_failed(1)]
    assert all(p.parent in (r2.own, r2.own) for p in own), own
    shared = [r2.spec, r2.plan, r2.api_key, r2.ray_token, r2.logs, r2.requeue_mark]
    assert [p.parent for p in shared] == [top.path] * len(shared)
    # logs are named by the rank in the allocation: replica 2's rank 1 of 2 is rank 5
    assert r2.rank_log("vllm", 1) == top.logs / "vllm-5.log"
    r2.write_stage(Stage.READY, "http://x/v1")
    r2.rank_failed(1).write_text("{}")
    assert top.read_stage().stage == Stage.PENDING and r2.read_stage().stage == Stage.READY
    assert top.failed_ranks() == [] and r2.failed_ranks() == [r2.rank_failed(1)]
    top.restart()                                  # a requeued run starts every replica afresh
    assert not r2.own.exists() and top.spec.exists()
