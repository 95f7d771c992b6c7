"""The replicas' balancer: SGLang's model gateway (sglang-router) on loopback, behind the job's door.

`python -m slurm_vllm.node.balancer PORT METRICS_PORT KEY_FILE` runs the router in this process on
127.0.0.1:PORT (its Prometheus metrics on 127.0.0.1:METRICS_PORT; both in the job's port block, so
two jobs on one node never collide); the job's head then registers each replica's door (URL:
http://<replica head>:<its door port>) as a worker serving the model (register(): the router takes
the model's name from there, vLLM does not answer its discovery routes). Round robin spreads
requests evenly; its health checks take a replica out of rotation and put it back; its retries send
a request that found a dead replica to another.

Loopback is open to every user of the node, so the router must check a key itself: it is started
with the key of KEY_FILE (the job's API key, or with `vllm.api_key: none` an internal one the job's
door adds), read here and handed over in this process (never on a command line), and refuses every
route that serves or changes something without it (`/workers` to add or remove a replica,
`/flush_cache`, the completions). Why not vllm-router: its admin routes (`/add_worker`,
`/remove_worker`) take no key at all (0.1.17, tried), so anyone on the head node could add a server
of theirs and receive the job's requests with their key.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

HEALTH_INTERVAL = 2          # seconds between two health checks of a replica
START_TIMEOUT = 120          # seconds for the router to listen


def router_settings(port: int, metrics_port: int, key: str) -> dict[str, Any]:
    """sglang-router's RouterArgs for the job (keyword arguments); the replicas come by register()."""
    return {
        "worker_urls": [], "host": "127.0.0.1", "port": port, "policy": "round_robin", "api_key": key,
        "prometheus_host": "127.0.0.1", "prometheus_port": metrics_port,
        "health_check_interval_secs": HEALTH_INTERVAL, "health_check_timeout_secs": 2,
        "health_failure_threshold": 2, "health_success_threshold": 1,
        # No circuit breaker: it counts a client's refused requests (4xx) as the replica's failures,
        # so ten bad requests in a row took every replica out of rotation (503 for everyone; unit
        # test). A dead replica is left by the health checks (2 failed, 2 s apart) and, meanwhile,
        # a request that finds it gone is retried on another.
        "disable_circuit_breaker": True,
        # Until they do (2-4 s), round robin may pick the dead replica again for a retry: up to 10
        # tries, at most 0.5 s apart (a dead replica's door answers 503 at once), so a request
        # finds the live one (the router's 5 tries lost one request in two kills under load).
        "retry_max_retries": 10, "retry_initial_backoff_ms": 50, "retry_max_backoff_ms": 500,
        "worker_startup_timeout_secs": 120, "worker_startup_check_interval": 1,
        "log_level": "info",
    }


def _call(port: int, key: str, method: str, path: str, body: object = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read() or b"null")


def register(port: int, key: str, model: str, urls: list[str]) -> None:
    """Each URL a worker of the router serving MODEL. No key of its own for the worker: the router
    passes on the client's Authorization, which it checked (the replicas' doors check it again and
    refuse a request that carries two)."""
    for url in urls:
        _call(port, key, "POST", "/workers", {"url": url, "model_id": model})


def healthy_workers(port: int, key: str) -> int:
    """How many of the router's workers are healthy (0 while it does not answer)."""
    try:
        listing = _call(port, key, "GET", "/workers")
    except (OSError, ValueError):
        return 0
    return sum(1 for w in listing.get("workers", []) if w.get("is_healthy"))


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m slurm_vllm.node.balancer PORT METRICS_PORT KEY_FILE",
              file=sys.stderr)
        return 2
    try:
        from sglang_router.router import Router
        from sglang_router.router_args import RouterArgs
    except ImportError as exc:
        print(f"slurm_vllm: parallelism.data > 1 needs sglang-router in the nodes' Python environment "
              f"(pip install 'slurm-vllm[replicas]'): {exc}", file=sys.stderr)
        return 1
    from slurm_vllm.core.jobdir import read_secret
    port, metrics_port, key = int(argv[0]), int(argv[1]), read_secret(Path(argv[2]))
    Router.from_args(RouterArgs(**router_settings(port, metrics_port, key))).start()   # until SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
