"""One submitted job (Job) or a sharded batch's job array (ArrayJob), through the job folder and Slurm.

Both answer the same calls (the JobHandle protocol): status, wait (by default for what the job's
mode ends at), endpoint, logs, cancel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from slurm_vllm.core import safefile
from slurm_vllm.core.errors import JobFolderError, SlurmVllmError
from slurm_vllm.core.jobdir import JobDir
from slurm_vllm.core.plan import Mode, Plan
from slurm_vllm.core.records import BatchProgress, Endpoint, PreflightResult, Stage
from slurm_vllm.login.status import ORDER, Status, reconcile, sum_progress, wait_for


class JobHandle(Protocol):
    """What the CLI and API users do with a job, whichever kind it is."""

    @property
    def job_id(self) -> str | None: ...
    @property
    def path(self) -> Path: ...
    def plan(self) -> Plan: ...
    def status(self) -> Status: ...
    def wait(self, stage: Stage | None = None, timeout: float | None = None,
             progress: Callable[[Status], None] | None = None, poll: float = 2.0) -> Status: ...
    def endpoint(self) -> Endpoint: ...
    def log_files(self, rank: int | None = None) -> list[Path]: ...
    def logs(self, rank: int | None = None, lines: int = 40) -> Iterator[tuple[Path, str]]: ...
    def cancel(self) -> None: ...


def wait_target(plan: Plan) -> Stage:
    """The stage a job's mode ends its wait at: READY for an endpoint, DONE for the rest."""
    return Stage.READY if plan.mode is Mode.SERVE else Stage.DONE


