"""The Python API the CLI prints from: submit a spec, then Job.status/wait/endpoint/logs/cancel; jobs().

    import slurm_vllm
    job = slurm_vllm.submit("job.yaml")                   # or a JobSpec
    job.wait(timeout=1800, progress=print)                # READY, or JobEnded with the reason
    ep = job.endpoint()                                   # url, model, api_key()
    ...
    job.cancel()

Nothing here imports ray or vllm; submitit only inside submit().
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import index, safefile
from .errors import JobEnded, JobFolderError, SlurmVllmError, SpecError, WaitTimeout
from .index import IndexEntry
from .jobdir import JobDir, find, is_job_id
from .plan import Plan
from .records import BatchProgress, Endpoint, Stage, StageInfo
from .spec import DEFAULT_JOBS_ROOT, BatchSpec, JobSpec

if TYPE_CHECKING:
    from .batchio import InputSummary

# Progress order of the stages that are not final (a wait for LOADING is over at READY too).
ORDER = (Stage.PENDING, Stage.STARTING, Stage.PREFLIGHT, Stage.RAY_HEAD, Stage.RAY_JOINED, Stage.LOADING,
         Stage.READY, Stage.BATCH)
# Slurm states that end a job, and the stage a job shows when it ended without its ranks saying why.
SLURM_ENDED = {"COMPLETED": Stage.DONE, "CANCELLED": Stage.CANCELLED, "TIMEOUT": Stage.TIMEOUT,
               "DEADLINE": Stage.TIMEOUT, "FAILED": Stage.FAILED, "NODE_FAIL": Stage.FAILED,
               "OUT_OF_MEMORY": Stage.FAILED, "PREEMPTED": Stage.FAILED, "BOOT_FAIL": Stage.FAILED}


@dataclass(frozen=True)
class Status:
    """A job as the login node sees it: the ranks' stage, reconciled with Slurm's state."""

    job_id: str | None
    job_dir: Path
    stage: Stage
    detail: str
    slurm_state: str | None
    since: float = 0.0            # when the ranks wrote the stage (time.time()); 0: not yet
    batch: BatchProgress | None = None    # a batch job's counts (batch.json), once it sends

    def __str__(self) -> str:          # printable: the detail may quote a log line
        return safefile.printable(f"{self.stage.value}{': ' + self.detail if self.detail else ''}")

    def to_dict(self) -> dict[str, object]:
        return {"job_id": self.job_id, "job_dir": str(self.job_dir), "stage": self.stage.value,
                "detail": self.detail, "slurm_state": self.slurm_state, "since": self.since,
                "batch": self.batch.to_dict() if self.batch else None}


def reconcile(info: StageInfo, slurm_state: str | None) -> tuple[Stage, str]:
    """The stage to show: the ranks' own, unless Slurm says the job ended (or has not started) first.

    A job killed before its head could write a final stage (node failure, scancel of a pending job,
    out of memory) shows Slurm's verdict; a final stage written by the ranks always wins.
    """
    if info.stage.final or not slurm_state:
        return info.stage, info.detail
    word = slurm_state.split()[0]
    if word in SLURM_ENDED:
        return SLURM_ENDED[word], info.detail or f"Slurm says {slurm_state}"
    if word == "PENDING":
        return Stage.PENDING, info.detail
    return info.stage, info.detail


def reached(current: Stage, target: Stage) -> bool:
    """Is a job at CURRENT at or past TARGET? Final stages are reached only by themselves."""
    if target.final or current.final:
        return current == target
    return ORDER.index(current) >= ORDER.index(target)


def default_jobs_root() -> Path:
    """$SLURM_VLLM_JOBS_ROOT, else ~/.slurm_vllm/jobs."""
    return Path(os.path.expandvars(os.environ.get("SLURM_VLLM_JOBS_ROOT") or DEFAULT_JOBS_ROOT)).expanduser()


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
        from .slurm import job_state

        job_id = self.job_id
        return self.status_given(job_id, job_state(job_id) if job_id else None)

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
        from .slurm import ended_detail

        out = self.dir.path.parent / f"{self.dir.path.name}.out"
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

    def wait(self, stage: Stage = Stage.READY, timeout: float | None = None,
             progress: Callable[[Status], None] | None = None, poll: float = 2.0) -> Status:
        """Block until the job reaches STAGE; PROGRESS(status) on every change of stage or detail.

        Raises JobEnded when the job ends first (its status in the exception), WaitTimeout after
        TIMEOUT seconds (the job keeps running). Polls fast at first, then every POLL seconds.
        """
        return wait_for(self.status, stage, timeout, progress, poll)

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
        batch = self._checked().path.parent / f"{self.dir.path.name}.out"
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
        from .slurm import cancel

        job_id = self.job_id
        if not job_id:
            raise SlurmVllmError(f"{self.dir.path}: no job id recorded")
        cancel(job_id)


def wait_for(status_of: Callable[[], Status], stage: Stage, timeout: float | None,
             progress: Callable[[Status], None] | None, poll: float) -> Status:
    """Job.wait and ArrayJob.wait: poll STATUS_OF() until STAGE, the job's end, or TIMEOUT."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay, last = 0.2, ""
    while True:
        status = status_of()
        if progress is not None and f"{status}|{status.slurm_state}" != last:
            progress(status)
        last = f"{status}|{status.slurm_state}"
        if reached(status.stage, stage):
            return status
        if status.stage.final:
            raise JobEnded(status)
        if deadline is not None and time.monotonic() >= deadline:
            raise WaitTimeout(f"job {status.job_id}: still {status} after {timeout:.0f} s")
        time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))
        delay = min(delay * 1.5, poll)


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
        from .slurm import jobs_state

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

    def wait(self, stage: Stage = Stage.DONE, timeout: float | None = None,
             progress: Callable[[Status], None] | None = None, poll: float = 2.0) -> Status:
        """As Job.wait, over every shard."""
        return wait_for(self.status, stage, timeout, progress, poll)

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
        from .slurm import cancel

        cancel(self.array_id)


