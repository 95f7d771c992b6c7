"""`list`: this user's jobs as rows (id, name, stage, nodes, TPxPP, URL or batch progress, age, time
left) and a table."""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from slurm_vllm.core import index, safefile
from slurm_vllm.core.errors import SlurmVllmError
from slurm_vllm.core.records import Endpoint, Stage
from slurm_vllm.core.slurm import SlurmJob, jobs_state
from slurm_vllm.login.api import Job, jobs
from slurm_vllm.login.status import reconcile


@dataclass(frozen=True)
class Row:
    job_id: str
    name: str
    stage: str
    nodes: int
    tp_pp: str
    url: str
    age_s: float
    time_left: str
    job_dir: str
    progress: str = ""            # a batch job's `k/N done, R req/s, ETA` while it sends

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def row(job: Job, slurm: SlurmJob | None, now: float) -> Row:
    """One job's row, from its folder and Slurm's view (a pure function of those)."""
    plan = job.plan()
    info = job.dir.read_stage()
    stage, _ = reconcile(info, slurm.state if slurm else None)
    url = ""
    if stage == Stage.READY and job.dir.endpoint.exists():
        url = Endpoint.read(job.dir.endpoint).url
    progress = info.detail if stage == Stage.BATCH else ""
    if stage == Stage.READY and plan.replicas > 1:          # "1/2 replicas" while one is away
        progress = " ".join(re.findall(r"\((\d+/\d+ replicas)", info.detail)[:1])
    return Row(job_id=job.job_id or "?", name=plan.name, stage=stage.value, nodes=plan.nodes,
               tp_pp=f"{f'{plan.replicas}x' if plan.replicas > 1 else ''}TP{plan.tp}xPP{plan.pp}", url=url,
               age_s=round(now - job.dir.plan.stat().st_mtime, 1) if job.dir.plan.exists() else 0.0,
               time_left=(slurm.time_left or "") if slurm and not stage.final else "", job_dir=str(job.path),
               progress=progress)


def rows(jobs_root: Path | str | None = None, include_ended: bool = False,
         states: dict[str, SlurmJob] | None = None) -> list[Row]:
    """This user's jobs, newest first; only those not ended unless INCLUDE_ENDED. STATES: Slurm's
    view of them (default: asked from squeue and sacct). An indexed job whose folder was never made
    and that Slurm does not know is gone: its index entry is removed."""
    found = jobs(jobs_root)
    if states is None:
        ids = [j for j in (job.job_id for job in found) if j]
        states = jobs_state(ids, [job.job_id for job in found if job.job_id and not _ended(job)])
    now = time.time()
    out = []
    for job in found:
        if not job.dir.path.exists() and (job.job_id or "") not in states:
            if job.job_id:
                index.forget(job.job_id)
            continue
        try:
            r = row(job, states.get(job.job_id or ""), now)
        except SlurmVllmError:       # a folder being written, or not slurm_vllm's: not a row
            continue
        if include_ended or not Stage(r.stage).final:
            out.append(r)
    return out


def _ended(job: Job) -> bool:
    """Did the job's ranks write a final stage? (Then Slurm's accounting has nothing to add.)"""
    try:
        return job.dir.stage_file.exists() and job.dir.read_stage().stage.final
    except SlurmVllmError:
        return False


def age(seconds: float) -> str:
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def shown(r: Row) -> str:
    """The last column: the URL, the progress (a batch's; how many replicas serve), or both."""
    if r.url and r.progress:
        return f"{r.url} ({r.progress})"
    return r.url or r.progress or "-"


def table(found: list[Row]) -> str:
    if not found:
        return "no jobs (list --all shows the ended ones too)"
    head = ("JOBID", "NAME", "STAGE", "NODES", "TPxPP", "AGE", "LEFT", "URL / PROGRESS")
    lines = [head] + [(r.job_id, r.name, r.stage, str(r.nodes), r.tp_pp, age(r.age_s), r.time_left or "-",
                       shown(r)) for r in found]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)
    return safefile.printable(text)


