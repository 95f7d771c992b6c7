"""Plan → submitit executor parameters → a submitted job in a fresh job folder."""

from __future__ import annotations

import shlex
import shutil
import sys
import time
from typing import Any

from .errors import SubmitError
from .jobdir import JobDir, link_job_id
from .plan import Plan
from .render import extra_directives
from .spec import JobSpec, dump


def executor_parameters(spec: JobSpec) -> dict[str, Any]:
    """submitit parameters for SPEC: one task per node, flags like the rendered script's."""
    s = spec.slurm
    extra: dict[str, Any] = {"time": s.time}
    extra.update({k: (True if v is None else v) for k, v in extra_directives(spec)})
    params: dict[str, Any] = {
        "name": spec.name, "nodes": s.nodes, "tasks_per_node": 1,
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
        "slurm_setup": list(s.setup), "slurm_additional_parameters": extra,
    }
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if s.cpus_per_task:
        params["cpus_per_task"] = s.cpus_per_task
    optional = {"slurm_mem": s.mem, "slurm_partition": s.partition, "slurm_account": s.account,
                "slurm_qos": s.qos, "slurm_constraint": s.constraint}
    params.update({k: v for k, v in optional.items() if v is not None})
    if s.exclusive:
        params["slurm_exclusive"] = True
    return params


def new_job_dir(spec: JobSpec) -> JobDir:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = spec.jobs_root_path
    for n in range(100):
        path = root / (f"{spec.name}-{stamp}" + (f"-{n}" if n else ""))
        if not path.exists():
            return JobDir(path)
    raise SubmitError(f"{root}: cannot find a fresh job folder name")


def submit(spec: JobSpec, plan: Plan) -> tuple[str, JobDir]:
    """Create the job folder, submit one task per node running node.main, return (job id, folder)."""
    import submitit  # only when submitting: keeps `--help`, validate and render light

    from . import node

    jd = new_job_dir(spec)
    try:
        spec.jobs_root_path.mkdir(parents=True, exist_ok=True)
        jd.create(dump(spec), plan.to_json(), api_key=plan.api_key)
    except OSError as exc:
        raise SubmitError(f"jobs_root: cannot create the job folder {jd.path}: {exc.strerror}") from exc
    try:
        executor = submitit.AutoExecutor(folder=str(jd.submitit), cluster="slurm",
                                         slurm_python=shlex.quote(spec.slurm.python or sys.executable))
        executor.update_parameters(**executor_parameters(spec))
        job = executor.submit(node.run_task, str(jd.path))
    except Exception as exc:  # submitit raises its own errors and subprocess ones
        shutil.rmtree(jd.path, ignore_errors=True)
        raise SubmitError(f"sbatch refused the job: {str(exc).strip().splitlines()[-1]}") from exc
    job_id = str(job.job_id)
    jd.job_id_file.write_text(job_id + "\n")
    submission = jd.submitit / f"{job_id}_submission.sh"
    if submission.exists():
        shutil.copy(submission, jd.sbatch)
    link_job_id(spec.jobs_root_path, job_id, jd.path)
    return job_id, jd