class Job:
    """One submitted job, through its folder (shared by every node) and Slurm's view of it.

    The folder is made when the job starts: a pending job has only its id (and its plan, when
    this process submitted it)."""

    def __init__(self, folder: JobDir | Path | str, job_id: str | None = None,
                 plan: Plan | None = None) -> None:
        self.dir = folder if isinstance(folder, JobDir) else JobDir(Path(folder))
        self._job_id = job_id
        self._plan = plan

    def __repr__(self) -> str:
        return f"Job({self.job_id!r}, {str(self.dir.path)!r})"

    def _checked(self) -> JobDir:
        """The folder, verified (this user's, not writable by others) whenever it exists: a pending
        job's folder does not yet, and in a shared jobs_root someone else may plant one."""
        if self.dir.path.exists() or self.dir.path.is_symlink():
            self.dir.verified()
        return self.dir

    @property
    def job_id(self) -> str | None:
        return self._checked().job_id() or self._job_id

    @property
    def path(self) -> Path:
        return self.dir.path

    def plan(self) -> Plan:
        if self._plan is not None:
            return self._plan
        if not self._checked().plan.exists():
            raise SlurmVllmError(f"job {self.job_id}: no job folder yet at {self.dir.path} (not started)")
        return Plan.read(self.dir.plan)

    def status(self) -> Status:
        from slurm_vllm.core.slurm import job_state

        job_id = self.job_id
        ended = self._checked().read_stage().stage.final     # the ranks' final word: no sacct needed
        # status_given reads the stage again, after Slurm answered: a final stage the ranks wrote
        # meanwhile wins over Slurm's verdict (read before the query, it would be shadowed by it).
        return self.status_given(job_id, job_state(job_id, accounting=not ended) if job_id else None)

    def status_given(self, job_id: str | None, state: str | None) -> Status:
        """The status with Slurm's STATE of JOB_ID already known (one query for many jobs: ArrayJob)."""
        info = self._checked().read_stage()
        stage, detail = reconcile(info, state)
        if job_id and stage.final and info.stage == Stage.PENDING and stage != Stage.CANCELLED:
            detail = self.unstarted(job_id)
        batch = BatchProgress.read(self.dir.batch) if self.dir.batch.exists() else None
        return Status(job_id, self.dir.path, stage, detail, state, info.time, batch)

    def unstarted(self, job_id: str) -> str:
        """Why a job ended before slurm_vllm ran on its nodes: Slurm's state, exit code and reason,
        the batch step's output (its last line), or that the nodes could not write it here."""
        from slurm_vllm.core.slurm import ended_detail

        out = self.dir.batch_log
        said = f"the job ended before slurm_vllm started on the nodes (Slurm: {ended_detail(job_id)})"
        try:     # beside the folder, in jobs_root: checked like the folder's own files
            lines = [line for line in safefile.tail(out, 50) if line.strip()]
        except FileNotFoundError:
            return (f"{said}; its output {out} is not on this machine: is jobs_root ({self.dir.path.parent}) "
                    f"on a file system the nodes share?")
        except JobFolderError as exc:
            return f"{said}; its output not read: {exc}"
        last = safefile.printable(lines[-1].strip()[:200]) if lines else "(empty)"
        return f"{said}; the end of {out}: {last}"

    def wait(self, stage: Stage | None = None, timeout: float | None = None,
             progress: Callable[[Status], None] | None = None, poll: float = 2.0) -> Status:
        """Block until the job reaches STAGE (default: READY for an endpoint, DONE for a batch or a
        preflight); PROGRESS(status) on every change of stage or detail.

        Raises JobEnded when the job ends first (its status in the exception), WaitTimeout after
        TIMEOUT seconds (the job keeps running). Polls fast at first, then every POLL seconds.
        """
        if stage is None:
            try:
                stage = wait_target(self.plan())
            except SlurmVllmError:           # pending, and its plan not known here: READY, as before
                stage = Stage.READY
        return wait_for(self.status, stage, timeout, progress, poll)

    def preflight_result(self) -> PreflightResult:
        """What a DONE `preflight` measured (the all-reduce table and its verdict)."""
        return PreflightResult.read(self._checked().preflight)

    def ray_report(self) -> dict[str, Any]:
        """What a DONE `preflight --ray` found: the Ray nodes, their addresses and GPUs."""
        from slurm_vllm.core.preflight import ray_report

        return ray_report(self._checked(), self.job_id)

    def endpoint(self) -> Endpoint:
        """The endpoint of a READY job (url, model, api_key()); SlurmVllmError if not serving."""
        info = self._checked().read_stage()
        if not self.dir.endpoint.exists():
            raise SlurmVllmError(f"job {self.job_id}: no endpoint yet (stage {info})")
        if info.stage != Stage.READY:
            raise SlurmVllmError(f"job {self.job_id}: the endpoint is gone (stage {info})")
        ep = Endpoint.read(self.dir.endpoint)
        if ep.api_key_file is not None and Path(ep.api_key_file) != self.dir.api_key:
            raise JobFolderError(f"{self.dir.endpoint}: api_key_file {ep.api_key_file} is not this job's "
                                 f"key file ({self.dir.api_key}): refused")
        return ep

    def log_files(self, rank: int | None = None) -> list[Path]:
        """The batch step's output, then Ray's, vLLM's and each task's; those of RANK only if given."""
        batch = self._checked().batch_log
        files = [*([batch] if batch.exists() else []), *sorted(self.dir.logs.glob("*.log")),
                 *sorted(self.dir.logs.glob("task-*.out"))]
        if rank is None:
            return files
        return [f for f in files if f.stem.endswith(f"-{rank}")]

    def logs(self, rank: int | None = None, lines: int = 40) -> Iterator[tuple[Path, str]]:
        """(file, its last LINES lines) for each log file (of RANK if given)."""
        for f in self.log_files(rank):
            try:
                text = "\n".join(safefile.tail(f, lines))
            except FileNotFoundError:
                continue
            except JobFolderError as exc:
                text = f"(not read: {exc})"
            yield f, safefile.printable(text)

    def cancel(self) -> None:
        """scancel the job: every rank stops vLLM, Ray and its containers, and the stage says so."""
        from slurm_vllm.core.slurm import cancel

        job_id = self.job_id
        if not job_id:
            raise SlurmVllmError(f"{self.dir.path}: no job id recorded")
        cancel(job_id)

