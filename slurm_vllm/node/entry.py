"""The per-rank program's entry point: `python -m slurm_vllm.node init|run JOB_DIR`, from the job script.

Every task of the allocation runs `main(job_dir)` (the job script's srun line): it reads the Slurm
environment once (jobenv), runs its rank (head.Head or worker.Worker), and on any end, a stop
(scancel, the time limit) included, tears down what it started; rank 0 writes the job's final
stage. `init` is the script's first step: it makes the job folder from the spec and plan embedded
in the script.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from pathlib import Path

from slurm_vllm.core import index
from slurm_vllm.core import spec as spec_mod
from slurm_vllm.core.errors import JobFolderError, SlurmVllmError
from slurm_vllm.core.jobdir import JobDir, atomic_write
from slurm_vllm.core.jobsroot import link_job_id
from slurm_vllm.core.plan import Plan
from slurm_vllm.core.records import RankFailure, Stage
from slurm_vllm.core.replicadir import replica_dir
from slurm_vllm.core.slurm import end_job, still_running
from slurm_vllm.node.head import Head
from slurm_vllm.node.jobenv import JobEnv, shown_job_id
from slurm_vllm.node.rank import Rank
from slurm_vllm.node.rankenv import cancel_or_task_death, final_stage, outcome, redact
from slurm_vllm.node.replicas import JobHead, ReplicaHead
from slurm_vllm.node.worker import Worker


def rank_for(jd: JobDir, job: JobEnv) -> tuple[Rank, JobDir, JobEnv]:
    """This task's rank, the folder view and the job environment it works in: the job's own, or,
    with replicas, its replica's (the ranks of replica K are 0.. inside it; replicadir.py)."""
    replicas, nodes = 1, len(job.hosts)
    try:
        plan = Plan.read(jd.plan)
        replicas, nodes = plan.replicas, plan.replica_nodes
    except SlurmVllmError:
        pass                        # the rank's own reading fails the same way, and says so below
    if replicas == 1:
        return (Head if job.rank == 0 else Worker)(jd, job), jd, job
    k, local = divmod(job.rank, nodes)
    rjd = replica_dir(jd, k, nodes)
    rjob = dataclasses.replace(job, rank=local, hosts=job.hosts[k * nodes:(k + 1) * nodes],
                               allocation=job.hosts)
    kind: type[Rank] = Worker if local else (JobHead if k == 0 else ReplicaHead)
    return kind(rjd.verified(), rjob), rjd, rjob


def main(job_dir: str) -> int:
    """Run this task's rank; return its exit code (0: stopped on purpose or finished)."""
    jd = JobDir(Path(job_dir))
    job = JobEnv.from_environ()
    try:
        rank, jd, job = rank_for(jd, job)
    except Exception as exc:      # an unreadable job folder: say so where the CLI looks
        if job.rank == 0:
            jd.write_stage(Stage.FAILED, f"{socket.gethostname()}: cannot start: {type(exc).__name__}: {exc}")
        raise
    rank.install_signals()
    error: BaseException | None = None
    try:
        rank.run()
    except Exception as exc:
        error = exc
    own, detail = outcome(error, rank.stop_reason)
    if own == Stage.DONE:
        detail = rank.done_detail
    detail = redact(detail, rank.secret_values())
    stage = own
    if job.rank == 0:
        jd.done.touch()           # workers stop when they see it
        failures = [RankFailure.read(f) for f in jd.failed_ranks()]
        stage, detail = final_stage(stage, detail, failures)
        if stage == Stage.CANCELLED:
            stage, detail = cancel_or_task_death(stage, detail, still_running(str(job.job_id)),
                                                 lambda: _batch_output(jd))
        if stage == Stage.TIMEOUT and jd.requeue_mark.exists():         # a batch goes on in a next run
            stage, detail = Stage.PENDING, f"time limit: {detail}"
    elif stage == Stage.FAILED:
        jd.write(jd.rank_failed(job.rank), RankFailure(job.rank, socket.gethostname(), detail))
    rank.teardown()
    if job.rank == 0:
        jd.write_stage(stage, detail)
    if isinstance(rank, ReplicaHead) and stage == Stage.FAILED:
        rank.linger()             # the job goes on with the other replicas
        return 0
    if rank.lost:                 # a node left the network: Slurm may never hear from its task again
        print(f"slurm_vllm: {rank.lost}: job {job.job_id} ended through slurmctld: "
              f"{'yes' if end_job(str(job.job_id)) else 'not reachable from here'}", file=sys.stderr)
    if error is not None and not isinstance(error, SlurmVllmError):
        raise error               # a bug: torn down and said, now the traceback for the task's log
    return 1 if own == Stage.FAILED else 0


def _batch_output(jd: JobDir) -> str:
    """The batch step's output so far (srun's messages), beside the job folder."""
    try:
        return jd.batch_log.read_text(errors="replace")
    except OSError:
        return ""


def init(job_dir: str, script: str | None, embedded: str) -> None:
    """The first step of the job script: make the job folder from the spec and plan embedded in the
    script (the plan as decided when the script was made: never planned again), record the job id
    and the script Slurm ran (job.sbatch)."""
    from slurm_vllm.core.render import sharded, split_embedded

    spec_yaml, plan_json = split_embedded(embedded)
    spec = spec_mod.parse(spec_mod.loads(spec_yaml), expand=False)     # the user's loader, not expanded again
    plan = Plan.from_json(plan_json, "the plan embedded in the job script")
    jd = JobDir(Path(job_dir))
    job_id = shown_job_id(os.environ, sharded(spec))
    if jd.path.exists() or jd.path.is_symlink():     # a requeued job runs init again
        jd.verified()
        if jd.job_id() != job_id:
            raise JobFolderError(f"{jd.path}: exists, made by job {jd.job_id()}: refused")
        jd.restart()
    else:
        jd.create(spec_mod.dump(spec), plan.to_json(), api_key=plan.api_key)
    jd.write_job_id(job_id)
    if script:
        atomic_write(jd.sbatch, Path(script).read_text())
    try:
        link_job_id(spec.jobs_root_path, job_id, jd.path)
    except (OSError, JobFolderError) as exc:       # the job runs; its id resolves through the index
        print(f"slurm_vllm: warning: no by-id link for job {job_id}: {exc}", file=sys.stderr)
    index.record(job_id, jd.path, plan)


def _cli(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "run":
        return main(argv[1])
    if len(argv) in (2, 3) and argv[0] == "init":
        try:
            init(argv[1], argv[2] if len(argv) == 3 else None, sys.stdin.read())
        except SlurmVllmError as exc:    # e.g. a job folder someone else made first: one line, in %j.out
            print(f"slurm_vllm: error: {exc}", file=sys.stderr)
            return 1
        return 0
    print("usage: python -m slurm_vllm.node run JOB_DIR | init JOB_DIR [SCRIPT] < spec.yaml", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
