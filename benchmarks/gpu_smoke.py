"""GPU smoke (issue 23): a slurm_vllm job on a machine without Slurm, through the real job script.

The spec is rendered (`python -m slurm_vllm render`, the script `submit` would hand to sbatch) and
run by bash with Slurm's batch-step environment; the script's `srun` is this harness, which starts
each rank with the environment srun gives a task (SLURM_JOB_ID, SLURM_PROCID, SLURM_NODEID,
SLURM_LOCALID, SLURM_JOB_NODELIST, SLURM_CPUS_PER_TASK, CUDA_VISIBLE_DEVICES: the rank's share of
--gpus) and stops them as srun does (--kill-on-bad-exit; SIGTERM forwarded). `scontrol show job`
and `scancel` for this one job are answered by the harness too. Everything else is the product: the
node program, Ray, vLLM, the front door, the job folder.

Then: READY within --ready-timeout, the all-reduce check's table if the spec has `preflight: true`
(NCCL between the ranks' GPUs), one chat completion through the OpenAI client, GPU memory
(nvidia-smi, when there is one), `scancel` (SIGTERM to srun, as Slurm's cancel) or, with
--kill vllm|node-program, kill -9 of a `vllm serve` or of the last rank's node program (FAILED
naming it), the stage it ends in, and what is left: any
process carrying the job's SLURM_JOB_ID, any GPU compute process. With --batch N, then the same spec
as a batch job of N chats to DONE (its steady rate), and `vllm run-batch` on the same input and GPUs
for the ratio. The report (stage log with times, the answer, the figures) goes to stdout; exit 0
when all held.

A 1-node spec runs as one rank on this host (any number of its GPUs, backend ray or mp). A spec of
N nodes runs N ranks on this host, each in a network namespace of its own on a bridge (needs root
and iproute2): nodes have an address each, and a job's ranks use the same port numbers on every
node (its heartbeat, Ray's). Their node names are their addresses (10.199.0.1, …); --gpus is split
between them in order (2 ranks, --gpus 0,1: rank 0 gets GPU 0, rank 1 GPU 1). Run it with the
Python that has slurm_vllm, vLLM and openai.

Usage: python benchmarks/gpu_smoke.py SPEC.yaml [--gpus 0,1] [--kill vllm] [--batch 2000]
       [--ready-timeout 900] [--workdir DIR]
(the shims call it back as `gpu_smoke.py --shim srun|scontrol|scancel STATE_DIR ARGS…`)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KILL_WAIT = 30.0          # Slurm's KillWait default: SIGKILL this long after SIGTERM
LEFT_WAIT = 60.0          # how long the job's processes may take to go after its script ended
SHIMS = ("srun", "scontrol", "scancel")
NET = "10.199.0"          # the ranks' network when there are several: .254 this host, .1… the ranks
BRIDGE = "gsm-br0"


# -- the shims: srun, scontrol show job, scancel (run as separate processes by the job script) ------

def srun(state: Path, argv: list[str]) -> int:
    """srun for the job's one step: one task per node of SLURM_JOB_NODELIST (here: ranks on this
    host), stdout/stderr to --output (%t: the task's rank), --kill-on-bad-exit, SIGTERM forwarded."""
    output, i = None, 0
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i].startswith("--output="):
            output = argv[i].split("=", 1)[1]
        i += 1
    command = argv[i:]
    hosts = os.environ["SLURM_JOB_NODELIST"].split(",")
    gpus = [g for g in os.environ.get("SMOKE_GPUS", "").split(",") if g]
    per = len(gpus) // len(hosts) if gpus else 0
    tasks: list[subprocess.Popen[bytes]] = []
    for rank, host in enumerate(hosts):
        env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_NODEID": str(rank), "SLURM_LOCALID": "0",
               "SLURM_NTASKS": str(len(hosts)), "SLURM_STEP_ID": "0", "SLURMD_NODENAME": host,
               "SLURM_STEP_NODELIST": ",".join(hosts)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[rank * per:(rank + 1) * per])
        out = open(output.replace("%t", str(rank)), "ab") if output else None  # noqa: SIM115
        inside = ["ip", "netns", "exec", f"gsm-rank{rank}"] if len(hosts) > 1 else []
        tasks.append(subprocess.Popen([*inside, *command], env=env, stdout=out,
                                      stderr=subprocess.STDOUT if out else None, start_new_session=True))
    (state / "tasks").write_text(" ".join(str(t.pid) for t in tasks))

    stopped: list[float] = []               # when SIGTERM went to the tasks (scancel, a task's death)

    def stop(*_: object) -> None:
        stopped[:] = stopped or [time.monotonic()]
        for t in tasks:
            if t.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(t.pid, signal.SIGTERM)
    signal.signal(signal.SIGTERM, stop)
    while None in (codes := [t.poll() for t in tasks]):      # every task polled (any() would stop early)
        if not stopped and any(code not in (None, 0) for code in codes):
            for rank, code in enumerate(codes):          # as srun says it (the head reads this line)
                if code not in (None, 0):
                    what = "Killed" if code == -signal.SIGKILL else f"Exited with exit code {code}"
                    print(f"srun: error: {hosts[rank]}: task {rank}: {what}", file=sys.stderr, flush=True)
            stop()
        if stopped and time.monotonic() - stopped[0] > KILL_WAIT:       # as Slurm after KillWait
            for t in tasks:
                if t.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(t.pid, signal.SIGKILL)
        time.sleep(0.2)
    return 1 if any(t.returncode for t in tasks) else 0


