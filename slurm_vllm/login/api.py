"""The Python API the CLI prints from: validate, render, submit a spec; then a job's status, wait,
endpoint, logs, cancel (job.py); merge a sharded batch; jobs().

    import slurm_vllm
    job = slurm_vllm.submit("job.yaml")                   # or a JobSpec
    job.wait(timeout=1800, progress=print)                # READY (DONE for a batch), or JobEnded
    ep = job.endpoint()                                   # url, model, api_key()
    ...
    job.cancel()

Nothing here imports ray or vllm; submitit only inside submit().
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from slurm_vllm.core import index
from slurm_vllm.core.errors import JobFolderError, SpecError, UsageError
from slurm_vllm.core.index import IndexEntry
from slurm_vllm.core.jobdir import JobDir, is_job_id
from slurm_vllm.core.jobsroot import find
from slurm_vllm.core.plan import Backend, Mode, Plan
from slurm_vllm.core.spec import DEFAULT_JOBS_ROOT, BatchSpec, JobSpec
from slurm_vllm.login.job import ArrayJob, Job, JobHandle, wait_target
from slurm_vllm.login.status import JobEnded, Status

if TYPE_CHECKING:
    from slurm_vllm.batch.merge import MergeResult
    from slurm_vllm.batch.reader import InputSummary

__all__ = ["ArrayJob", "Job", "JobEnded", "JobHandle", "Status", "Validation", "check_batch_input",
           "default_jobs_root", "job", "jobs", "load", "merge", "network_notice", "render", "submit",
           "validate", "wait_target"]


def default_jobs_root() -> Path:
    """$SLURM_VLLM_JOBS_ROOT, else ~/.slurm_vllm/jobs."""
    return Path(os.path.expandvars(os.environ.get("SLURM_VLLM_JOBS_ROOT") or DEFAULT_JOBS_ROOT)).expanduser()


def load(spec: JobSpec | str | Path) -> tuple[JobSpec, Plan]:
    """A spec (file or JobSpec) and its plan, checked as `validate` checks them."""
    from slurm_vllm.core import plan as plan_mod
    from slurm_vllm.core import spec as spec_mod

    job_spec = spec if isinstance(spec, JobSpec) else spec_mod.load(str(spec))
    return job_spec, plan_mod.make(job_spec)


class NetworkNotice(UserWarning):
    """What other users on the cluster's network can see of a submitted multi-node job."""


def network_notice(plan: Plan) -> str | None:
    """What other users on the nodes' network can see of a multi-node job (None for one node): said
    at validate and submit until vLLM's inter-node traffic can be protected (README: Security)."""
    if plan.nodes < 2:
        return None
    router = ("the router's requests to the replicas (with the API key) and " if plan.replicas > 1 else "")
    return (f"this job spans {plan.nodes} nodes: {router}vLLM's traffic between them (the engine's ZeroMQ "
            f"broadcast of each request's tokens, torch.distributed) carries no authentication or "
            f"encryption, so other users on the nodes' network can read prompts; see README, "
            f"'Multi-node traffic'")


def check_batch_input(spec: JobSpec, plan: Plan) -> InputSummary | None:
    """A batch job's whole input, checked streaming before anything is submitted (BatchInputError,
    exit 2, names the lines); None for a serving job."""
    if spec.mode != "batch":
        return None
    from slurm_vllm.batch.output import check_output
    from slurm_vllm.batch.reader import validate

    input_path = Path(spec.batch.input or "").expanduser()
    summary = validate(input_path, plan.served_name)
    check_output(spec.batch_output, input_path, spec.batch_parts)
    return summary


def layout(plan: Plan) -> str:
    """Which nodes of the allocation (in Slurm's order) form which replica."""
    n = plan.replica_nodes
    return ", ".join(f"replica {k} on node {k * n + 1}" if n == 1 else
                     f"replica {k} on nodes {k * n + 1}-{k * n + n}" for k in range(plan.replicas))