def sum_progress(parts: list[BatchProgress], each: list[Status]) -> BatchProgress | None:
    """The shards' batch counts as one (the rate: of those still sending); None before any sends."""
    if not parts:
        return None
    sending = [p for p in parts if not p.finished]
    from .batchio import merged_output

    return BatchProgress(
        output=str(merged_output(Path(parts[0].output))), total=sum(p.total for p in parts),
        done=sum(p.done for p in parts),
        resumed=sum(p.resumed for p in parts), ok=sum(p.ok for p in parts),
        refused=sum(p.refused for p in parts), lost=sum(p.lost for p in parts),
        in_flight=sum(p.in_flight for p in parts), tokens_in=sum(p.tokens_in for p in parts),
        tokens_out=sum(p.tokens_out for p in parts), elapsed=max(p.elapsed for p in parts),
        rate=round(sum(p.rate for p in sending) if sending else sum(p.rate for p in parts), 3),
        finished=len(parts) == len(each) and all(p.finished for p in parts))


def load(spec: JobSpec | str | Path) -> tuple[JobSpec, Plan]:
    """A spec (file or JobSpec) and its plan, checked as `validate` checks them."""
    from . import plan as plan_mod
    from . import spec as spec_mod

    job_spec = spec if isinstance(spec, JobSpec) else spec_mod.load(str(spec))
    return job_spec, plan_mod.make(job_spec)


class NetworkNotice(UserWarning):
    """What other users on the cluster's network can see of a submitted multi-node job."""


def network_notice(plan: Plan) -> str | None:
    """What other users on the nodes' network can see of a multi-node job (None for one node): said
    at validate and submit until vLLM's inter-node traffic can be protected (README: Security)."""
    if plan.nodes < 2:
        return None
    return (f"this job spans {plan.nodes} nodes: vLLM's traffic between them (the engine's ZeroMQ "
            f"broadcast of each request's tokens, torch.distributed) carries no authentication or "
            f"encryption, so other users on the nodes' network can read prompts; see README, "
            f"'Multi-node traffic'")


def check_batch_input(spec: JobSpec, plan: Plan) -> InputSummary | None:
    """A batch job's whole input, checked streaming before anything is submitted (BatchInputError,
    exit 2, names the lines); None for a serving job."""
    if spec.mode != "batch":
        return None
    from .batchio import validate
    from .batchout import check_output

    input_path = Path(spec.batch.input or "").expanduser()
    summary = validate(input_path, plan.served_name)
    check_output(spec.batch_output, input_path, spec.batch_parts)
    return summary


