"""Benchmark: replicas behind one endpoint on the test bed (real Slurm, Ray, vLLM, sglang-router).

1. Requests/s through the endpoint for R = 1 (one node) and R = 2 (two nodes; the same cores per
   replica): the same chat load (REQUESTS requests, max_tokens 16, CONCURRENCY clients) sent to each.
   On the test bed every node shares the host's CPUs, so the ratio says little about a cluster.
2. What the balancer adds per request, with R = 2 up, over one kept-alive connection, interleaved
   in rounds of 50: through the endpoint (the job's door, the router, a replica's door) and
   straight to the replicas' doors, alternating between the two as the router does (an engine
   that idles between two requests answers slower than one fed without pause, so one door alone
   is not the baseline). Two requests: a 1-token completion, and one vLLM refuses before its
   engine (max_tokens over max_model_len: 400): the path alone. The difference of the medians is
   the job's door and the router.

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


def latencies(urls: list[str], key: str, body: dict[str, object], status: int, n: int) -> list[float]:
    """N requests of BODY over one kept-alive connection to each of URLS, taking them in turn."""
    conns = []
    for url in urls:
        u = urlparse(url)
        conns.append(http.client.HTTPConnection(u.hostname or "", u.port, timeout=30))
    data = json.dumps(body)
    out = []
    for i in range(n):
        conn = conns[i % len(conns)]
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=data,
                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        out.append(time.perf_counter() - t0)
        assert resp.status == status, resp.status
    for conn in conns:
        conn.close()
    return out


def compare(endpoint: dict[str, str], doors: list[str], key: str, body: dict[str, object], status: int,
            probes: int, what: str) -> None:
    through: list[float] = []
    direct: list[float] = []
    for _ in range(probes // 50):
        through += latencies([endpoint["url"].removesuffix("/v1")], key, body, status, 50)
        direct += latencies(doors, key, body, status, 50)
    p50 = (statistics.median(through), statistics.median(direct))
    p99 = (sorted(through)[int(0.99 * len(through))], sorted(direct)[int(0.99 * len(direct))])
    print(f"{what} p50 / p99: through the endpoint {p50[0] * 1e3:.2f} / {p99[0] * 1e3:.2f} ms, straight "
          f"to the replicas' doors in turn {p50[1] * 1e3:.2f} / {p99[1] * 1e3:.2f} ms: the job's door + "
          f"the router add {(p50[0] - p50[1]) * 1e3:.2f} ms at p50", flush=True)


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
                    doors = list(Replicas.read(Path(json.loads(cli("status", job, "--json").stdout)
                                                    ["job_dir"]) / "replicas.json").urls)
                    model = endpoint["model"]
                    compare(endpoint, doors, key, {"model": model, "prompt": "x", "max_tokens": 1}, 200,
                            args.probes, "1-token completion")
                    compare(endpoint, doors, key, {"model": model, "prompt": "x", "max_tokens": 100000},
                            400, args.probes, "refused before the engine (400)")
            finally:
                subprocess.run([sys.executable, "-m", "slurm_vllm", "cancel", job], capture_output=True)
    print(f"R=2 / R=1: {rates[2] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