def scontrol(state: Path, argv: list[str]) -> int:
    if argv[:3] == ["show", "job", "-o"] and argv[3:] == [(state / "job_id").read_text()]:
        print(f"JobId={argv[3]} JobState={(state / 'state').read_text()} ")
        return 0
    print(f"scontrol (harness): only `show job -o {(state / 'job_id').read_text()}`", file=sys.stderr)
    return 1


def scancel(state: Path, argv: list[str]) -> int:
    """scancel JOB: the job CANCELLED, SIGTERM to the step (srun forwards it to every task), SIGKILL
    to what is left of the tasks' process groups after KillWait."""
    if argv != [(state / "job_id").read_text()]:
        print(f"scancel (harness): only this job's id: {argv}", file=sys.stderr)
        return 1
    (state / "state").write_text("CANCELLED")
    if (state / "srun").exists():
        os.kill(int((state / "srun").read_text()), signal.SIGTERM)
    else:                                  # the script has not reached its srun line: end the script
        os.killpg(int((state / "script").read_text()), signal.SIGTERM)
    return 0


def shim_main(name: str, state: Path, argv: list[str]) -> int:
    if name == "srun":
        (state / "srun").write_text(str(os.getpid()))
        return srun(state, argv)
    return {"scontrol": scontrol, "scancel": scancel}[name](state, argv)


# -- the smoke -----------------------------------------------------------------------------------

def machine_line() -> str:
    gpus = ""
    if shutil.which("nvidia-smi"):
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    shown = gpus.replace("\n", "; ") or "none"
    return f"{socket.gethostname()}: {cpu}, {os.cpu_count()} CPUs; GPUs: {shown}"


def gpu_memory() -> str:
    if not shutil.which("nvidia-smi"):
        return "no nvidia-smi"
    query = ["nvidia-smi", "--query-gpu=index,memory.used,memory.total", "--format=csv,noheader"]
    return subprocess.run(query, capture_output=True, text=True).stdout.strip().replace("\n", "; ")


def gpu_processes() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def job_processes(job_id: str) -> list[str]:
    """Every process whose environment carries SLURM_JOB_ID=JOB_ID (the ranks and all they started)."""
    found = []
    needle = f"SLURM_JOB_ID={job_id}\0".encode()
    for p in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (p / "environ").read_bytes():
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{p.name} {cmd}")
        except OSError:
            continue
    return found


