"""Slurm's view of a job (squeue, then sacct) and scancel, through the subprocess wrapper."""

from __future__ import annotations

from . import proc

ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE")


def job_state(job_id: str) -> str | None:
    """PENDING, RUNNING, COMPLETED, CANCELLED… or None if Slurm does not know the job (yet)."""
    out = proc.run(["squeue", "-h", "-j", job_id, "-o", "%T"], check=False, timeout=30).stdout.split()
    if out:
        return out[0]
    acct = proc.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"], check=False, timeout=30)
    states = acct.stdout.split()
    return states[0] if states else None


def cancel(job_id: str) -> None:
    proc.run(["scancel", job_id], timeout=30)
