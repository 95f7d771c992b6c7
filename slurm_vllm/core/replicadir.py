"""A replica's view of the job folder: its own head, stage, failures and done under replica-K/.

With parallelism.data = R, the allocation runs R servers. Replica 0 is the job's own (the job
folder as for one server: head.json, stage, done at the top, and the job's endpoint), replicas
1..R-1 keep the same files in replica-K/, so every rank runs the code of a one-server job against
its replica's folder. What all replicas share stays at the top: the spec, the plan, the secrets,
the logs (named by the rank in the allocation, so `logs --rank` finds them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slurm_vllm.core.jobdir import JobDir, make_private_dir


@dataclass(frozen=True)
class ReplicaDir(JobDir):
    """Replica REPLICA (>= 1) of a job whose replicas have NODES nodes each."""

    replica: int = 1
    nodes: int = 1

    @property
    def own(self) -> Path:
        return self.path / f"replica-{self.replica}"

    def verified(self) -> ReplicaDir:
        super().verified()
        make_private_dir(self.own)
        make_private_dir(self.env_dir)
        return self

    @property
    def stage_file(self) -> Path:
        return self.own / "stage"

    @property
    def stage_log(self) -> Path:
        return self.own / "stage.log"

    @property
    def head(self) -> Path:
        return self.own / "head.json"

    @property
    def endpoint(self) -> Path:
        return self.own / "endpoint.json"

    @property
    def done(self) -> Path:
        return self.own / "done"

    @property
    def ray_nodes(self) -> Path:
        return self.own / "ray_nodes.json"

    @property
    def preflight(self) -> Path:
        return self.own / "preflight.json"

    @property
    def preflight_addr(self) -> Path:
        return self.own / "preflight-addr.json"

    @property
    def env_dir(self) -> Path:
        return self.own / "env"

    def rank_log(self, role: str, rank: int) -> Path:
        """RANK's log (RANK inside the replica), named by its rank in the allocation."""
        return self.logs / f"{role}-{self.replica * self.nodes + rank}.log"

    def heartbeat(self, rank: int) -> Path:
        return self.own / f"rank-{rank}.heartbeat.json"

    def rank_failed(self, rank: int) -> Path:
        return self.own / f"rank-{rank}.failed"

    def failed_ranks(self) -> list[Path]:
        return sorted(self.own.glob("rank-*.failed"))


def replicas_file(jd: JobDir) -> Path:
    """replicas.json at the top of the job folder (records.Replicas, written by the job's head)."""
    return jd.path / "replicas.json"


def replica_dir(jd: JobDir, replica: int, nodes: int) -> JobDir:
    """The folder view replica REPLICA's ranks work in: the job folder itself for replica 0."""
    return jd if replica == 0 else ReplicaDir(jd.path, replica, nodes)
