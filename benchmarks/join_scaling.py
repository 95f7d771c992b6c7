"""Benchmark: launch → every node joined Ray, at 2, 4 and 8 nodes (issue 11: flat in node count).

Ray only, no vLLM, on the test bed (`scripts/testbed up --nodes 8`), interleaved over rounds:
- slurm_vllm: `python -m slurm_vllm preflight --ray --json` of tests/configs/test-none-tp2.yaml with
  N nodes x 1 GPU (the job's real bring-up: node program on every node, ports probed and claimed,
  `ray start --head`, workers joining once the GCS port answers, the head's barrier watching Ray
  until N nodes and N GPUs are alive, the network check; then the job ends by itself).
- ray: a plain sbatch script doing the same with Ray's CLI alone (head, then one srun for all the
  workers once the GCS port answers, a poll of ray.nodes() until N are alive): the control, what Ray
  itself costs per node on this host.

The clock starts just before the launch command. Phases, seconds from launch: Slurm started the
job, the Ray head's port answered, every node joined. `cpu` is the host's busy CPU-seconds (all
cores, /proc/stat) from launch to every node joined: with 2 cores shared by every test-bed node,
it tells how much of the growth with N is the host's CPU rather than the tool. Before each run the
queue is empty and nothing is left on the nodes; the load is recorded.

Usage (test bed up with 8 nodes, `eval "$(scripts/testbed env)"`):
    $SLURM_VLLM_TEST_VENV/bin/python benchmarks/join_scaling.py --rounds 3 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers import cancel, env, load_now, stamps, wait_idle  # noqa: E402
from slurm_vllm.core.jobdir import JobDir  # noqa: E402
from slurm_vllm.core.records import Stage  # noqa: E402
from tests.support.testbed import machine_line  # noqa: E402

PHASES = ("running", "ray_head", "joined")
TIMEOUT = 300.0


@dataclass
class Run:
    case: str
    nodes: int
    round: int
    load: str
    t: dict[str, float] = field(default_factory=dict)
    cpu: float | None = None
    error: str = ""


class CpuClock:
    """The host's busy CPU-seconds (all cores) since start, sampled every 0.1 s in a thread."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK")
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def busy(self) -> float:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(fields[:8]) - fields[3] - fields[4]) / self.hz     # all but idle and iowait

    def loop(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.time(), self.busy()))
            self.stop.wait(0.1)

    def __enter__(self) -> CpuClock:
        self.samples.append((time.time(), self.busy()))
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def until(self, t: float) -> float:
        """Busy CPU-seconds from the start to the last sample not after T."""
        before = [b for when, b in self.samples if when <= t]
        return before[-1] - self.samples[0][1]


def spec_for(nodes: int, folder: Path) -> Path:
    data = yaml.safe_load((ROOT / "tests" / "configs" / "test-none-tp2.yaml").read_text())
    data["name"] = f"join-{nodes}"
    data["slurm"]["nodes"] = nodes
    data["parallelism"] = {"tensor": 1, "pipeline": nodes}     # any factoring: no model is loaded
    data["model"]["path"] = "/nonexistent/model"                # never read: Ray only
    path = folder / f"join-{nodes}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def launch_slurm_vllm(run: Run, e: dict[str, str], scratch: Path) -> None:
    spec = spec_for(run.nodes, scratch)
    with CpuClock() as cpu:
        t0 = time.time()
        out = subprocess.run([sys.executable, "-m", "slurm_vllm", "preflight", "--ray", "--json", str(spec)],
                             capture_output=True, text=True, cwd=scratch, env=e, timeout=TIMEOUT)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "exit 1")
    report = json.loads(out.stdout)
    if len(report["nodes"]) != run.nodes:
        raise RuntimeError(f"{len(report['nodes'])} Ray nodes, not {run.nodes}")
    folder = Path(next(line.rsplit("folder ", 1)[1] for line in out.stderr.splitlines() if "folder " in line))
    times = JobDir(folder).stage_times()           # the last of each: RAY_JOINED N/N
    run.t = {"running": times[Stage.STARTING] - t0, "ray_head": times[Stage.RAY_HEAD] - t0,
             "joined": times[Stage.RAY_JOINED] - t0}
    run.cpu = cpu.until(times[Stage.RAY_JOINED])


RAY_SCRIPT = """#!/bin/bash
#SBATCH --job-name=join-ray-{nodes} --nodes={nodes} --ntasks-per-node=1 --gpus-per-node=1 --cpus-per-task=2
#SBATCH --time=10 --output={scratch}/join-ray-%j.out
set -euo pipefail
source "$SLURM_VLLM_TEST_VENV/bin/activate"
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
times={scratch}/join-ray-$SLURM_JOB_ID.times
stamp() {{ echo "$1 $(date +%s.%N)" >> "$times"; }}
stamp running
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head_ip=$(getent hosts "${{nodes[0]}}" | awk '{{print $1}}')
port=$((6400 + SLURM_JOB_ID % 500))
flags="--block --num-cpus=2 --num-gpus=1 --disable-usage-stats"
srun --nodes=1 --ntasks=1 -w "${{nodes[0]}}" ray start --head --node-ip-address="$head_ip" --port=$port \\
    --include-dashboard=false $flags &
until (exec 3<>"/dev/tcp/$head_ip/$port") 2>/dev/null; do sleep 0.1; done
stamp ray_head
own_ip='$(getent hosts $SLURMD_NODENAME | cut -d" " -f1)'      # expanded by each worker's bash
srun --nodes=$((SLURM_NNODES - 1)) --ntasks-per-node=1 -x "${{nodes[0]}}" \\
    bash -c "exec ray start --node-ip-address=$own_ip --address=$head_ip:$port $flags" &
python - "$head_ip:$port" "$SLURM_NNODES" <<'EOF'
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
while sum(n["Alive"] for n in ray.nodes()) < int(sys.argv[2]):
    time.sleep(0.2)
EOF
stamp joined
"""


