"""e2e on the test bed: replicas (parallelism.data) behind one endpoint through vllm-router."""

from __future__ import annotations

import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from slurm_vllm.core.records import Endpoint, Replicas

from .support.cli import chat, cli, expected, status
from .support.testbed import node_processes
from .test_serve_e2e import allocation, cancel_and_check_clean, submit_wait

pytestmark = pytest.mark.e2e
LOAD = 200


def served(url: str, key: str) -> float:
    """How many requests the vLLM behind URL (a replica's door) has answered: its own metrics."""
    req = urllib.request.Request(url.removesuffix("/v1") + "/metrics",
                                 headers={"Authorization": f"Bearer {key}"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    return sum(float(m) for m in re.findall(r"^vllm:request_success_total\{[^}]*\} (\S+)$", text, re.M))


def test_two_replicas_serve_behind_one_endpoint_and_share_the_load(testbed: dict[str, str]) -> None:
    """R=2, each TP1 on a node of its own: validate shows the layout; one endpoint (the key on every
    route, at the door and at each replica's); a vLLM server on each node; 200 requests through the
    endpoint, each answered, each replica serving at least 30% (its own metrics); cancel leaves
    nothing, the router included."""
    out = cli("validate", str(Path(__file__).parent / "configs" / "test-none-replicas2.yaml"))
    assert "ok: layout: replica 0 on node 1, replica 1 on node 2" in out.stdout, out
    job, job_dir = submit_wait("test-none-replicas2.yaml")
    try:
        st = status(job)
        assert st["stage"] == "READY" and st["detail"].endswith("(2/2 replicas)"), st
        endpoint = json.loads(cli("endpoint", job, "--json").stdout)
        key = Path(endpoint["api_key_file"]).read_text().strip()
        assert chat(endpoint, key) == expected(testbed["SLURM_VLLM_TEST_MODEL"])
        nodes = allocation(job)
        servers = {n: sum("vllm serve" in cmd for _, _, cmd in node_processes(int(n[-1]))) for n in nodes}
        assert servers == {n: 1 for n in nodes}, servers              # one server on each node
        replica_urls = list(Replicas.read(job_dir / "replicas.json").urls)     # each replica's door
        second = Endpoint.read(job_dir / "replica-1" / "endpoint.json").url
        assert len(replica_urls) == 2 and replica_urls[1] == second.removesuffix("/v1")
        for url in (endpoint["url"], *replica_urls):                  # the key on every route
            req = urllib.request.Request(url.removesuffix("/v1") + "/metrics")
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(req, timeout=10)
            assert info.value.code == 401
        before = [served(u, key) for u in replica_urls]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: chat(endpoint, key, f"question {i}"), range(LOAD)))
        assert len(answers) == LOAD and all(isinstance(a, str) for a in answers)
        shares = [served(u, key) - b for u, b in zip(replica_urls, before, strict=True)]
        assert sum(shares) == LOAD and min(shares) >= 0.3 * LOAD, shares
        print(f"replicas: {LOAD} requests through the endpoint, served {shares[0]:.0f} / {shares[1]:.0f}")
    finally:
        cancel_and_check_clean(job)
