"""Benchmark: launch → first /v1/completions, side by side in one run (issue 11): slurm_vllm, vec-inf
0.9.0, a minimal Ray barrier script and the single-node floor, interleaved over rounds.

Every case serves the test model with the same vLLM arguments (`--enforce-eager --max-model-len 256
--dtype float32`); the 2-node cases as TP2 over 2 nodes x 1 GPU with the Ray executor:
- slurm_vllm: `python -m slurm_vllm submit` of tests/configs/test-none-tp2.yaml (runtime none);
  slurm_vllm-mp the same with `backend: mp` (vLLM's own multi-node launcher, no Ray).
- vec-inf: its own `vec-inf launch` (venv mode) from its own virtualenv (--vec-inf-venv), with its
  own generated sbatch; config in SCRATCH/vec-inf-config (environment.yaml: the package's, with the
  test bed's partition, 2 CPUs, venv mode; models.yaml: the tiny model). Needs `nc` and `jq`.
- barrier: one sbatch script: `ray start --head`, the worker joins as soon as the GCS port answers,
  poll until 2 nodes are alive, then `vllm serve` (no fixed sleeps).
- floor: plain single-node `vllm serve` as one sbatch job.

The clock starts just before the launch command. A client polls the server's /health, then POSTs a
4-token /v1/completions until it gets 200 (every 0.1 s). The breakdown, seconds from launch: the
launch command returned, Slurm started the job, Ray head up, all nodes joined, `vllm serve` started,
/health OK, first completion (each case reports what it can see). Before each run the queue must be
empty and nothing left on the nodes; the load is recorded.

Usage (test bed up, `eval "$(scripts/testbed env)"`; vec-inf in its own venv):
    python3 -m venv /var/cache/slurm-vllm-peers/vec-inf
    /var/cache/slurm-vllm-peers/vec-inf/bin/pip install vec-inf==0.9.0
    $SLURM_VLLM_TEST_VENV/bin/python benchmarks/peers.py --rounds 3 --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.testbed import leftovers, machine_line  # noqa: E402

VLLM_ARGS = ["--max-model-len", "256", "--dtype", "float32", "--enforce-eager"]
PROMPT = {"prompt": "The number 7 is", "max_tokens": 4, "temperature": 0}
TIMEOUT = 600.0
POLL = 0.1
PHASES = ("returned", "running", "ray_head", "joined", "vllm_start", "health", "first")


@dataclass
class Run:
    """One launch: seconds from launch to each phase it could see, or its error."""

    case: str
    round: int
    load: str
    t: dict[str, float] = field(default_factory=dict)
    error: str = ""
    text: str = ""


def env() -> dict[str, str]:
    need = ("SLURM_VLLM_TEST_VENV", "SLURM_VLLM_TEST_MODEL", "SLURM_VLLM_TEST_JOBS_ROOT")
    missing = [k for k in need if not os.environ.get(k)]
    if missing:
        sys.exit(f"peers: {', '.join(missing)} unset: eval \"$(scripts/testbed env)\" first")
    return dict(os.environ)


def load_now() -> str:
    """The 1-minute load average and the CPU busy share over 1 s, as recorded before each run."""
    def ticks() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]
    total0, idle0 = ticks()
    time.sleep(1.0)
    total1, idle1 = ticks()
    busy = 100 * (1 - (idle1 - idle0) / max(total1 - total0, 1))
    return f"load {Path('/proc/loadavg').read_text().split()[0]}, busy {busy:.0f}%"


def wait_idle(nodes: int, within: float = 120) -> None:
    """The queue is empty and no Ray, vLLM or container runs on any node."""
    deadline = time.monotonic() + within
    while True:
        queue = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.strip()
        left = leftovers(nodes)
        if not queue and not left:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not idle after {within:.0f} s: queue {queue!r}, on the nodes {left}")
        time.sleep(0.5)


def settle(nodes: int, run: Run) -> None:
    """After a run: idle as wait_idle, else what the launch left running after its job ended (a
    peer's `vllm serve` that escaped its job, seen with vec-inf) is a failure of that run, and is
    killed by PID (processes inside the test-bed nodes: only the benchmark's jobs start those)."""
    try:
        wait_idle(nodes, within=60)
        return
    except RuntimeError as exc:
        left = re.findall(r"pid (\d+): ([^']*)", str(exc))
        if not left:
            raise
    said = [f"{' '.join(Path(w).name for w in cmd.split()[:3])} (pid {pid}, killed)" for pid, cmd in left]
    run.error = (run.error + "; " if run.error else "") + "left running after its job: " + ", ".join(said)
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    wait_idle(nodes)


def call(method: str, host: str, port: int, path: str, body: dict[str, object] | None = None,
         key: str | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def client(run: Run, t0: float, where: Callable[[], tuple[str, int, str, str | None] | None],
           alive: Callable[[], str]) -> None:
    """Wait until WHERE() gives (host, port, model, key); poll /health, then the first completion.
    ALIVE() returns why the launch is dead (or "")."""
    deadline = t0 + TIMEOUT
    found = None
    while found is None:
        found = where()
        if found is None:
            if (why := alive()) or time.time() > deadline:
                raise RuntimeError(why or "no server address in time")
            time.sleep(POLL)
    host, port, model, key = found
    health = False
    while True:
        try:
            if not health:
                status, _ = call("GET", host, port, "/health")
                if status == 200:
                    health = True
                    run.t["health"] = time.time() - t0
            if health:
                status, text = call("POST", host, port, "/v1/completions", {"model": model, **PROMPT}, key)
                if status == 200:
                    run.t["first"] = time.time() - t0
                    run.text = json.loads(text)["choices"][0]["text"]
                    return
        except OSError:
            pass
        if (why := alive()) or time.time() > deadline:
            raise RuntimeError(why or "no completion in time")
        time.sleep(POLL)


def slurm_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip() or "ENDED"


def dead(job_id: str) -> Callable[[], str]:
    def check() -> str:
        state = slurm_state(job_id)
        return "" if state in ("PENDING", "RUNNING", "CONFIGURING") else f"job {job_id} is {state}"
    return check


def stamps(path: Path) -> dict[str, float]:
    """`phase epoch` lines a script wrote (the first of each phase)."""
    out: dict[str, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            out.setdefault(name, float(value))
    return out


def cancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], capture_output=True)


# -- the cases ----------------------------------------------------------------------------------

def case_slurm_vllm(config: str) -> Callable[[Run, dict[str, str], Path], None]:
    """slurm_vllm's `submit` of tests/configs/CONFIG, run from SCRATCH (the test venv's slurm_vllm,
    the one the nodes run, not the checkout's)."""
    return lambda run, e, scratch: launch_slurm_vllm(ROOT / "tests" / "configs" / config, run, e, scratch)


def launch_slurm_vllm(spec: Path, run: Run, e: dict[str, str], scratch: Path) -> None:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "slurm_vllm", "submit", str(spec), "--json"],
                         capture_output=True, text=True, cwd=scratch, env=e)
    run.t["returned"] = time.time() - t0
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip())
    job = json.loads(out.stdout)
    folder = Path(job["job_dir"])
    try:
        def where() -> tuple[str, int, str, str | None] | None:
            try:
                head = json.loads((folder / "head.json").read_text())
                return head["ip"], int(head["api_port"]), "tiny", (folder / "api_key").read_text().strip()
            except (OSError, ValueError, KeyError):
                return None
        client(run, t0, where, dead(job["job_id"]))
        first: dict[str, float] = {}
        for line in (folder / "stage.log").read_text().splitlines():
            when, stage = line.split()[:2]
            first.setdefault(stage, float(when))
        run.t["running"] = first["STARTING"] - t0
        if "RAY_HEAD" in first:          # backend ray
            run.t["ray_head"] = first["RAY_HEAD"] - t0
            run.t["vllm_start"] = first["RAY_HEAD"] - t0      # pipelined: vllm serve starts with the head
            run.t["joined"] = first["LOADING"] - t0
        else:                            # backend mp: vllm serve starts on every node at LOADING
            run.t["vllm_start"] = first["LOADING"] - t0
    finally:
        cancel(job["job_id"])


