"""Benchmark: the alternative to replicas behind vllm-router, vLLM's own data parallelism, on the test bed.

One vLLM server with `--data-parallel-size 2` over two nodes (node 1: the API server and engine 0;
node 2: engine 1, `--headless`), started by a plain sbatch script from the test virtualenv, the test
model, TP1 per engine: the layout of `parallelism.data: 2` (benchmarks/replicas.py). The same chat load
(requests/s), then engine 1's processes killed while requests are in flight: how many requests fail,
and whether the server still answers afterwards.

Usage: eval "$(scripts/testbed env)"; python benchmarks/vllm_dp.py [--requests 200] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.cli import chat  # noqa: E402
from tests.support.testbed import machine_line, node_processes  # noqa: E402

PORT, RPC = 28000, 28010
SCRIPT = """#!/bin/bash
#SBATCH --nodes=2 --nodelist=node[1-2] --ntasks-per-node=1 --cpus-per-task=2 --time=20 --output={out}
source {venv}/bin/activate
export VLLM_CPU_KVCACHE_SPACE=1
srun --kill-on-bad-exit=0 bash -c '
common="{model} --served-model-name tiny --max-model-len 256 --dtype float32 --enforce-eager \\
  --data-parallel-size 2 --data-parallel-size-local 1 --data-parallel-address 10.77.0.11 \\
  --data-parallel-rpc-port {rpc}"
if [ "$SLURM_PROCID" = 0 ]; then exec vllm serve $common --host 10.77.0.11 --port {port}
else exec vllm serve $common --headless --data-parallel-start-rank 1; fi'
"""


def wait_up(endpoint: dict[str, str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            chat(endpoint, None, "warm up")
            return
        except Exception as exc:   # starting: connection refused, 503…
            if time.monotonic() > deadline:
                raise SystemExit(f"vLLM DP did not answer within {timeout:.0f} s: {exc}") from None
            time.sleep(2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    print(machine_line())
    venv, model = os.environ["SLURM_VLLM_TEST_VENV"], os.environ["SLURM_VLLM_TEST_MODEL"]
    with tempfile.TemporaryDirectory(dir=os.environ["SLURM_VLLM_TEST_JOBS_ROOT"]) as tmp:
        out = Path(tmp) / "dp-%j.out"
        script = Path(tmp) / "dp.sbatch"
        script.write_text(SCRIPT.format(out=out, venv=shlex.quote(venv), model=model, port=PORT, rpc=RPC))
        job = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                             check=True).stdout.strip()
        endpoint = {"url": f"http://10.77.0.11:{PORT}/v1", "model": "tiny"}
        try:
            t0 = time.monotonic()
            wait_up(endpoint, 600)
            print(f"vLLM DP=2 (2 nodes, TP1 each) answered {time.monotonic() - t0:.0f} s after sbatch",
                  flush=True)
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda i: chat(endpoint, None, f"warm {i}"), range(16)))
            t0 = time.monotonic()
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(lambda i: chat(endpoint, None, f"question {i}"), range(args.requests)))
            rate = args.requests / (time.monotonic() - t0)
            print(f"vLLM DP=2: {rate:.1f} req/s ({args.requests} chats, max_tokens 16, "
                  f"{args.concurrency} clients)", flush=True)
            failed: list[str] = []

            def one(i: int) -> None:
                try:
                    chat(endpoint, None, f"again {i}")
                except Exception as exc:
                    failed.append(type(exc).__name__)

            with ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(one, i) for i in range(args.requests)]
                time.sleep(3)
                engine = [pid for pid, _, cmd in node_processes(2) if cmd.startswith(("VLLM", "vllm"))]
                for pid in engine:
                    os.kill(pid, signal.SIGKILL)
                for f in futures:
                    f.result()
            after = "no"
            try:
                chat(endpoint, None, "after")
                after = "yes"
            except Exception as exc:
                after = f"no ({type(exc).__name__})"
            print(f"vLLM DP=2, engine 1's {len(engine)} processes killed under {args.requests} requests: "
                  f"{len(failed)} failed ({', '.join(sorted(set(failed))) or '-'}); the server answers "
                  f"afterwards: {after}")
        finally:
            subprocess.run(["scancel", job], check=False)
            for name in out.parent.glob("dp-*.out"):
                print(f"--- {name.name} (last lines)\n" + "\n".join(name.read_text().splitlines()[-5:]))


if __name__ == "__main__":
    main()
