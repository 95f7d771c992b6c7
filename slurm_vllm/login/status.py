"""A job as the login node sees it: the ranks' stage reconciled with Slurm's state, and waiting on it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slurm_vllm.batch.merge import merged_output
from slurm_vllm.core import safefile
from slurm_vllm.core.errors import SlurmVllmError, WaitTimeout
from slurm_vllm.core.records import BatchProgress, Stage, StageInfo

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

class JobEnded(SlurmVllmError):
    """A wait ended because the job did: FAILED, CANCELLED, TIMEOUT, or DONE before the stage waited for."""

    def __init__(self, status: Status) -> None:
        super().__init__(f"job {status.job_id}: {status}")
        self.status = status

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

def sum_progress(parts: list[BatchProgress], each: list[Status]) -> BatchProgress | None:
    """The shards' batch counts as one (the rate: of those still sending); None before any sends."""
    if not parts:
        return None
    sending = [p for p in parts if not p.finished]

    return BatchProgress(
        output=str(merged_output(Path(parts[0].output))), total=sum(p.total for p in parts),
        done=sum(p.done for p in parts),
        resumed=sum(p.resumed for p in parts), ok=sum(p.ok for p in parts),
        refused=sum(p.refused for p in parts), lost=sum(p.lost for p in parts),
        in_flight=sum(p.in_flight for p in parts), tokens_in=sum(p.tokens_in for p in parts),
        tokens_out=sum(p.tokens_out for p in parts), elapsed=max(p.elapsed for p in parts),
        rate=round(sum(p.rate for p in sending) if sending else sum(p.rate for p in parts), 3),
        finished=len(parts) == len(each) and all(p.finished for p in parts))