BARRIER = """#!/bin/bash
#SBATCH --job-name=peers-barrier --nodes=2 --ntasks-per-node=1 --gpus-per-node=1 --cpus-per-task=2
#SBATCH --time=15 --output={scratch}/barrier-%j.out
set -euo pipefail
source "$SLURM_VLLM_TEST_VENV/bin/activate"
times={scratch}/barrier-$SLURM_JOB_ID.times
stamp() {{ echo "$1 $(date +%s.%N)" >> "$times"; }}
stamp running
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head_ip=$(getent hosts "${{nodes[0]}}" | awk '{{print $1}}')
worker_ip=$(getent hosts "${{nodes[1]}}" | awk '{{print $1}}')
port=$((6400 + SLURM_JOB_ID % 500)); api=$((8400 + SLURM_JOB_ID % 500))
srun --nodes=1 --ntasks=1 -w "${{nodes[0]}}" ray start --head --block --node-ip-address="$head_ip" \\
    --port=$port --num-cpus=2 --num-gpus=1 --include-dashboard=false --disable-usage-stats &
until (exec 3<>"/dev/tcp/$head_ip/$port") 2>/dev/null; do sleep 0.1; done
stamp ray_head
srun --nodes=1 --ntasks=1 -w "${{nodes[1]}}" ray start --block --node-ip-address="$worker_ip" \\
    --address="$head_ip:$port" --num-cpus=2 --num-gpus=1 --disable-usage-stats &
python - "$head_ip:$port" <<'EOF'
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
while sum(n["Alive"] for n in ray.nodes()) < 2:
    time.sleep(0.2)
EOF
stamp joined
echo "$head_ip $api" > {scratch}/barrier-$SLURM_JOB_ID.addr
stamp vllm_start
RAY_ADDRESS="$head_ip:$port" vllm serve "$SLURM_VLLM_TEST_MODEL" --served-model-name tiny \\
    --tensor-parallel-size 2 --distributed-executor-backend ray --host "$head_ip" --port $api {args}
"""

