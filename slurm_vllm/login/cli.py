"""`python -m slurm_vllm VERB`: argparse verbs that print from the API; errors → one line and an exit code."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from slurm_vllm import __version__
from slurm_vllm.core.errors import SlurmVllmError, UsageError
from slurm_vllm.core.spec import DEFAULT_JOBS_ROOT

if TYPE_CHECKING:
    from slurm_vllm.login.api import ArrayJob, Job, JobHandle, Status


def _job(args: argparse.Namespace) -> Job | ArrayJob:
    from slurm_vllm.login.api import job

    return job(args.job, args.jobs_root)


def cmd_validate(args: argparse.Namespace) -> int:
    from slurm_vllm.login.api import validate

    found = validate(args.spec)
    print("\n".join(found.lines()))
    if found.notice:
        print(f"slurm_vllm: notice: {found.notice}", file=sys.stderr)
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from slurm_vllm.login.api import render

    text = render(args.spec, template=args.template)
    if args.output:
        try:
            Path(args.output).write_text(text)
        except OSError as exc:
            raise UsageError(f"render -o: cannot write {args.output}: {exc.strerror}") from None
        print(f"wrote {args.output}: submit it with: sbatch {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _progress(out: TextIO) -> Callable[[Status], None]:
    """A line per new stage; while a batch runs, a progress bar on a terminal, else a line every 30 s."""
    from slurm_vllm.core.records import Stage

    last_line = 0.0
    bar = out.isatty()

    def show(status: Status) -> None:
        nonlocal last_line
        if status.stage == Stage.BATCH and status.batch is not None:
            b = status.batch
            if bar:
                filled = int(30 * b.done / max(b.total, 1))
                print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {b.line()}   ", end="", file=out, flush=True)
                return
            if time.monotonic() - last_line < 30:
                return
            last_line = time.monotonic()
        elif bar and status.batch is not None:
            print(file=out)
        print(f"[{time.strftime('%H:%M:%S')}] {status}  (slurm: {status.slurm_state})", file=out, flush=True)
    return show


def _wait(job: JobHandle, out: TextIO) -> int:
    """Show each new stage on OUT until the job's wait target (READY; DONE for a batch or a
    preflight): 0, or the job ended first: 1."""
    from slurm_vllm.login.api import JobEnded

    try:
        job.wait(progress=_progress(out))
    except JobEnded as exc:
        print(f"slurm_vllm: job {exc.status.job_id} ended: {exc.status}", file=sys.stderr)
        return 1
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from slurm_vllm.core.plan import Mode
    from slurm_vllm.login.api import submit

    job = submit(args.spec)
    plan = job.plan()
    if args.json:
        print(json.dumps({"job_id": job.job_id, "job_dir": str(job.path)}))
    else:
        what = f"job array {job.job_id}: {plan.shards} shards of" if plan.shards > 1 else f"job {job.job_id}:"
        shape = f"TP{plan.tp}xPP{plan.pp}"
        if plan.replicas > 1:
            shape = f"{plan.replicas} replicas of {shape}"
        print(f"submitted {what} {plan.nodes} nodes, {shape}, folder {job.path}")
        print(f"  status: python -m slurm_vllm status {job.job_id}\n"
              f"  cancel: python -m slurm_vllm cancel {job.job_id}   (or scancel {job.job_id})")
    if not args.wait:
        return 0
    sys.stdout.flush()
    out = sys.stderr if args.json else sys.stdout
    code = _wait(job, out)                      # READY, or DONE for a batch
    if code == 0 and plan.mode is Mode.SERVE:
        ep = job.endpoint()
        print(f"ready: {ep.url}  model {ep.model}{'  key in ' + ep.api_key_file if ep.api_key_file else ''}",
              file=out)
    status = job.status() if plan.mode is Mode.BATCH else None
    if status is not None and status.batch is not None:
        print(f"batch: {status.batch.summary()}", file=out)
    return code


def cmd_preflight(args: argparse.Namespace) -> int:
    from slurm_vllm.core.preflight import ray_table, table
    from slurm_vllm.login.api import Job, submit

    job = submit(args.spec, preflight_only=not args.ray, ray_only=args.ray)
    assert isinstance(job, Job)              # a preflight is one allocation, never an array
    what = "the Ray cluster" if args.ray else "all-reduce"
    print(f"preflight job {job.job_id}: {what} across {job.plan().nodes} nodes, folder {job.path}",
          file=sys.stderr)
    code = _wait(job, sys.stderr)
    if code == 0 and args.ray:
        report = job.ray_report()
        print(json.dumps(report) if args.json else ray_table(report))
    elif code == 0:
        result = job.preflight_result()
        print(json.dumps(result.to_dict()) if args.json else table(result))
    return code


def cmd_status(args: argparse.Namespace) -> int:
    status = _job(args).status()
    if args.json:
        print(json.dumps(status.to_dict()))
    else:
        since = f", since {time.strftime('%H:%M:%S', time.localtime(status.since))}" if status.since else ""
        print(f"job {status.job_id}: {status}  (slurm: {status.slurm_state}{since})")
    return 0


def cmd_endpoint(args: argparse.Namespace) -> int:
    ep = _job(args).endpoint()
    if args.json:
        print(json.dumps({"url": ep.url, "model": ep.model, "api_key_file": ep.api_key_file}))
    else:
        print(ep.url)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    for path, text in _job(args).logs(rank=args.rank, lines=args.lines):
        print(f"==> {path} <==")
        print(text)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job = _job(args)
    job.cancel()
    print(f"cancelled job {job.job_id}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge a sharded batch's parts into its output now (the last shard to end does it too)."""
    from slurm_vllm.login.api import merge

    result = merge(args.job, args.jobs_root)
    if args.json:
        print(json.dumps({"output": str(result.output), "parts": result.parts, "added": result.added,
                          "present": result.present, "total": result.total, "complete": result.complete,
                          "parts_removed": result.removed}))
    else:
        print(result.line())
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from slurm_vllm.login.listing import rows, table

    found = rows(args.jobs_root, include_ended=args.all)
    if args.json:
        print(json.dumps([r.to_dict() for r in found]))
    else:
        print(table(found))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m slurm_vllm",
                                description="Serve a model with vLLM across the nodes of a Slurm allocation.")
    p.add_argument("--version", action="version", version=f"slurm_vllm {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    roots = f"(default $SLURM_VLLM_JOBS_ROOT or {DEFAULT_JOBS_ROOT})"

    def verb(name: str, func: object, help: str, spec: bool = False,
             job: bool = False) -> argparse.ArgumentParser:
        v = sub.add_parser(name, help=help, description=help)
        if spec:
            v.add_argument("spec", metavar="SPEC", help="job spec (YAML)")
        if job:
            v.add_argument("job", metavar="JOB", help="Slurm job id or job folder")
            v.add_argument("--jobs-root", help=f"where else to look up job ids {roots}")
        v.set_defaults(func=func)
        return v

    verb("validate", cmd_validate, "check a spec and show the plan", spec=True)
    r = verb("render", cmd_render, "print the plain sbatch script of a spec", spec=True)
    r.add_argument("-o", "--output", help="write the script to this file")
    r.add_argument("--template", help="a jinja2 file that extends job.sbatch.j2 by blocks "
                                      "(directives, setup, launch, teardown); default slurm.template")
    s = verb("submit", cmd_submit, "submit a spec; print the job id and folder", spec=True)
    s.add_argument("--wait", action="store_true", help="block until READY (exit 0) or failure (exit 1)")
    s.add_argument("--json", action="store_true", help='print {"job_id": ..., "job_dir": ...}')
    pf = verb("preflight", cmd_preflight, "run a cross-node all-reduce in the spec's allocation and "
              "containers; print bandwidth and NCCL's transport", spec=True)
    pf.add_argument("--json", action="store_true")
    pf.add_argument("--ray", action="store_true", help="instead: bring up the job's Ray cluster (no vLLM), "
                    "check that every node joined on the right network; print the nodes and the time")
    ls = verb("list", cmd_list, "your jobs: id, name, stage, nodes, TPxPP, URL, age, time left")
    ls.add_argument("--all", action="store_true", help="also the jobs that ended")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--jobs-root", help=f"also list the job folders in this folder {roots}")
    st = verb("status", cmd_status, "stage and Slurm state of a job", job=True)
    st.add_argument("--json", action="store_true")
    e = verb("endpoint", cmd_endpoint, "the OpenAI-compatible URL of a READY job", job=True)
    e.add_argument("--json", action="store_true", help='print {"url", "model", "api_key_file"}')
    lg = verb("logs", cmd_logs, "the job's logs (Ray, vLLM, per-rank output)", job=True)
    lg.add_argument("--rank", type=int)
    lg.add_argument("-n", "--lines", type=int, default=40)
    verb("cancel", cmd_cancel, "scancel the job; its ranks stop vLLM, Ray and containers", job=True)
    mg = verb("merge", cmd_merge, "merge a sharded batch's parts into its output now (JOB: a job id, "
              "job folder or the spec file)", job=True)
    mg.add_argument("--json", action="store_true")
    return p


def _warn(message: warnings.WarningMessage | Warning | str, *rest: object, **kw: object) -> None:
    kind = "notice" if type(message).__name__ == "NetworkNotice" else "warning"
    print(f"slurm_vllm: {kind}: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    warnings.showwarning = _warn
    try:
        code: int = args.func(args)
        return code
    except SlurmVllmError as exc:
        if args.debug:
            raise
        print(f"slurm_vllm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
