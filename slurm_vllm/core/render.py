"""Spec + plan → the one sbatch script of a job (directives, setup, launch): what `submit` and `render` use.

There is one mapping from a spec to a job: the #SBATCH directives, the setup lines and the node
command below. `render` prints the script; `submit` hands the same text to sbatch (through
submitit); the node's `init` step records the script Slurm ran as job.sbatch. The plan is computed
once, here, and embedded: the node reads it and never plans again.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import jinja2
import jinja2.exceptions
import jinja2.sandbox

from slurm_vllm import __version__
from slurm_vllm.core import pyxis, safefile
from slurm_vllm.core.errors import SpecError
from slurm_vllm.core.plan import Plan
from slurm_vllm.core.spec import JobSpec, dump

SPEC_END = "SLURM_VLLM_SPEC"
PLAN_SEPARATOR = "--- # the plan, decided when the script was made (the node does not plan again)"
TEMPLATE = "job.sbatch.j2"
MAX_TEMPLATE_BYTES = 1 << 20


def template_dir() -> Path:
    """sbatch_templates/: inside the installed package, or at the top of a source checkout."""
    here = Path(__file__).resolve().parents[1]          # the package: slurm_vllm/
    for candidate in (here / "sbatch_templates", here.parent / "sbatch_templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("slurm_vllm's sbatch_templates folder is missing from this installation")


def extra_directives(spec: JobSpec) -> list[tuple[str, str | None]]:
    """slurm.extra_directives as (flag, value) pairs (flags slurm_vllm manages are refused in spec)."""
    out: list[tuple[str, str | None]] = []
    for key, value in spec.slurm.extra_directives.items():
        flag = key.replace("_", "-").lstrip("-")
        if value is False:
            continue
        out.append((flag, None if value is True else str(value)))
    return out


def sharded(spec: JobSpec) -> bool:
    """Is SPEC a job array (a batch over batch.shards servers)?"""
    return spec.mode == "batch" and spec.batch.shards > 1


def batch_log(spec: JobSpec) -> str:
    """The batch step's own output (the init step, srun's errors): beside the job folders, named like
    them (`<name>-<job id>.out`; a shard's `<name>-<array id>_<task>.out`)."""
    return f"{spec.jobs_root_path}/{spec.name}-{'%A_%a' if sharded(spec) else '%j'}.out"


def job_id_shell(spec: JobSpec) -> str:
    """The job id as the script's shell spells it: Slurm's, or a shard's `<array id>_<task>` (what
    squeue, sacct and scancel show and take)."""
    return '"${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' if sharded(spec) else '"$SLURM_JOB_ID"'


# What sbatch reads bare on an #SBATCH line (shlex's safe set: no quote, backslash, '#' or space).
_SBATCH_BARE = re.compile(r"[\w@%+=:,./-]+", re.ASCII)


def sbatch_quote(value: str) -> str:
    """VALUE as one word of an #SBATCH line, read back by sbatch exactly as VALUE.

    sbatch splits #SBATCH lines its own way, not as a shell does (src/sbatch/opt.c, _get_argument):
    a backslash escapes the next character anywhere, even inside quotes; ' and " open a quoted
    part; an unquoted # ends the line. So a value is bare when it is plain, else in double quotes
    with every backslash and double quote escaped. A line end cannot be carried: SpecError (the
    spec refuses control characters before this)."""
    if _SBATCH_BARE.fullmatch(value):
        return value
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise SpecError(f"#SBATCH value {value!r}: a control character cannot be carried on an #SBATCH line")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def directives(spec: JobSpec) -> list[str]:
    """Every #SBATCH flag of the job, in a stable order, each value quoted as sbatch reads it."""
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
    pairs.append(("output", batch_log(spec)))
    if sharded(spec):                                      # one server per shard, each its own job
        pairs.append(("array", f"0-{spec.batch.shards - 1}"))
    if spec.mode == "batch" and spec.batch.max_jobs > 1:   # the time limit: requeued, same id and folder
        pairs += [("requeue", None), ("open-mode", "append")]
    pairs += extra_directives(spec)
    return [f"--{k}" if v is None else f"--{k}={sbatch_quote(v)}" for k, v in pairs]


@dataclass(frozen=True)
class JobScript:
    """The parts of a job's sbatch script that decide what runs (the template lays them out)."""

    directives: tuple[str, ...]
    setup: tuple[str, ...]
    init_command: str          # makes the job folder from the embedded spec and plan (stdin)
    embedded: str              # the resolved spec (YAML), then the plan (JSON)
    node_command: str          # one task per node: the per-rank program
    after_command: str = ""    # after the tasks: a batch job that must go on requeues itself
    container_lines: tuple[str, ...] = ()    # Pyxis: the steps each task starts (comment lines)


def job_script(spec: JobSpec, plan: Plan, python: str) -> JobScript:
    """The one mapping from SPEC (and its PLAN) to the job: directives, setup lines, node command."""
    spec_yaml = dump(spec)
    if any(line.strip() in (SPEC_END, PLAN_SEPARATOR) for line in spec_yaml.splitlines()):
        raise SpecError(f"the spec may not contain a line {SPEC_END!r}")
    py = shlex.quote(python)
    return JobScript(
        directives=tuple(directives(spec)),
        setup=tuple(spec.slurm.setup),
        init_command=f'{py} -m slurm_vllm.node init "$job_dir" "$0"',
        embedded=f"{spec_yaml.rstrip()}\n{PLAN_SEPARATOR}\n{plan.to_json().rstrip()}\n",
        node_command=(f'srun --kill-on-bad-exit=1 --ntasks-per-node=1 --unbuffered --open-mode=append '
                      f'--output="$job_dir/logs/task-%t.out" {py} -u -m slurm_vllm.node run "$job_dir"'),
        after_command=(REQUEUE if spec.mode == "batch" and spec.batch.max_jobs > 1 else ""),
        container_lines=tuple(pyxis.shown_steps(spec.container, spec.container.binds,
                                                f"{spec.jobs_root_path}/{spec.name}-<job id>",
                                                ["sh", "-c", "'<env file wrapper>'", "slurm-vllm-env"],
                                                spec.slurm.gpus_per_node)
                              if spec.container.runtime == "pyxis" else ()),
    )


# The head leaves this mark when a batch stopped at the time limit must go on in a next run.
REQUEUE = ('if [ -e "$job_dir/requeue" ]; then rm -f "$job_dir/requeue"; '
           'scontrol requeue "$SLURM_JOB_ID"; fi   # the batch goes on in a next run')


def split_embedded(text: str) -> tuple[str, str]:
    """The (spec YAML, plan JSON) that `init` reads from the script."""
    spec_yaml, sep, plan_json = text.partition(f"\n{PLAN_SEPARATOR}\n")
    if not sep:
        raise SpecError("the script's embedded spec has no plan after it (made by another slurm_vllm?)")
    return spec_yaml + "\n", plan_json


def _comment(value: object) -> str:
    """VALUE on one comment line (newlines would end the comment and start shell)."""
    return " ".join(str(value).split())


def environment() -> jinja2.Environment:
    """jinja2's sandbox over the shipped templates: StrictUndefined, the `q` (shell-quote) and `comment`
    filters. Sandboxed: a user's template (slurm.template) is rendered on the login node at
    validate/render/submit, and must not reach Python (`cycler.__init__.__globals__.os`)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        loader=jinja2.FileSystemLoader(str(template_dir())), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, autoescape=False)
    env.filters["q"] = lambda value: shlex.quote(str(value))
    env.filters["comment"] = _comment
    return env


def sbatch_text(spec: JobSpec, plan: Plan, python: str, template: str | Path | None = None) -> str:
    """The job's sbatch script: the shipped template, or TEMPLATE (a file extending it by blocks)."""
    chosen = Path(template).expanduser() if template else (
        Path(spec.slurm.template).expanduser() if spec.slurm.template else None)
    parts = job_script(spec, plan, python)
    env = environment()
    try:
        if chosen is None:
            tmpl = env.get_template(TEMPLATE)
        else:                    # the user's file, by its path; it extends the shipped one by name
            try:
                source = safefile.read_input(chosen, MAX_TEMPLATE_BYTES).decode("utf-8", errors="replace")
            except OSError as exc:
                raise SpecError(f"slurm.template: {chosen}: cannot read: {exc.strerror}") from None
            except ValueError as exc:
                raise SpecError(f"slurm.template: {chosen}: {exc}") from None
            tmpl = env.from_string(source)
        return tmpl.render(
            directives=parts.directives, setup=parts.setup, init_command=parts.init_command,
            embedded=parts.embedded, node_command=parts.node_command, after_command=parts.after_command,
            container_lines=parts.container_lines,
            version=__version__,
            name=spec.name, jobs_root=str(spec.jobs_root_path), job_id=job_id_shell(spec),
            job_dir_shown=f"{spec.jobs_root_path}/{spec.name}-<job id{'>_<shard' if sharded(spec) else ''}>",
            tp_pp=f"{plan.nodes} nodes x {plan.gpus_per_node} GPUs: tensor parallel {plan.tp} x "
                  f"pipeline parallel {plan.pp}, served as {plan.served_name!r}")
    except jinja2.TemplateNotFound as exc:
        raise SpecError(f"slurm.template: {chosen}: no such template ({exc.name})") from None
    except jinja2.TemplateSyntaxError as exc:
        raise SpecError(f"slurm.template: {chosen}, line {exc.lineno}: {exc.message}") from None
    except jinja2.exceptions.SecurityError as exc:
        raise SpecError(f"slurm.template: {chosen}: refused by the template sandbox: {exc}") from None
    except jinja2.TemplateError as exc:
        raise SpecError(f"slurm.template: {chosen}: {exc.message}") from None
    except Exception as exc:  # a template's own runtime error ({{ 1 / 0 }}, a bad filter argument)
        raise SpecError(f"slurm.template: {chosen}: {type(exc).__name__}: {exc}") from None