FLOOR = """#!/bin/bash
#SBATCH --job-name=peers-floor --nodes=1 --ntasks-per-node=1 --gpus-per-node=1 --cpus-per-task=2
#SBATCH --time=15 --output={scratch}/floor-%j.out
set -euo pipefail
source "$SLURM_VLLM_TEST_VENV/bin/activate"
times={scratch}/floor-$SLURM_JOB_ID.times
echo "running $(date +%s.%N)" >> "$times"
ip=$(getent hosts "$SLURMD_NODENAME" | awk '{{print $1}}'); api=$((8400 + SLURM_JOB_ID % 500))
echo "$ip $api" > {scratch}/floor-$SLURM_JOB_ID.addr
echo "vllm_start $(date +%s.%N)" >> "$times"
vllm serve "$SLURM_VLLM_TEST_MODEL" --served-model-name tiny --host "$ip" --port $api {args}
"""


def case_script(kind: str, template: str) -> Callable[[Run, dict[str, str], Path], None]:
    def launch(run: Run, e: dict[str, str], scratch: Path) -> None:
        script = scratch / f"{kind}.sbatch"
        script.write_text(template.format(scratch=scratch, args=" ".join(VLLM_ARGS)))
        t0 = time.time()
        out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=e)
        run.t["returned"] = time.time() - t0
        if out.returncode != 0:
            raise RuntimeError(out.stderr.strip())
        job_id = out.stdout.strip().split(";")[0]
        try:
            def where() -> tuple[str, int, str, str | None] | None:
                addr = scratch / f"{kind}-{job_id}.addr"
                if not addr.exists() or not addr.read_text().endswith("\n"):
                    return None
                host, port = addr.read_text().split()
                return host, int(port), "tiny", None
            client(run, t0, where, dead(job_id))
            run.t.update({k: v - t0 for k, v in stamps(scratch / f"{kind}-{job_id}.times").items()})
        finally:
            cancel(job_id)
    return launch


