"""jinja2 (StrictUndefined, a shell-quote filter) → the plain sbatch script of a job; sbatch flags."""

from __future__ import annotations

import shlex
from pathlib import Path

import jinja2

from . import __version__
from .errors import SpecError
from .plan import Plan
from .spec import JobSpec

# sbatch flags slurm_vllm sets itself; slurm.extra_directives may not set them.
MANAGED = {
    "job-name": "name", "nodes": "slurm.nodes", "ntasks": "(one task per node)",
    "ntasks-per-node": "(one task per node)", "gpus-per-node": "slurm.gpus_per_node",
    "gpus": "slurm.gpus_per_node", "cpus-per-task": "slurm.cpus_per_task", "mem": "slurm.mem",
    "partition": "slurm.partition", "account": "slurm.account", "qos": "slurm.qos",
    "time": "slurm.time", "constraint": "slurm.constraint", "exclusive": "slurm.exclusive",
    "output": "(logs live in the job folder)", "error": "(logs live in the job folder)",
    "signal": "(slurm_vllm handles the time limit)", "array": "(one server per job)",
    "wrap": "(the script is slurm_vllm's)", "open-mode": "(set by slurm_vllm)",
}
SPEC_END = "SLURM_VLLM_SPEC"


def template_dir() -> Path:
    """sbatch_templates/: inside the installed package, or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "sbatch_templates", here.parent / "sbatch_templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("slurm_vllm's sbatch_templates folder is missing from this installation")


def environment(extra_dirs: tuple[Path, ...] = ()) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([*map(str, extra_dirs), str(template_dir())]),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False,
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    return env


def extra_directives(spec: JobSpec) -> list[tuple[str, str | None]]:
    """slurm.extra_directives as (flag, value) pairs; flags the tool manages are refused."""
    out: list[tuple[str, str | None]] = []
    for key, value in spec.slurm.extra_directives.items():
        flag = key.replace("_", "-").lstrip("-")
        if flag in MANAGED:
            raise SpecError(f"slurm.extra_directives.{key}: managed by slurm_vllm; use {MANAGED[flag]}")
        if value is False:
            continue
        out.append((flag, None if value is True else str(value)))
    return out


def directives(spec: JobSpec) -> list[str]:
    """Every #SBATCH flag of the job, in a stable order, values shell-quoted."""
    s = spec.slurm
    pairs: list[tuple[str, str | None]] = [("job-name", spec.name), ("nodes", str(s.nodes)),
                                           ("ntasks-per-node", "1")]
    if s.gpus_per_node:
        pairs.append(("gpus-per-node", str(s.gpus_per_node)))
    optional = {"cpus-per-task": s.cpus_per_task, "mem": s.mem, "partition": s.partition,
                "account": s.account, "qos": s.qos, "time": s.time, "constraint": s.constraint}
    pairs += [(k, str(v)) for k, v in optional.items() if v is not None]
    if s.exclusive:
        pairs.append(("exclusive", None))
    pairs.append(("signal", "USR2@90"))        # the ranks stop cleanly before the time limit
    pairs += extra_directives(spec)
    return [f"--{k}" if v is None else f"--{k}={shlex.quote(v)}" for k, v in pairs]


def sbatch_script(spec: JobSpec, plan: Plan, spec_yaml: str, python: str, source: str,
                  template: str = "job.sbatch.j2", extra_dirs: tuple[Path, ...] = ()) -> str:
    """The plain sbatch script that runs SPEC: a node `init` step, then one task per node."""
    if any(line.strip() == SPEC_END for line in spec_yaml.splitlines()):
        raise SpecError(f"the spec may not contain a line {SPEC_END!r}")
    return environment(extra_dirs).get_template(template).render(
        directives=directives(spec), version=__version__, source=source, name=spec.name,
        jobs_root=str(spec.jobs_root_path), setup=list(spec.slurm.setup), python=python,
        spec_yaml=spec_yaml if spec_yaml.endswith("\n") else spec_yaml + "\n",
        tp_pp=f"{plan.nodes} nodes x {plan.gpus_per_node} GPUs: tensor parallel {plan.tp} x "
              f"pipeline parallel {plan.pp}, served as {plan.served_name!r}",
    )