def launch_ray(run: Run, e: dict[str, str], scratch: Path) -> None:
    script = scratch / f"join-ray-{run.nodes}.sbatch"
    script.write_text(RAY_SCRIPT.format(nodes=run.nodes, scratch=scratch))
    with CpuClock() as cpu:
        t0 = time.time()
        out = subprocess.run(["sbatch", "--parsable", "--wait", str(script)], capture_output=True, text=True,
                             env=e, timeout=TIMEOUT)
    job_id = out.stdout.strip().split(";")[0]
    if out.returncode != 0:
        if job_id:
            cancel(job_id)
        raise RuntimeError(f"sbatch: {out.stderr.strip()[-200:]}")
    t = stamps(scratch / f"join-ray-{job_id}.times")
    run.t = {k: v - t0 for k, v in t.items()}
    run.cpu = cpu.until(t["joined"])


def table(runs: list[Run], cases: list[str], sizes: list[int]) -> list[str]:
    out = ["| case | nodes | launch → all joined: mean | min / max | growth vs 2 nodes | Slurm start | "
           "Ray head | busy CPU-s to joined | failed |", "|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        base: float | None = None
        for n in sizes:
            mine = [r for r in runs if r.case == case and r.nodes == n]
            ok = [r for r in mine if "joined" in r.t]
            if not ok:
                out.append(f"| {case} | {n} | – | – | – | – | – | – | {len(mine)}/{len(mine)} |")
                continue
            joined = statistics.mean(r.t["joined"] for r in ok)
            base = joined if base is None else base
            mean = {p: statistics.mean(r.t[p] for r in ok) for p in ("running", "ray_head")}
            cpu = statistics.mean(r.cpu for r in ok if r.cpu is not None)
            spread = f"{min(r.t['joined'] for r in ok):.1f} / {max(r.t['joined'] for r in ok):.1f}"
            out.append(f"| {case} | {n} | **{joined:.1f} s** | {spread} | {joined - base:+.1f} s | "
                       f"{mean['running']:.1f} | {mean['ray_head']:.1f} | {cpu:.1f} | "
                       f"{len(mine) - len(ok)}/{len(mine)} |")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="discarded rounds first")
    p.add_argument("--nodes", default="2,4,8")
    p.add_argument("--cases", default="slurm_vllm,ray")
    args = p.parse_args()
    e = env()
    sizes = [int(n) for n in args.nodes.split(",")]
    bed = int(e.get("SLURM_VLLM_TESTBED_NODES") or 0)
    if bed < max(sizes):
        sys.exit(f"join_scaling: the test bed has {bed} nodes; `scripts/testbed up --nodes {max(sizes)}`")
    scratch = Path(tempfile.mkdtemp(prefix="join-", dir=e["SLURM_VLLM_TEST_JOBS_ROOT"]))
    cases = args.cases.split(",")
    launchers: dict[str, Callable[[Run, dict[str, str], Path], None]] = {
        "slurm_vllm": launch_slurm_vllm, "ray": launch_ray}
    machine = machine_line()
    print(machine, flush=True)
    combos = [(c, n) for c in cases for n in sizes]
    runs: list[Run] = []
    for rnd in range(-args.warmup, args.rounds):
        k = rnd % len(combos)
        for case, n in combos[k:] + combos[:k]:          # interleaved, rotated each round
            wait_idle(bed)
            run = Run(case, n, rnd, load_now())
            try:
                launchers[case](run, e, scratch)
            except Exception as exc:  # a failed launch is a result: recorded, and the series goes on
                run.error = f"{type(exc).__name__}: {exc}"[:300]
            wait_idle(bed)
            shown = ", ".join(f"{k} {v:.1f}" for k, v in run.t.items())
            cpu = f", cpu {run.cpu:.1f}" if run.cpu is not None else ""
            print(f"{'warm-up' if rnd < 0 else f'r{rnd + 1}'} {case} {n} nodes: {shown or run.error}{cpu} "
                  f"[{run.load}]", flush=True)
            if rnd >= 0:
                runs.append(run)
    lines = [f"{machine}; {args.rounds} rounds after {args.warmup} warm-up, interleaved", "",
             *table(runs, cases, sizes)]
    errors = [f"- {r.case} {r.nodes} nodes r{r.round + 1}: {r.error}" for r in runs if r.error]
    lines += ["", "failures:", *errors] if errors else []
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