def vec_inf_config(scratch: Path, venv: Path, e: dict[str, str]) -> Path:
    """VEC_INF_CONFIG_DIR: the package's environment.yaml with the test bed's values, and the model."""
    import yaml

    package = next((venv / "lib").glob("python3*/site-packages/vec_inf/config"))
    conf = scratch / "vec-inf-config"
    conf.mkdir(exist_ok=True)
    envy = yaml.safe_load((package / "environment.yaml").read_text())
    envy["default_args"].update(
        cpus_per_task="2", mem_per_node="2G", partition="debug", resource_type="",
        venv=e["SLURM_VLLM_TEST_VENV"], log_dir=str(scratch / "vec-inf-logs"),
        model_weights_parent_dir=str(scratch / "weights"), time="00:15:00")
    envy["allowed_values"]["partition"] = ["debug"]
    (conf / "environment.yaml").write_text(yaml.safe_dump(envy))
    model = {"model_family": "tiny-llama", "model_type": "LLM", "gpus_per_node": 1, "num_nodes": 1,
             "vocab_size": 1024, "vllm_args": {"--max-model-len": 256, "--dtype": "float32",
                                               "--enforce-eager": True}}
    (conf / "models.yaml").write_text(yaml.safe_dump({"models": {"tiny-llama": model}}))
    weights = scratch / "weights"
    weights.mkdir(exist_ok=True)
    link = weights / "tiny-llama"
    if not link.is_symlink():
        link.symlink_to(e["SLURM_VLLM_TEST_MODEL"])
    return conf


def case_vec_inf(venv: Path) -> Callable[[Run, dict[str, str], Path], None]:
    def launch(run: Run, e: dict[str, str], scratch: Path) -> None:
        if Path("/root/.ray/auth_token").exists():
            raise RuntimeError("/root/.ray/auth_token exists (a stale Ray token breaks vec-inf's "
                               "next launch)")
        conf = vec_inf_config(scratch, venv, e)
        work = scratch / "vec-inf-work"
        work.mkdir(exist_ok=True)
        ve = {**e, "VEC_INF_CONFIG_DIR": str(conf), "VEC_INF_ACCOUNT": "root", "VEC_INF_WORK_DIR": str(work),
              "PATH": f"{venv}/bin:{e['PATH']}"}
        t0 = time.time()
        argv = [str(venv / "bin" / "vec-inf"), "launch", "tiny-llama", "--num-nodes", "2", "--gpus-per-node",
                "1", "--vllm-args", "--tensor-parallel-size=2", "--json-mode"]
        out = subprocess.run(argv, capture_output=True, text=True, env=ve, cwd=scratch)
        run.t["returned"] = time.time() - t0
        if out.returncode != 0:
            raise RuntimeError((out.stdout + out.stderr).strip()[-500:])
        job_id = str(json.loads(out.stdout)["slurm_job_id"])
        info = scratch / "vec-inf-logs" / "tiny-llama" / f"tiny-llama.{job_id}" / f"tiny-llama.{job_id}.json"
        try:
            def where() -> tuple[str, int, str, str | None] | None:
                try:
                    address = json.loads(info.read_text()).get("server_address")
                except (OSError, ValueError):
                    return None
                if not address:
                    return None
                run.t.setdefault("vllm_start", info.stat().st_mtime - t0)
                hostport = address.split("//", 1)[1].split("/", 1)[0]
                host, port = hostport.rsplit(":", 1)
                return host, int(port), "tiny-llama", None
            client(run, t0, where, dead(job_id))
            start = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-o", "Start", "--parsable2"],
                                   capture_output=True, text=True).stdout.strip()
            if start and start != "Unknown":
                run.t["running"] = time.mktime(time.strptime(start, "%Y-%m-%dT%H:%M:%S")) - t0
        finally:
            subprocess.run([str(venv / "bin" / "vec-inf"), "shutdown", job_id], capture_output=True, env=ve)
            cancel(job_id)
    return launch


# -- the run ------------------------------------------------------------------------------------

