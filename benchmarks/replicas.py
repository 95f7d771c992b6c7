"""Benchmark: replicas behind one endpoint on the test bed (real Slurm, Ray, vLLM, sglang-router).

1. Requests/s through the endpoint for R = 1 (one node) and R = 2 (two nodes; the same cores per
   replica): the same chat load (REQUESTS requests, max_tokens 16, CONCURRENCY clients) sent to each.
   On the test bed every node shares the host's CPUs, so the ratio says little about a cluster.
2. What the balancer adds per request: with R = 2 up, a 1-token completion (POST /v1/completions,
   max_tokens 1: the router passes it on, the shortest work vLLM does) sequentially over a
   kept-alive connection, interleaved, through the endpoint (the job's door, the router, a
   replica's door) and straight to a replica's door; the difference of the medians is the job's
   door and the router.

Usage: eval "$(scripts/testbed env)"; python benchmarks/replicas.py [--requests 200] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slurm_vllm.core.records import Replicas  # noqa: E402
from tests.support.cli import chat, cli  # noqa: E402
from tests.support.specs import derive  # noqa: E402
from tests.support.testbed import machine_line  # noqa: E402


def submit(spec: Path) -> tuple[str, Path, dict[str, str], str]:
    out = cli("submit", str(spec), "--wait", "--json", timeout=900)
    job = json.loads(out.stdout.splitlines()[0])
    if out.returncode != 0:
        raise SystemExit(f"submit failed: {out.stderr}")
    endpoint = json.loads(cli("endpoint", job["job_id"], "--json").stdout)
    key = Path(endpoint["api_key_file"]).read_text().strip()
    return job["job_id"], Path(job["job_dir"]), endpoint, key


def load(endpoint: dict[str, str], key: str, n: int, clients: int) -> float:
    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda i: chat(endpoint, key, f"question {i}"), range(n)))
    return n / (time.monotonic() - t0)


def latencies(url: str, key: str, model: str, n: int) -> list[float]:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=30)
    body = json.dumps({"model": model, "prompt": "x", "max_tokens": 1})
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=body,
                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        out.append(time.perf_counter() - t0)
        assert resp.status == 200, resp.status
    conn.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--probes", type=int, default=500)
    args = parser.parse_args()
    print(machine_line())
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in (1, 2):
            spec = derive(Path(tmp), "test-none-replicas2.yaml", f"bench-replicas-{r}",
                          **{"parallelism.data": r, "slurm.nodes": r})
            job, _, endpoint, key = submit(spec)
            try:
                load(endpoint, key, 16, 8)                           # warm-up (compiled kernels)
                rates[r] = load(endpoint, key, args.requests, args.concurrency)
                print(f"R={r}: {rates[r]:.1f} req/s ({args.requests} chats, max_tokens 16, "
                      f"{args.concurrency} clients)", flush=True)
                if r == 2:
                    door = Replicas.read(Path(json.loads(cli("status", job, "--json").stdout)["job_dir"])
                                         / "replicas.json").urls[1]
                    through, direct = [], []
                    for _ in range(args.probes // 50):               # interleaved in rounds of 50
                        through += latencies(endpoint["url"].removesuffix("/v1"), key, endpoint["model"], 50)
                        direct += latencies(door, key, endpoint["model"], 50)
                    p50 = (statistics.median(through), statistics.median(direct))
                    p99 = (sorted(through)[int(0.99 * len(through))], sorted(direct)[int(0.99 * len(direct))])
                    print(f"1-token completion p50 / p99: through the endpoint {p50[0] * 1e3:.2f} / "
                          f"{p99[0] * 1e3:.2f} ms, straight to a replica's door {p50[1] * 1e3:.2f} / "
                          f"{p99[1] * 1e3:.2f} ms: the job's door + the router add "
                          f"{(p50[0] - p50[1]) * 1e3:.2f} ms at p50", flush=True)
            finally:
                subprocess.run([sys.executable, "-m", "slurm_vllm", "cancel", job], capture_output=True)
    print(f"R=2 / R=1: {rates[2] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
