"""Slurm's view of jobs (squeue, then sacct) and scancel, through the subprocess wrapper."""

from __future__ import annotations

import re
from dataclasses import dataclass

from slurm_vllm.core import proc


@dataclass(frozen=True)
class SlurmJob:
    """One job as Slurm reports it: its state, and the time left while it is in the queue."""

    state: str
    time_left: str | None = None


def jobs_state(job_ids: list[str], accounting: list[str] | None = None) -> dict[str, SlurmJob]:
    """The state of each of JOB_IDS Slurm knows: one squeue of this user's jobs (filtered here: squeue
    -j fails on an id it forgot), then one sacct for the others (of ACCOUNTING only, if given: a job
    whose ranks wrote a final stage needs no accounting query); an id unknown to both is left out."""
    if not job_ids:
        return {}
    out: dict[str, SlurmJob] = {}
    queue = proc.run(["squeue", "-h", "--me", "-o", "%i|%T|%L"], check=False, timeout=30)
    for line in queue.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            for job in array_ids(parts[0]):
                if job in job_ids:
                    out[job] = SlurmJob(parts[1], parts[2] if parts[2] not in ("", "INVALID") else None)
    rest = [j for j in job_ids if j not in out and (accounting is None or j in accounting)]
    if rest:
        acct = proc.run(["sacct", "-X", "-n", "-P", "-j", ",".join(rest), "-o", "JobID,State"], check=False,
                        timeout=30)
        for line in acct.stdout.splitlines():
            ids, _, state = line.strip().partition("|")
            for job in array_ids(ids):
                if job in rest and state:
                    out[job] = SlurmJob(state)
    return out


def array_ids(shown: str) -> list[str]:
    """The job ids in one id as squeue and sacct show it: `123`, `123_4`, or the tasks of an array
    not started yet, `123_[0-3,7%2]` → 123_0 … 123_3, 123_7."""
    m = re.fullmatch(r"([0-9]+)_\[([0-9,-]+)(?:%[0-9]+)?\]", shown)
    if m is None:
        return [shown]
    out = []
    for part in m.group(2).split(","):
        first, _, last = part.partition("-")
        if first.isdigit() and (not last or last.isdigit()):
            out += [f"{m.group(1)}_{k}" for k in range(int(first), int(last or first) + 1)]
    return out


def job_state(job_id: str, accounting: bool = True) -> str | None:
    """PENDING, RUNNING, COMPLETED, CANCELLED… or None if Slurm does not know the job (yet; or, without
    ACCOUNTING, any more: only the queue is asked)."""
    found = jobs_state([job_id], None if accounting else []).get(job_id)
    return found.state if found else None


def ended_detail(job_id: str) -> str:
    """How Slurm says an ended job ended: `FAILED, exit code 127:0` (and the reason, if any)."""
    acct = proc.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode,Reason"],
                    check=False, timeout=30)
    for line in acct.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4 and parts[0] == job_id:
            reason = f", reason {parts[3]}" if parts[3] not in ("", "None") else ""
            return f"{parts[1]}, exit code {parts[2]}{reason}"
    return "ended"


def still_running(job_id: str) -> bool:
    """Does Slurm still hold JOB_ID as RUNNING? After `scancel` it says COMPLETING or CANCELLED at
    once; when srun --kill-on-bad-exit ends the job step after one task died, the job runs on."""
    out = proc.run(["scontrol", "show", "job", "-o", job_id], check=False, timeout=10)
    return " JobState=RUNNING " in f" {out.stdout} "


def cancel(job_id: str) -> None:
    proc.run(["scancel", job_id], timeout=30)


def end_job(job_id: str) -> bool:
    """Ask slurmctld to end JOB_ID now: a node of it dropped off the network, and srun may never hear
    from the tasks there again (it would hold the allocation until the time limit). False when
    slurmctld cannot be reached from here (the node that lost its link: the other side asks)."""
    try:
        return proc.run(["scancel", job_id], check=False, timeout=15).returncode == 0
    except proc.CommandError:
        return False