def network_up(ranks: int) -> list[str]:
    """A network namespace per rank (gsm-rank0…) on a bridge of this host: the ranks' addresses."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        raise SystemExit(f"{ranks} ranks on one host need a network namespace each: run as root, "
                         f"with iproute2")
    network_down()

    def ip(*argv: str) -> None:
        subprocess.run(["ip", *argv], check=True, capture_output=True)
    ip("link", "add", BRIDGE, "type", "bridge")
    ip("addr", "add", f"{NET}.254/24", "dev", BRIDGE)
    ip("link", "set", BRIDGE, "up")
    for r in range(ranks):
        ns, outside = f"gsm-rank{r}", f"gsm-v{r}"
        ip("netns", "add", ns)
        ip("link", "add", outside, "type", "veth", "peer", "name", f"gsm-p{r}")
        ip("link", "set", f"gsm-p{r}", "netns", ns)
        ip("-n", ns, "link", "set", f"gsm-p{r}", "name", "eth0")
        ip("link", "set", outside, "master", BRIDGE, "up")
        ip("-n", ns, "addr", "add", f"{NET}.{r + 1}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
    return [f"{NET}.{r + 1}" for r in range(ranks)]


def network_down() -> None:
    """Remove what network_up made (a namespace's end of its veth goes with it)."""
    for ns in sorted(Path("/run/netns").glob("gsm-rank*")) if Path("/run/netns").is_dir() else []:
        subprocess.run(["ip", "netns", "del", ns.name], check=False, capture_output=True)
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        subprocess.run(["ip", "link", "del", BRIDGE], check=False, capture_output=True)


def stage(job_dir: Path) -> tuple[str, str]:
    """The job folder's stage and detail (the product's own reading; PENDING before init made it)."""
    from slurm_vllm.core.errors import SlurmVllmError
    from slurm_vllm.core.jobdir import JobDir

    try:
        info = JobDir(job_dir).read_stage()
    except SlurmVllmError:
        return "PENDING", ""
    return info.stage.value, info.detail


FINAL = ("FAILED", "CANCELLED", "DONE", "TIMEOUT")


class Job:
    """One job of SPEC run through its rendered script, srun and scancel being this harness."""

    def __init__(self, spec: Path, work: Path, gpus: str) -> None:
        self.work, self.state, self.bin = work, work / "state", work / "bin"
        self.state.mkdir(parents=True, exist_ok=True)
        self.bin.mkdir(exist_ok=True)
        for name in SHIMS:
            shim = self.bin / name
            shim.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} --shim {name} "
                            f"{self.state} \"$@\"\n")
            shim.chmod(0o755)
        self.job_id = str(int(time.time() * 10) % 10_000_000 + 1)
        (self.state / "job_id").write_text(self.job_id)
        (self.state / "state").write_text("RUNNING")
        script = work / "job.sbatch"
        out = subprocess.run([sys.executable, "-m", "slurm_vllm", "render", str(spec), "-o", str(script)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"render failed: {out.stderr.strip()}")
        text = script.read_text()
        directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", text, re.M))
        self.nodes = int(directives.get("nodes", "1"))
        hosts = network_up(self.nodes) if self.nodes > 1 else [socket.gethostname()]
        folder = re.search(r"^# The job folder \(.*\) is (.*)<job id>\.$", text, re.M)
        assert folder, "the rendered script names no job folder"
        self.dir = Path(folder.group(1) + self.job_id)
        batch_out = Path(directives.get("output", str(work / "slurm-%j.out")).replace("%j", self.job_id))
        batch_out.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}", "SLURM_JOB_ID": self.job_id,
               "SLURM_JOB_NAME": directives.get("job-name", "smoke"),
               "SLURM_JOB_NODELIST": ",".join(hosts), "SLURM_NNODES": str(self.nodes),
               "SLURM_JOB_NUM_NODES": str(self.nodes),
               "SLURM_SUBMIT_DIR": os.getcwd(), "SMOKE_GPUS": gpus,
               "SLURM_CPUS_PER_TASK": directives.get("cpus-per-task", str(os.cpu_count()))}
        env.pop("CUDA_VISIBLE_DEVICES", None)          # the task's share is srun's to set
        self.t0 = time.time()
        with open(batch_out, "ab") as log:
            self.proc = subprocess.Popen(["bash", str(script)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        (self.state / "script").write_text(str(self.proc.pid))

    def wait(self, stages: tuple[str, ...], timeout: float) -> tuple[str, str]:
        """The stage once one of STAGES or final (or the script ended, or TIMEOUT s passed)."""
        while (st := stage(self.dir))[0] not in stages + FINAL:
            if self.proc.poll() is not None or time.time() - self.t0 > timeout:
                break
            time.sleep(0.5)
        first = st[1].splitlines()[0][:300] if st[1] else ""
        print(f"stage {st[0]} after {time.time() - self.t0:.1f} s: {first}", flush=True)
        return st

    def end(self, cancel: bool) -> tuple[str, bool]:
        """scancel (if CANCEL and the script runs), wait for the script; report the stage log and
        what is left. (final stage, nothing left)"""
        c0 = time.monotonic()
        cancel = cancel and self.proc.poll() is None
        if cancel:
            subprocess.run([str(self.bin / "scancel"), self.job_id], check=False)
        try:
            self.proc.wait(KILL_WAIT + 60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        after = "scancel" if cancel else "its end"
        print(f"the job script ended {time.monotonic() - c0:.1f} s after {after}", flush=True)
        final = stage(self.dir)
        print(f"final stage: {final[0]} {final[1].splitlines()[0][:200] if final[1] else ''}")
        log = self.dir / "stage.log"
        for line in log.read_text().splitlines() if log.exists() else []:
            t, _, rest = line.partition(" ")
            if re.fullmatch(r"\d+\.\d+", t):          # a detail's further lines (a log's tail) left out
                print(f"  {float(t) - self.t0:7.1f} s  {rest[:160]}")
        e0 = time.monotonic()         # a killed rank's watchdog cleans up after it: a few seconds
        while ((left := [line[:100] for line in job_processes(self.job_id)]) or (on_gpu := gpu_processes())) \
                and time.monotonic() - e0 < LEFT_WAIT:
            time.sleep(0.5)
        on_gpu = gpu_processes()
        if self.nodes > 1:
            network_down()
        print(f"left {time.monotonic() - e0:.1f} s after the end: {left or 'no process'}; "
              f"GPU compute processes: {on_gpu or 'none'}", flush=True)
        return final[0], not left and not on_gpu


def preflight_report(job_dir: Path) -> None:
    """The job's all-reduce check (spec key preflight), as `preflight` prints it, if it ran."""
    if (job_dir / "preflight.json").exists():
        from slurm_vllm.core.preflight import table
        from slurm_vllm.core.records import PreflightResult

        print(table(PreflightResult.read(job_dir / "preflight.json")), flush=True)


def chat_once(job_dir: Path) -> None:
    import openai

    from slurm_vllm.core.records import Endpoint

    endpoint = Endpoint.read(job_dir / "endpoint.json")
    client = openai.OpenAI(base_url=endpoint.url, api_key=endpoint.api_key() or "none", max_retries=0)
    c0 = time.monotonic()
    reply = client.chat.completions.create(model=endpoint.model, max_tokens=32, temperature=0,
                                           messages=[{"role": "user", "content": "What is a GPU?"}])
    tokens = reply.usage.completion_tokens if reply.usage else "?"
    print(f"chat: {time.monotonic() - c0:.2f} s, {tokens} tokens: {reply.choices[0].message.content!r}",
          flush=True)
    print(f"GPU memory while READY: {gpu_memory()}", flush=True)


def kill(job: Job, what: str) -> bool:
    """kill -9 a part of the READY job: WHAT "vllm", a `vllm serve` — a worker rank's (backend mp:
    the headless one) if there is one, else the head's; "node-program", the last rank's node program
    (as the OOM killer would: srun then stops the other tasks). FAILED within 30 s, naming it."""
    procs = job_processes(job.job_id)
    if what == "vllm":
        servers = [line for line in procs if " serve " in f" {line} " and "vllm" in line]
        victims = [line for line in servers if "--headless" in line] or servers
        said = "vllm exited"
    else:
        last = f"SLURM_PROCID={job.nodes - 1}\0".encode()
        victims = [line for line in procs if "slurm_vllm.node run" in line
                   and last in Path(f"/proc/{line.split()[0]}/environ").read_bytes()]
        said = f"the node program of rank {job.nodes - 1} ended" if job.nodes > 1 else ""
    if not victims:
        print(f"no {what} process of the job found")
        return False
    pid = int(victims[0].split()[0])
    os.kill(pid, signal.SIGKILL)
    k0 = time.time()
    st = job.wait((), 30 + (k0 - job.t0))
    print(f"{what} (pid {pid}: {victims[0].split(None, 1)[1][:80]}) killed: {st[0]} after "
          f"{time.time() - k0:.1f} s", flush=True)
    return st[0] == "FAILED" and said in st[1]


def serve(args: argparse.Namespace, work: Path) -> bool:
    job = Job(args.spec, work / "serve", args.gpus)
    ok, killed = False, None
    try:
        if job.wait(("READY",), args.ready_timeout)[0] == "READY":
            preflight_report(job.dir)
            chat_once(job.dir)
            ok = True
            if args.kill:
                killed = kill(job, args.kill)
    except Exception as exc:                       # said, then ended below like any end
        print(f"smoke: {type(exc).__name__}: {exc}", flush=True)
    final, clean = job.end(cancel=True)
    want = "FAILED" if args.kill else "CANCELLED"
    return ok and killed is not False and final == want and clean


def chats(n: int, model: str, tokens: int) -> str:
    """N independent chat requests (the batch input format vllm run-batch takes too)."""
    return "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": model, "max_tokens": tokens, "temperature": 0,
                                        "ignore_eos": True,
                                        "messages": [{"role": "user", "content": f"Count to {i}."}]}}) + "\n"
                   for i in range(n))


