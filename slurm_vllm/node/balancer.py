"""The replicas' balancer: the vLLM project's router (vllm-router) on loopback, behind the job's door.

`python -m slurm_vllm.node.balancer PORT METRICS_PORT URL...` runs vllm-router in this process on
127.0.0.1:PORT over the replicas' doors (URL: http://<replica head>:<its door port>), its
Prometheus metrics on 127.0.0.1:METRICS_PORT (both in the job's port block: nothing of it faces the
network, and two jobs on one node never collide). It needs no secret: the client's
`Authorization` header passes through it to the replica's door, which checks it. Round robin
spreads requests evenly; its health checks take a replica out of rotation, its retries send a
request that found a dead replica to another.
"""

from __future__ import annotations

import sys
from typing import Any

HEALTH_INTERVAL = 2          # seconds between two health checks of a replica


def router_settings(port: int, metrics_port: int, urls: list[str]) -> dict[str, Any]:
    """vllm-router's RouterArgs for the job (keyword arguments)."""
    return {
        "worker_urls": urls, "host": "127.0.0.1", "port": port, "policy": "round_robin",
        "prometheus_host": "127.0.0.1", "prometheus_port": metrics_port,
        "health_check_interval_secs": HEALTH_INTERVAL, "health_check_timeout_secs": 2,
        "health_failure_threshold": 2, "health_success_threshold": 1,
        # A replica that failed requests is tried again 4 s later (not the router's 60 s): one that
        # was started again is back in rotation as soon as it answers.
        "cb_timeout_duration_secs": 2 * HEALTH_INTERVAL, "cb_success_threshold": 1,
        "worker_startup_timeout_secs": 120, "worker_startup_check_interval": 1,
        "log_level": "info",
    }


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("usage: python -m slurm_vllm.node.balancer PORT METRICS_PORT URL...", file=sys.stderr)
        return 2
    try:
        from vllm_router.router import Router
        from vllm_router.router_args import RouterArgs
    except ImportError as exc:
        print(f"slurm_vllm: parallelism.data > 1 needs vllm-router in the nodes' Python environment "
              f"(pip install 'slurm-vllm[replicas]'): {exc}", file=sys.stderr)
        return 1
    args = RouterArgs(**router_settings(int(argv[0]), int(argv[1]), argv[2:]))
    args._validate_router_args()
    Router.from_args(args).start()          # serves until it is stopped (SIGTERM from the head)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
