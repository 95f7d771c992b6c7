"""Benchmark: time from `submit` to READY on the test bed, split into Slurm start, Ray joined, vLLM ready.

For each spec given (default: the e2e configs), submits it, waits for READY, reads the job's
stage.log (every stage with its time), cancels, and prints one row. `--single` also times a plain
single-node `vllm serve` of the same tiny model on node1 (its own sbatch job) for comparison.

Usage (test bed up, `eval "$(scripts/testbed env)"`):
    $SLURM_VLLM_TEST_VENV/bin/python benchmarks/startup.py [--single] [tests/configs/X.yaml ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["tests/configs/test-none-tp2.yaml", "tests/configs/test-podman-tp2.yaml",
           "tests/configs/test-docker-pp2.yaml"]


def stages(job_dir: Path) -> dict[str, float]:
    first: dict[str, float] = {}
    for line in (job_dir / "stage.log").read_text().splitlines():
        t, stage = line.split()[:2]
        first.setdefault(stage, float(t))
    return first


def bench_spec(spec: str) -> dict[str, object]:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "slurm_vllm", "submit", spec, "--wait", "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    t_ready = time.time()
    job = json.loads(out.stdout.splitlines()[0])
    job_dir = Path(job["job_dir"])
    try:
        if out.returncode != 0:
            return {"spec": spec, "error": out.stderr.strip().splitlines()[-1]}
        s = stages(job_dir)
        return {"spec": Path(spec).name, "submit_to_ready": round(t_ready - t0, 1),
                "slurm_start": round(s["STARTING"] - t0, 1),
                "ray_joined": round(s["LOADING"] - s["STARTING"], 1),
                "vllm_ready": round(s["READY"] - s["LOADING"], 1)}
    finally:
        subprocess.run([sys.executable, "-m", "slurm_vllm", "cancel", str(job_dir)], capture_output=True)


SINGLE = """#!/bin/bash
#SBATCH --nodes=1 --nodelist=node1 --cpus-per-task=2 --time=15 --output=single-%j.out
source "$SLURM_VLLM_TEST_VENV/bin/activate"
echo "start $(date +%s.%N)" > times
vllm serve "$SLURM_VLLM_TEST_MODEL" --served-model-name tiny --max-model-len 256 --dtype float32 \\
    --enforce-eager --host 10.77.0.11 --port 29999 > vllm.log 2>&1 &
until curl -sf http://10.77.0.11:29999/health > /dev/null; do kill -0 $! || exit 1; sleep 0.5; done
echo "ready $(date +%s.%N)" >> times
kill $!; wait
"""


def bench_single() -> dict[str, object]:
    folder = Path(os.environ["SLURM_VLLM_TEST_JOBS_ROOT"]) / f"bench-single-{int(time.time())}"
    folder.mkdir(parents=True)
    (folder / "single.sbatch").write_text(SINGLE)
    t0 = time.time()
    subprocess.run(["sbatch", "--wait", "single.sbatch"], cwd=folder, check=True, capture_output=True)
    times = dict(line.split() for line in (folder / "times").read_text().splitlines())
    return {"spec": "plain single-node vllm serve (TP1, eager)",
            "slurm_start": round(float(times["start"]) - t0, 1),
            "vllm_ready": round(float(times["ready"]) - float(times["start"]), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*", default=DEFAULT)
    parser.add_argument("--single", action="store_true")
    args = parser.parse_args()
    rows = [bench_spec(s) for s in args.specs]
    if args.single:
        rows.append(bench_single())
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
