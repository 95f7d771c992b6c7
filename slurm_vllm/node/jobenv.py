"""The Slurm task's environment, read once into a typed record: rank, job id, nodes, CPUs, GPUs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from submitit.slurm.slurm import SlurmJobEnvironment, SlurmParseException

from slurm_vllm.core.errors import ClusterError


@dataclass(frozen=True)
class JobEnv:
    """What Slurm tells one task about its job (srun sets these on every node)."""

    rank: int
    job_id: int
    hosts: tuple[str, ...]
    cpus: int
    gpus: tuple[str, ...]
    restart_count: int = 0          # how many times Slurm requeued the job before this run
    array_task: int | None = None   # a job array's task (a batch shard), else None
    allocation: tuple[str, ...] = ()  # with replicas: every node of the job (HOSTS: the replica's)

    @property
    def head_host(self) -> str:
        return self.hosts[0]

    @staticmethod
    def from_environ() -> JobEnv:
        """This task's job from its environment: SLURM_PROCID, SLURM_JOB_ID, SLURM_CPUS_PER_TASK,
        CUDA_VISIBLE_DEVICES, SLURM_RESTART_COUNT, and the hosts of SLURM_JOB_NODELIST as submitit's
        job environment expands them (the submission engine's own reading of Slurm's hostlist)."""
        env = os.environ
        missing = [k for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST") if not env.get(k)]
        if missing:
            raise ClusterError(f"not inside a Slurm job: {', '.join(missing)} unset")
        try:
            hosts = tuple(SlurmJobEnvironment().hostnames)
        except SlurmParseException as exc:
            raise ClusterError(f"SLURM_JOB_NODELIST {env['SLURM_JOB_NODELIST']!r}: not a hostlist "
                               f"submitit can read: {exc.args[0]}") from None
        return JobEnv(
            rank=int(env.get("SLURM_PROCID", "0")),
            job_id=int(env["SLURM_JOB_ID"]),
            hosts=hosts,
            cpus=int(env.get("SLURM_CPUS_PER_TASK") or os.cpu_count() or 1),
            gpus=tuple(g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g),
            restart_count=int(env.get("SLURM_RESTART_COUNT") or 0),
            array_task=int(env["SLURM_ARRAY_TASK_ID"]) if env.get("SLURM_ARRAY_TASK_ID") else None,
        )


def shown_job_id(env: Mapping[str, str], array: bool) -> str:
    """The job's id as squeue and sacct show it: SLURM_JOB_ID, or `<array id>_<task>` for a task of
    a job array (each task also has a SLURM_JOB_ID of its own, which Slurm accepts too)."""
    if array and env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]
