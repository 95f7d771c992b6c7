"""The job's one sbatch script (render.py) → sbatch, through submitit → the Slurm job id and folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from slurm_vllm.core.errors import JobFolderError, SpecError, SubmitError
from slurm_vllm.core.jobdir import make_private_dir
from slurm_vllm.core.jobsroot import prepare_jobs_root
from slurm_vllm.core.plan import Plan
from slurm_vllm.core.render import sbatch_text
from slurm_vllm.core.spec import JobSpec


def submit(spec: JobSpec, plan: Plan) -> tuple[str, Path]:
    """Submit the script `render` prints for SPEC; return (job id, job folder).

    The job folder (<jobs_root>/<name>-<job id>) is made by the script's init step when the job
    starts, from the spec and plan embedded in it, and init records the script Slurm ran as
    job.sbatch: the same text for `submit` and `render`. submitit calls sbatch and reads the job id;
    its own files go to <jobs_root>/.submitit, a 0700 folder of this user's (checked, not trusted by
    its name: in a shared jobs_root another user may have made it first).
    """
    try:
        import submitit  # only when submitting: keeps `--help`, validate and render light
    except ImportError as exc:
        raise SubmitError(f"submitit is not installed for {sys.executable}: pip install "
                          f"slurm_vllm (or submitit) into this Python") from exc

    text = sbatch_text(spec, plan, spec.slurm.python or sys.executable)
    root = spec.jobs_root_path
    prepare_jobs_root(root)
    try:                     # the script waits here for sbatch: no one else may read or swap it
        make_private_dir(root / ".submitit")
    except JobFolderError as exc:
        raise SpecError(f"jobs_root: {exc}") from None
    except OSError as exc:
        raise SubmitError(f"jobs_root: cannot create {root / '.submitit'}: {exc.strerror}") from exc

    class Executor(submitit.SlurmExecutor):
        """submitit's Slurm executor submitting slurm_vllm's script instead of its own."""

        def _make_submission_file_text(self, command: str, uid: str) -> str:
            return text

    executor = Executor(folder=root / ".submitit")
    executor.update_parameters(nodes=plan.nodes)         # submitit's count of the job's tasks
    try:
        job: Any = executor._submit_command("slurm_vllm")  # the command is in the text already
    except Exception as exc:  # submitit raises its own errors and subprocess ones
        raise SubmitError(f"sbatch refused the job: {str(exc).strip().splitlines()[-1]}") from exc
    job_id = str(job.job_id)
    return job_id, root / f"{spec.name}-{job_id}"
