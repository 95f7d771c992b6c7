"""Benchmark: batch mode's steady-state throughput against `vllm run-batch`, and its change with
`batch.concurrency`, on the test bed (same model, same node, TP1 x PP1, the same 1,000 chat requests).

slurm_vllm: one batch job per concurrency; the rate is the driver's (answered / seconds sending,
batch.json), start-up is submit → BATCH. vllm run-batch: one process in a plain sbatch job on the
same kind of node, run twice (1 request, then all): its steady rate is (N - 1) / (T_N - T_1), its
start-up T_1. Usage (test bed up, `eval "$(scripts/testbed env)"`):
    $SLURM_VLLM_TEST_VENV/bin/python benchmarks/batch_throughput.py [--requests 1000] \
        [--concurrency 16 64 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--max-model-len", "256", "--dtype", "float32", "--enforce-eager"]
RUN_BATCH = """#!/bin/bash
#SBATCH --nodes=1 --ntasks=1 --gpus-per-node=1 --cpus-per-task=2 --time=30 --output={out}/run-batch-%j.out
set -euo pipefail
source "$SLURM_VLLM_TEST_VENV/bin/activate"
cd {out}
for n in 1 {n}; do
  t0=$(date +%s.%N)
  vllm run-batch -i input-$n.jsonl -o output-$n.jsonl --model "$SLURM_VLLM_TEST_MODEL" \\
      --served-model-name tiny {args} > run-batch-$n.log 2>&1
  echo "$n $t0 $(date +%s.%N)" >> times
done
"""


def requests(n: int) -> str:
    """N chat requests (vllm run-batch takes chat, not /v1/completions), 16 tokens each."""
    return "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": "tiny", "max_tokens": 16, "temperature": 0,
                                        "messages": [{"role": "user", "content": f"Count to {i}."}]}}) + "\n"
                   for i in range(n))


def wait_gone(job_id: str) -> None:
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        time.sleep(1)


def ours(folder: Path, n: int, concurrency: int) -> tuple[float, float]:
    """(start-up seconds, steady req/s) of one slurm_vllm batch job."""
    data = yaml.safe_load((ROOT / "tests" / "configs" / "test-batch-tp2.yaml").read_text())
    data["name"] = f"bench-c{concurrency}"
    data["slurm"].update(nodes=1)
    data["parallelism"] = {"tensor": 1, "pipeline": 1}
    out = folder / f"results-c{concurrency}.jsonl"
    out.unlink(missing_ok=True)
    data["batch"] = {"input": str(folder / f"input-{n}.jsonl"), "output": str(out),
                     "concurrency": concurrency}
    spec = folder / f"bench-c{concurrency}.yaml"
    spec.write_text(yaml.safe_dump(data))
    t0 = time.time()
    run = subprocess.run([sys.executable, "-m", "slurm_vllm", "submit", str(spec), "--wait", "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    job = json.loads(run.stdout.splitlines()[0])
    if run.returncode:
        raise SystemExit(f"batch job failed: {run.stderr[-2000:]}")
    log = Path(job["job_dir"], "stage.log").read_text().splitlines()
    started = next(float(line.split()[0]) for line in log if line.split()[1] == "BATCH")
    rate = json.loads(Path(job["job_dir"], "batch.json").read_text())["rate"]
    wait_gone(job["job_id"])
    return started - t0, rate


def theirs(folder: Path, n: int) -> tuple[float, float]:
    """(start-up seconds, steady req/s) of `vllm run-batch` in a plain sbatch job."""
    script = folder / "run-batch.sbatch"
    script.write_text(RUN_BATCH.format(out=folder, n=n, args=" ".join(ARGS)))
    (folder / "times").unlink(missing_ok=True)
    job_id = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                            check=True).stdout.strip()
    wait_gone(job_id)
    times = {int(a): float(c) - float(b) for a, b, c in (line.split() for line in
                                                           (folder / "times").read_text().splitlines())}
    return times[1], (n - 1) / (times[n] - times[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 256])
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="batch-bench-", dir=os.environ["SLURM_VLLM_TEST_JOBS_ROOT"]))
    for n in (1, args.requests):
        (folder / f"input-{n}.jsonl").write_text(requests(n))
    start, rate = theirs(folder, args.requests)
    print(f"vllm run-batch        start-up {start:6.1f} s   steady {rate:6.1f} req/s", flush=True)
    best = 0.0
    for c in args.concurrency:
        s, r = ours(folder, args.requests, c)
        best = max(best, r)
        print(f"slurm_vllm c={c:<4}     start-up {s:6.1f} s   steady {r:6.1f} req/s   "
              f"({r / rate:.0%} of run-batch)", flush=True)
    verdict = "meets" if best >= 0.95 * rate else "BELOW"
    print(f"best: {best / rate:.0%} of vllm run-batch's steady rate ({verdict} the 95% bar); "
          f"files in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
