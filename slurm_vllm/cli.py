"""`python -m slurm_vllm VERB`: argparse verbs; SlurmVllmError → one line and an exit code."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from . import __version__
from .errors import SlurmVllmError
from .jobdir import FINAL, JobDir, find
from .spec import DEFAULT_JOBS_ROOT


def _jobs_root(args: argparse.Namespace) -> Path:
    return Path(os.path.expandvars(args.jobs_root or os.environ.get("SLURM_VLLM_JOBS_ROOT")
                                   or DEFAULT_JOBS_ROOT)).expanduser()


def _load(path: str):  # type: ignore[no-untyped-def]
    from . import plan, spec

    job_spec = spec.load(path)
    return job_spec, plan.make(job_spec)


def cmd_validate(args: argparse.Namespace) -> int:
    spec, plan = _load(args.spec)
    from .render import directives

    directives(spec)        # refuses managed extra directives
    c = spec.container
    where = "the node's environment" if c.runtime == "none" else f"{c.runtime} image {c.image}"
    print(f"ok: {spec.name}: {plan.nodes} nodes x {plan.gpus_per_node} GPUs -> tensor parallel "
          f"{plan.tp} x pipeline parallel {plan.pp}; {plan.served_name!r} from {plan.model_path} "
          f"in {where}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from .render import sbatch_script
    from .spec import dump

    spec, plan = _load(args.spec)
    python = spec.slurm.python or sys.executable
    text = sbatch_script(spec, plan, dump(spec), python, source=os.path.abspath(args.spec))
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}: submit it with: sbatch {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from .submit import submit

    spec, plan = _load(args.spec)
    job_id, jd = submit(spec, plan)
    if args.json:
        print(json.dumps({"job_id": job_id, "job_dir": str(jd.path)}))
    else:
        print(f"submitted job {job_id}: {plan.nodes} nodes, TP{plan.tp}xPP{plan.pp}, folder {jd.path}")
        print(f"  status: python -m slurm_vllm status {jd.path}\n"
              f"  cancel: python -m slurm_vllm cancel {jd.path}   (or scancel {job_id})")
    if args.wait:
        sys.stdout.flush()
        return _wait(jd, out=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .preflight import table
    from .submit import submit

    spec, plan = _load(args.spec)
    job_id, jd = submit(spec, replace(plan, mode="preflight"))
    print(f"preflight job {job_id}: all-reduce across {plan.nodes} nodes, folder {jd.path}", file=sys.stderr)
    code = _wait(jd, out=sys.stderr, serving=False)
    if code == 0:
        result = jd.read_json(jd.preflight)
        print(json.dumps(result) if args.json else table(result))
    else:
        print(f"slurm_vllm: preflight failed: {jd.read_stage()}", file=sys.stderr)
    return code


def _status(jd: JobDir) -> dict[str, object]:
    from .slurm import ENDED, job_state

    stage = jd.read_stage()
    job_id = jd.job_id()
    slurm_state = job_state(job_id) if job_id else None
    shown = stage.stage
    if stage.stage not in FINAL and slurm_state:
        if slurm_state.split()[0] in ENDED:     # the job ended without its ranks saying why
            shown = {"CANCELLED": "CANCELLED", "TIMEOUT": "TIMEOUT", "COMPLETED": "DONE"}.get(
                slurm_state.split()[0], "FAILED")
        elif slurm_state == "PENDING":
            shown = "PENDING"
    return {"job_id": job_id, "job_dir": str(jd.path), "stage": shown, "detail": stage.detail,
            "slurm_state": slurm_state}


def _wait(jd: JobDir, out: TextIO, serving: bool = True) -> int:
    """Show each new stage on OUT until READY (0) or a final stage (1; DONE is 0 when not SERVING)."""
    last = ""
    delay = 0.2
    while True:
        status = _status(jd)
        line = f"{status['stage']}{': ' + str(status['detail']) if status['detail'] else ''}"
        if line != last:
            print(f"[{time.strftime('%H:%M:%S')}] {line}  (slurm: {status['slurm_state']})", file=out,
                  flush=True)
        last = line
        if status["stage"] == "DONE" and not serving:
            return 0
        if status["stage"] == "READY" and serving:
            endpoint = jd.read_json(jd.endpoint)
            print(f"ready: {endpoint['url']}  model {endpoint['model']}"
                  f"{'  key in ' + endpoint['api_key_file'] if endpoint['api_key_file'] else ''}", file=out)
            return 0
        if status["stage"] in FINAL:
            return 1
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)


def cmd_status(args: argparse.Namespace) -> int:
    status = _status(find(args.job, _jobs_root(args)))
    if args.json:
        print(json.dumps(status))
    else:
        detail = f": {status['detail']}" if status["detail"] else ""
        print(f"job {status['job_id']}: {status['stage']}{detail}  (slurm: {status['slurm_state']})")
    return 0


def cmd_endpoint(args: argparse.Namespace) -> int:
    jd = find(args.job, _jobs_root(args))
    if not jd.endpoint.exists():
        raise SlurmVllmError(f"job {jd.job_id()}: no endpoint yet (stage {jd.read_stage()})")
    endpoint = jd.read_json(jd.endpoint)
    if jd.read_stage().stage != "READY":
        raise SlurmVllmError(f"job {jd.job_id()}: the endpoint is gone (stage {jd.read_stage()})")
    if args.json:
        print(json.dumps({k: endpoint[k] for k in ("url", "model", "api_key_file")}))
    else:
        print(endpoint["url"])
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    jd = find(args.job, _jobs_root(args))
    files = [*sorted(jd.logs.glob("*.log")), *sorted(jd.submitit.glob("*.out")),
             *sorted(jd.submitit.glob("*.err"))]
    if args.rank is not None:
        files = [f for f in files if f.stem.endswith(f"-{args.rank}") or f"_{args.rank}_log" in f.name]
    for f in files:
        print(f"==> {f} <==")
        lines = f.read_text(errors="replace").splitlines()
        print("\n".join(lines[-args.lines:]))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from .slurm import cancel

    jd = find(args.job, _jobs_root(args))
    job_id = jd.job_id()
    if not job_id:
        raise SlurmVllmError(f"{jd.path}: no job id recorded")
    cancel(job_id)
    print(f"cancelled job {job_id}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m slurm_vllm",
                                description="Serve a model with vLLM across the nodes of a Slurm allocation.")
    p.add_argument("--version", action="version", version=f"slurm_vllm {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, func: object, help: str, spec: bool = False,
             job: bool = False) -> argparse.ArgumentParser:
        v = sub.add_parser(name, help=help, description=help)
        if spec:
            v.add_argument("spec", metavar="SPEC", help="job spec (YAML)")
        if job:
            v.add_argument("job", metavar="JOB", help="Slurm job id or job folder")
            v.add_argument("--jobs-root", help=f"where to look up job ids (default $SLURM_VLLM_JOBS_ROOT "
                                               f"or {DEFAULT_JOBS_ROOT})")
        v.set_defaults(func=func)
        return v

    verb("validate", cmd_validate, "check a spec and show the plan", spec=True)
    r = verb("render", cmd_render, "print the plain sbatch script of a spec", spec=True)
    r.add_argument("-o", "--output", help="write the script to this file")
    s = verb("submit", cmd_submit, "submit a spec; print the job id and folder", spec=True)
    s.add_argument("--wait", action="store_true", help="block until READY (exit 0) or failure (exit 1)")
    s.add_argument("--json", action="store_true", help='print {"job_id": ..., "job_dir": ...}')
    pf = verb("preflight", cmd_preflight, "run a cross-node all-reduce in the spec's allocation and "
              "containers; print bandwidth and NCCL's transport", spec=True)
    pf.add_argument("--json", action="store_true")
    st = verb("status", cmd_status, "stage and Slurm state of a job", job=True)
    st.add_argument("--json", action="store_true")
    e = verb("endpoint", cmd_endpoint, "the OpenAI-compatible URL of a READY job", job=True)
    e.add_argument("--json", action="store_true", help='print {"url", "model", "api_key_file"}')
    lg = verb("logs", cmd_logs, "the job's logs (Ray, vLLM, per-rank output)", job=True)
    lg.add_argument("--rank", type=int)
    lg.add_argument("-n", "--lines", type=int, default=40)
    verb("cancel", cmd_cancel, "scancel the job; its ranks stop vLLM, Ray and containers", job=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
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