def submit(spec: JobSpec | str | Path, preflight_only: bool = False,
           ray_only: bool = False) -> Job | ArrayJob:
    """Submit SPEC (a YAML file or a JobSpec); the Job returns at once (wait() for READY, or for
    DONE in batch mode). A batch input is checked first; a sharded batch is an ArrayJob.
    PREFLIGHT_ONLY: the all-reduce only; RAY_ONLY: the Ray cluster only (every node joined and on
    the right network); either ends DONE without vLLM, as one allocation."""
    from .sbatch import submit as sbatch

    if preflight_only and ray_only:
        raise ValueError("preflight_only and ray_only exclude each other")
    job_spec, plan = load(spec)
    if ray_only and plan.backend != "ray":
        raise SpecError(f"backend: {plan.backend} starts no Ray cluster; preflight --ray needs backend: ray")
    if preflight_only or ray_only:    # one allocation, no vLLM: neither a batch nor an array
        job_spec = replace(job_spec, mode="serve", batch=BatchSpec())
        plan = replace(plan, mode="preflight" if preflight_only else "ray", shards=1,
                       preflight=False)     # mode "preflight" runs the all-reduce; "ray" skips it
    else:
        check_batch_input(job_spec, plan)
    job_id, folder = sbatch(job_spec, plan)
    root = job_spec.jobs_root_path
    if any(root.resolve().is_relative_to(p) for p in ("/tmp", "/var/tmp", "/dev/shm")):
        warnings.warn(f"jobs_root {root} is node-local on most clusters: the nodes cannot write the job "
                      f"folder there; use a file system they share", stacklevel=2)
    notice = network_notice(plan)
    if notice:
        warnings.warn(NetworkNotice(notice), stacklevel=2)
    if plan.shards > 1:
        shards = []
        for k in range(plan.shards):
            task_id, task_dir = f"{job_id}_{k}", folder.with_name(f"{folder.name}_{k}")
            index.record(task_id, task_dir, plan)
            shards.append(Job(task_dir, job_id=task_id, plan=plan))
        return ArrayJob(job_id, shards, plan)
    index.record(job_id, folder, plan)
    return Job(folder, job_id=job_id, plan=plan)


def _from_entry(entry: IndexEntry) -> Job:
    return Job(JobDir(Path(entry.job_dir)), job_id=entry.job_id, plan=entry.plan)


def job(ref: str, jobs_root: Path | str | None = None) -> Job | ArrayJob:
    """A job by folder or Slurm job id (this user's index first, then JOBS_ROOT/by-id)."""
    path = Path(ref).expanduser()
    if path.is_dir() and (path / "plan.json").exists():
        return Job(JobDir(path.resolve()).verified())
    if "/" in ref:              # a folder not made yet: a pending job's, if the index knows it
        for pending in index.entries():
            if Path(pending.job_dir) == path.resolve():
                return _from_entry(pending)
    root = Path(jobs_root).expanduser() if jobs_root else default_jobs_root()
    if is_job_id(ref):
        entry = index.lookup(ref)
        if ref.isdigit():        # a sharded batch's array id: its tasks are `<id>_<k>`
            array = _array(ref, root, newer_than=entry.submitted if entry else None)
            if array is not None:
                return array
        if entry is not None:
            return _from_entry(entry)
    return Job(find(ref, root))


def _array(array_id: str, root: Path, newer_than: float | None) -> ArrayJob | None:
    """The job array ARRAY_ID from the index (its tasks' entries), or else from ROOT/by-id; None if
    there is none, or if its tasks are older than NEWER_THAN (a plain job's entry with that id, after
    the cluster's ids restarted: the newest wins)."""
    entries = [e for e in index.entries() if e.job_id.startswith(f"{array_id}_")]
    if newer_than is not None and not any(e.submitted > newer_than for e in entries):
        return None
    tasks = {e.job_id: _from_entry(e) for e in entries}
    by_id = root / "by-id"
    if newer_than is None and by_id.is_dir():
        for link in by_id.glob(f"{array_id}_*"):
            tasks.setdefault(link.name, Job(find(link.name, root)))
    if not tasks:
        return None
    ordered = sorted(tasks.items(), key=lambda kv: int(kv[0].rpartition("_")[2]))
    return ArrayJob(array_id, [j for _, j in ordered])


def jobs(jobs_root: Path | str | None = None) -> list[Job]:
    """This user's jobs, newest first: those in the index (pending ones included), and the job
    folders in JOBS_ROOT if given."""
    found = {Path(e.job_dir): _from_entry(e) for e in sorted(index.entries(), key=lambda e: e.submitted)}
    if jobs_root is not None:
        for plan_file in Path(jobs_root).expanduser().glob("*/plan.json"):
            folder = JobDir(plan_file.parent.resolve())
            try:
                folder.verified()
            except JobFolderError:
                continue                  # someone else's folder in a shared jobs_root: not listed
            found.setdefault(folder.path, Job(folder))

    def started(j: Job) -> float:
        return j.dir.plan.stat().st_mtime if j.dir.plan.exists() else time.time()

    return sorted(found.values(), key=started, reverse=True)