def table(runs: list[Run], cases: list[str]) -> list[str]:
    """Launch → first completion per case: each round (up to 5 rounds), mean, min/median/max, failures."""
    rounds = max(r.round for r in runs) + 1
    shown = rounds if rounds <= 5 else 0
    out = ["| case | " + "".join(f"r{i + 1} | " for i in range(shown)) +
           "mean launch → first completion | min / median / max | failed |", "|---|" + "---|" * (shown + 3)]
    for case in cases:
        mine = sorted((r for r in runs if r.case == case), key=lambda r: r.round)
        cells = "".join(f"{r.t['first']:.1f} | " if "first" in r.t else "FAILED | " for r in mine[:shown])
        ok = [r.t["first"] for r in mine if "first" in r.t]
        mean = f"**{statistics.mean(ok):.1f} s**" if ok else "–"
        spread = f"{min(ok):.1f} / {statistics.median(ok):.1f} / {max(ok):.1f}" if ok else "–"
        out.append(f"| {case} | {cells}{mean} | {spread} | {len(mine) - len(ok)}/{len(mine)} |")
    return out


def breakdown(runs: list[Run], cases: list[str]) -> list[str]:
    out = ["| case (mean s from launch) | " + " | ".join(PHASES) + " |", "|---|" + "---|" * len(PHASES)]
    for case in cases:
        mine = [r for r in runs if r.case == case and "first" in r.t]
        cells = []
        for phase in PHASES:
            seen = [r.t[phase] for r in mine if phase in r.t]
            cells.append(f"{statistics.mean(seen):.1f}" if seen else "–")
        out.append(f"| {case} | " + " | ".join(cells) + " |")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="discarded rounds first")
    p.add_argument("--cases", default="slurm_vllm,vec-inf,barrier,floor,slurm_vllm-mp")
    p.add_argument("--vec-inf-venv", default="/var/cache/slurm-vllm-peers/vec-inf")
    p.add_argument("--scratch", default=None, help="shared folder for scripts and logs (default: under "
                                                   "$SLURM_VLLM_TEST_JOBS_ROOT)")
    p.add_argument("--results", help="write the tables to this Markdown file")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # the running case still cancels its job
    e = env()
    nodes = int(e.get("SLURM_VLLM_TESTBED_NODES") or 3)
    scratch = Path(args.scratch or Path(e["SLURM_VLLM_TEST_JOBS_ROOT"]) / "peers")
    scratch.mkdir(parents=True, exist_ok=True)
    cases = args.cases.split(",")
    launchers: dict[str, Callable[[Run, dict[str, str], Path], None]] = {
        "slurm_vllm": case_slurm_vllm("test-none-tp2.yaml"),
        "slurm_vllm-mp": case_slurm_vllm("test-none-tp2-mp.yaml"), "barrier": case_script("barrier", BARRIER),
        "floor": case_script("floor", FLOOR), "vec-inf": case_vec_inf(Path(args.vec_inf_venv))}
    for tool in ("nc", "jq") if "vec-inf" in cases else ():
        if not shutil.which(tool):
            package = "netcat-openbsd" if tool == "nc" else tool
            sys.exit(f"peers: vec-inf needs `{tool}` (apt-get install {package})")
    machine = machine_line()
    print(machine, flush=True)
    runs: list[Run] = []
    for rnd in range(-args.warmup, args.rounds):
        order = cases[rnd % len(cases):] + cases[:rnd % len(cases)]      # interleaved, rotated each round
        for case in order:
            wait_idle(nodes)
            run = Run(case, rnd, load_now())
            try:
                launchers[case](run, e, scratch)
            except Exception as exc:  # a failed launch is a result: recorded, and the series goes on
                run.error = f"{type(exc).__name__}: {exc}"[:300]
            settle(nodes, run)
            shown = ", ".join(f"{k} {v:.1f}" for k, v in run.t.items())
            print(f"{'warm-up' if rnd < 0 else f'r{rnd + 1}'} {case}: {shown or run.error} "
                  f"[{run.load}]{' ERROR ' + run.error if run.error and run.t else ''}", flush=True)
            if rnd >= 0:
                runs.append(run)
    texts = {r.text for r in runs if r.text}
    lines = [f"{machine}; {args.rounds} rounds after {args.warmup} warm-up, interleaved",
             "", *table(runs, cases), "", *breakdown(runs, cases), "",
             f"completion texts seen: {sorted(texts)}"]
    errors = [f"- {r.case} r{r.round + 1}: {r.error}" for r in runs if r.error]
    lines += ["", "failures:", *errors] if errors else []
    print("\n".join(lines))
    if args.results:
        Path(args.results).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
