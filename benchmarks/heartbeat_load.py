"""Benchmark: no false "node stopped answering" under load. A TP2 batch job over two test-bed nodes
(which share the host's 2 cores with everything else) sends for at least --minutes; it must end
DONE, and each rank's log gives the longest time it went without a heartbeat answer from its peer
(the limit is node/heartbeat.py's SILENCE). Usage (test bed up, `eval "$(scripts/testbed env)"`):
    $SLURM_VLLM_TEST_VENV/bin/python benchmarks/heartbeat_load.py [--minutes 3] [--concurrency 64]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=40000, help="more than the time can send")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="hb-load-", dir=os.environ["SLURM_VLLM_TEST_JOBS_ROOT"]))
    inp = folder / "input.jsonl"
    body = {"model": "tiny", "max_tokens": 32, "temperature": 0}
    inp.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                       "body": {**body, "prompt": f"The number {i} is"}}) + "\n"
                           for i in range(args.requests)))
    data = yaml.safe_load((ROOT / "tests" / "configs" / "test-batch-tp2.yaml").read_text())
    data["name"] = "hb-load"
    data["batch"] = {"input": str(inp), "output": str(folder / "out.jsonl"), "concurrency": args.concurrency}
    data["slurm"]["extra_directives"] = {"nodelist": "node[1-2]"}
    spec = folder / "hb-load.yaml"
    spec.write_text(yaml.safe_dump(data))
    cli = [sys.executable, "-m", "slurm_vllm"]
    out = subprocess.run([*cli, "submit", str(spec), "--json"], capture_output=True, text=True, cwd=ROOT,
                         check=True)
    job = json.loads(out.stdout)
    job_id, job_dir = job["job_id"], Path(job["job_dir"])
    sending = None
    cancelled = False
    while True:
        st = json.loads(subprocess.run([*cli, "status", job_id, "--json"], capture_output=True, text=True,
                                       cwd=ROOT, check=True).stdout)
        if st["stage"] == "BATCH" and sending is None:
            sending = time.monotonic()
        if st["stage"] in ("FAILED", "CANCELLED", "DONE", "TIMEOUT"):
            break
        if sending is not None and not cancelled and time.monotonic() - sending >= args.minutes * 60:
            subprocess.run([*cli, "cancel", job_id], cwd=ROOT, check=True, capture_output=True)
            cancelled = True
        time.sleep(2)
    under_load = time.monotonic() - (sending or time.monotonic())
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        time.sleep(1)
    print(f"stage {st['stage']} after {under_load:.0f} s sending: {st['detail'][:200]}")
    for log in sorted((job_dir / "logs").glob("task-*.out")):
        text = log.read_text(errors="replace")
        lines = [line for line in text.splitlines() if line.startswith("heartbeat:")]
        print(f"{log.name}: {lines[-1] if lines else '(no heartbeat line)'}")
    false_alarm = st["stage"] == "FAILED"
    print("false 'stopped answering': " + ("YES" if false_alarm else "none"))
    return 1 if false_alarm else 0


if __name__ == "__main__":
    sys.exit(main())