# The final stage an array shows when its shards ended differently: the worst one.
WORST_FIRST = (Stage.FAILED, Stage.TIMEOUT, Stage.CANCELLED)

class ArrayJob:
    """A sharded batch (batch.shards: K): a Slurm job array whose K tasks are jobs of their own,
    each with its folder `<name>-<array id>_<k>`. Its status sums the shards' progress; it is DONE
    when every shard is (their last merge has written the whole output), else it ends as the worst
    of the shards' ends. wait, cancel (the whole array) and logs as for a Job."""

    def __init__(self, array_id: str, shards: list[Job], plan: Plan | None = None) -> None:
        self.array_id, self.shards, self._plan = array_id, shards, plan

    def __repr__(self) -> str:
        return f"ArrayJob({self.array_id!r}, {len(self.shards)} shards)"

    @property
    def job_id(self) -> str:
        return self.array_id

    @property
    def path(self) -> Path:
        """Where the shards' folders are: `<jobs_root>/<name>-<array id>_*`."""
        first = self.shards[0].path
        return first.with_name(first.name.rpartition("_")[0] + "_*")

    def plan(self) -> Plan:
        return self._plan or self.shards[0].plan()

    def status(self) -> Status:
        from slurm_vllm.core.slurm import jobs_state

        ids = [j.job_id for j in self.shards]
        known = jobs_state([i for i in ids if i])          # one squeue (and sacct) for every shard
        each = [j.status_given(i, known[i].state if i and i in known else None)
                for j, i in zip(self.shards, ids, strict=True)]
        running = [s for s in each if not s.stage.final]
        counts: dict[str, int] = {}
        for s in each:
            counts[s.stage.value] = counts.get(s.stage.value, 0) + 1
        said = ", ".join(f"{n} {stage}" for stage, n in counts.items())
        batch = sum_progress([s.batch for s in each if s.batch is not None], each)
        if running:
            stage = min((s.stage for s in running), key=ORDER.index)
            detail = f"{batch.line() + '; ' if batch and stage == Stage.BATCH else ''}shards: {said}"
        else:
            ended = [s for s in each if s.stage != Stage.DONE]
            worst = min(ended, key=lambda s: WORST_FIRST.index(s.stage) if s.stage in WORST_FIRST
                        else len(WORST_FIRST)) if ended else None
            stage = worst.stage if worst else Stage.DONE
            detail = (f"shard {worst.job_id}: {worst.detail} (shards: {said})" if worst
                      else f"{batch.summary() if batch else ''} ({len(each)} shards)")
        states = sorted({s.slurm_state for s in each if s.slurm_state})
        return Status(self.array_id, self.path, stage, detail, ",".join(states) or None,
                      max(s.since for s in each), batch)

    def wait(self, stage: Stage | None = None, timeout: float | None = None,
             progress: Callable[[Status], None] | None = None, poll: float = 2.0) -> Status:
        """As Job.wait, over every shard (by default until DONE)."""
        return wait_for(self.status, stage or Stage.DONE, timeout, progress, poll)

    def endpoint(self) -> Endpoint:
        raise SlurmVllmError(f"job {self.array_id}: a sharded batch has no endpoint (its servers are "
                             f"private)")

    def log_files(self, rank: int | None = None) -> list[Path]:
        return [f for j in self.shards for f in j.log_files(rank)]

    def logs(self, rank: int | None = None, lines: int = 40) -> Iterator[tuple[Path, str]]:
        for j in self.shards:
            yield from j.logs(rank, lines)

    def cancel(self) -> None:
        """scancel the whole array (every shard keeps its completed lines)."""
        from slurm_vllm.core.slurm import cancel

        cancel(self.array_id)