@dataclass(frozen=True)
class Validation:
    """What `validate` found: the spec, its plan, a batch input's summary, the network notice."""

    spec: JobSpec
    plan: Plan
    batch: InputSummary | None
    notice: str | None

    def lines(self) -> list[str]:
        """The `ok:` lines validate prints."""
        spec, plan, c = self.spec, self.plan, self.spec.container
        where = "the node's environment" if c.runtime == "none" else f"{c.runtime} image {c.image}"
        out = [f"ok: {spec.name}: {plan.nodes} nodes x {plan.gpus_per_node} GPUs -> tensor parallel "
               f"{plan.tp} x pipeline parallel {plan.pp}, backend {plan.backend.value}"
               f"{' (auto)' if spec.backend == 'auto' else ''}; {plan.served_name!r} from {plan.model_path} "
               f"in {where}"]
        if plan.replicas > 1:
            out[0] = out[0].replace(" -> ", f" -> {plan.replicas} replicas of ", 1)
            out.append(f"ok: layout: {layout(plan)}; one endpoint on the first node (sglang-router)")
        if self.batch is not None:
            urls = ", ".join(f"{n} {u}" for u, n in sorted(self.batch.by_url.items()))
            out.append(f"ok: batch input {spec.batch.input}: {self.batch.requests} requests ({urls}); "
                       f"results to {spec.batch_output}")
        return out


def validate(spec: JobSpec | str | Path) -> Validation:
    """Every check submit makes, without submitting: the spec, its plan, a batch's whole input and
    output, and the script (directives, a user's template) rendered as submit would."""
    from slurm_vllm.core.render import sbatch_text

    job_spec, plan = load(spec)
    batch = check_batch_input(job_spec, plan)
    sbatch_text(job_spec, plan, job_spec.slurm.python or sys.executable)
    return Validation(job_spec, plan, batch, network_notice(plan))


def render(spec: JobSpec | str | Path, template: str | None = None) -> str:
    """The job as a plain sbatch script (the one submit hands to Slurm); makes jobs_root, where
    Slurm opens the batch log."""
    from slurm_vllm.core.jobsroot import prepare_jobs_root
    from slurm_vllm.core.render import sbatch_text

    job_spec, plan = load(spec)
    text = sbatch_text(job_spec, plan, job_spec.slurm.python or sys.executable, template=template)
    prepare_jobs_root(job_spec.jobs_root_path)
    return text


def merge(ref: str | Path, jobs_root: Path | str | None = None) -> MergeResult:
    """Merge a sharded batch's parts into its output now (its last shard does it too); REF is the
    spec file or the job (id or folder)."""
    from slurm_vllm.batch.merge import merge as merge_parts
    from slurm_vllm.core import spec as spec_mod

    if Path(ref).is_file():
        job_spec = spec_mod.load(ref)
    else:
        found = job(str(ref), jobs_root)
        one = found.shards[0] if isinstance(found, ArrayJob) else found
        job_spec = one.dir.read_spec()
    if job_spec.mode != "batch":
        raise UsageError(f"merge: {job_spec.name} is not a batch (mode: {job_spec.mode})")
    return merge_parts(job_spec.batch_output, job_spec.batch_parts,
                       Path(job_spec.batch.input or "").expanduser())


def submit(spec: JobSpec | str | Path, preflight_only: bool = False,
           ray_only: bool = False) -> Job | ArrayJob:
    """Submit SPEC (a YAML file or a JobSpec); the Job returns at once (wait() for READY, or for
    DONE in batch mode). A batch input is checked first; a sharded batch is an ArrayJob.
    PREFLIGHT_ONLY: the all-reduce only; RAY_ONLY: the Ray cluster only (every node joined and on
    the right network); either ends DONE without vLLM, as one allocation."""
    from slurm_vllm.login.sbatch import submit as sbatch

    if preflight_only and ray_only:
        raise ValueError("preflight_only and ray_only exclude each other")
    job_spec, plan = load(spec)
    if ray_only and job_spec.backend == "auto":     # the Ray cluster is what is asked for
        plan = replace(plan, backend=Backend.RAY)
    if ray_only and plan.backend is not Backend.RAY:
        raise SpecError(f"backend: {plan.backend.value} starts no Ray cluster; "
                        f"preflight --ray needs backend: ray")
    if preflight_only or ray_only:    # one allocation, no vLLM: neither a batch nor an array
        job_spec = replace(job_spec, mode="serve", batch=BatchSpec())
        plan = replace(plan, mode=Mode.PREFLIGHT if preflight_only else Mode.RAY, shards=1,
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
