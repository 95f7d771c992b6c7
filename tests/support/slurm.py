"""Small helpers over the real Slurm commands for tests: submit and wait, read sacct, cut a time limit."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

WARN_SIGNAL = 90        # a job's --signal=USR2@90 (slurm_vllm's render)
SLURM_PERIOD = 30       # slurmctld checks time limits (and sends the warning signal) every 30 s
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


def sbatch_wait(script: Path, timeout: float, *args: str) -> str:
    """`sbatch --wait` SCRIPT from its folder; return the job id. Cancels the job on timeout."""
    proc = subprocess.Popen(["sbatch", "--parsable", "--wait", *args, str(script)], cwd=script.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        job = out.strip().split(";")[0]
        if job:
            subprocess.run(["scancel", job], check=False)
        raise AssertionError(f"job {job or '?'} did not end within {timeout:.0f} s") from None
    job = out.strip().split(";")[0]
    assert job.isdigit(), f"sbatch said: {out}{err}"
    return job


def sacct_state(job: str, timeout: float = 30) -> str:
    """The job's final state as slurmdbd recorded it (accounting is asynchronous: poll)."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "State"],
                             capture_output=True, text=True).stdout.split()
        state = out[0] if out else ""
        if state.split()[0:1] and state.split()[0] in FINAL:
            return state
        time.sleep(0.2)
    return state


def run_seconds(job_id: str) -> int:
    """How long the job has run (scontrol's RunTime, [D-]HH:MM:SS)."""
    info = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                          check=True).stdout
    runtime = next(word.split("=", 1)[1] for word in info.split() if word.startswith("RunTime="))
    days, _, clock = runtime.rpartition("-")
    h, m, sec = (int(part) for part in clock.split(":"))
    return (int(days) if days else 0) * 86400 + h * 3600 + m * 60 + sec


def end_soon(job_id: str) -> int:
    """As the cluster's admin: cut the job's time limit so that it ends 60-120 s from now (TimeLimit is
    whole minutes from the start). slurmctld sends the warning signal at its first periodic check at
    which the end is within WARN_SIGNAL + SLURM_PERIOD s (measured on the test bed: the signal came
    26 s after such an update, 92 s before the end), so SIGUSR2 comes within SLURM_PERIOD s and the
    run still has over 30 s to stop cleanly and requeue itself. The new limit in minutes."""
    minutes = (run_seconds(job_id) + WARN_SIGNAL + SLURM_PERIOD) // 60
    subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}"], check=True)
    return minutes


def allocation(job: str) -> list[str]:
    """The job's nodes, from Slurm (squeue's node list, expanded by scontrol)."""
    nodelist = subprocess.run(["squeue", "-h", "-j", job, "-o", "%N"], capture_output=True, text=True,
                              check=True).stdout.strip()
    return subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                          check=True).stdout.split()