def batch(args: argparse.Namespace, work: Path) -> bool:
    """The spec as a batch job of --batch requests to DONE (its steady rate: batch.json), then
    `vllm run-batch` on the same input on the same GPUs: once on 1 request, once on all, its steady
    rate (N - 1) / (T_N - T_1)."""
    import yaml

    data = yaml.safe_load(args.spec.read_text())
    served = data["model"].get("served_name") or data["model"]["path"]
    inp = work / "input.jsonl"
    inp.write_text(chats(args.batch, served, args.batch_tokens))
    data.update(mode="batch", batch={"input": str(inp), "output": str(work / "results.jsonl")})
    data["name"] = f"{data['name']}-batch"
    spec = work / "batch.yaml"
    spec.write_text(yaml.safe_dump(data))
    job = Job(spec, work / "batch", args.gpus)
    st = job.wait(("DONE",), args.ready_timeout + 3600)
    final, clean = job.end(cancel=st[0] not in FINAL)
    lines = (work / "results.jsonl").read_text().splitlines() if (work / "results.jsonl").exists() else []
    report = job.dir / "batch.json"
    ours = json.loads(report.read_text())["rate"] if report.exists() else 0.0
    print(f"slurm_vllm batch: {len(lines)} of {args.batch} lines, steady {ours:.1f} req/s", flush=True)
    (work / "input-1.jsonl").write_text(inp.read_text().splitlines()[0] + "\n")
    from slurm_vllm.core.plan import vllm_flags

    flags = list(vllm_flags(data.get("vllm", {}).get("args") or {}))      # as the job's vllm serve gets them
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": args.gpus} if args.gpus else dict(os.environ)
    spans = {}
    for name in ("input-1.jsonl", "input.jsonl"):
        r0 = time.monotonic()
        with open(work / f"run-batch-{name}.log", "wb") as log:
            subprocess.run(["vllm", "run-batch", "-i", str(work / name), "-o", str(work / f"out-{name}"),
                            "--model", data["model"]["path"], "--served-model-name", served, *flags],
                           env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
        spans[name] = time.monotonic() - r0
    theirs = (args.batch - 1) / (spans["input.jsonl"] - spans["input-1.jsonl"])
    print(f"vllm run-batch: start-up {spans['input-1.jsonl']:.1f} s, steady {theirs:.1f} req/s; "
          f"slurm_vllm / run-batch: {ours / theirs:.2f}x", flush=True)
    return final == "DONE" and clean and len(lines) == args.batch


def main() -> int:
    if len(sys.argv) > 3 and sys.argv[1] == "--shim":
        return shim_main(sys.argv[2], Path(sys.argv[3]), sys.argv[4:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", type=Path, help="a 1-node job spec (mode serve)")
    ap.add_argument("--gpus", default=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                    help="GPU indices the job gets (default: CUDA_VISIBLE_DEVICES; none on a CPU host)")
    ap.add_argument("--ready-timeout", type=float, default=900)
    ap.add_argument("--kill", choices=("vllm", "node-program"),
                    help="after the chat, kill -9 a vllm serve or the last rank's node program: FAILED")
    ap.add_argument("--batch", type=int, default=0, help="then the same spec as a batch of N requests, "
                    "and vllm run-batch on the same input (N >= 2)")
    ap.add_argument("--batch-tokens", type=int, default=128)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    if args.workdir is not None:          # it holds the shims the job runs: ours alone, made here
        try:
            args.workdir.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            raise SystemExit(f"--workdir {args.workdir}: exists; give a new path (made 0700 here)") from None
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    print(f"machine: {machine_line()}", flush=True)
    ok = serve(args, work)
    if ok and args.batch:
        ok = batch(args, work)
    print("smoke:", "ok" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
