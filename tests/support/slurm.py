"""Small helpers over the real Slurm commands for tests: submit and wait, read sacct."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

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
