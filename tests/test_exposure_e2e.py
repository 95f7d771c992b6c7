"""e2e: what another user on the cluster's network can reach of a job (issue 26's surface table).

For a READY TP2 job over node1+node2 (each backend) and a 1-node job on node1: every TCP socket the
job opened on its nodes (ss in each node's namespace, before and after), tried from node3 (not in the
allocation) as a stranger would: a TCP connect, and a plain ZeroMQ subscriber on each reachable port
while the endpoint answers three chats. The table is printed (the README's security section holds it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from .support.cli import chat, cli, expected
from .support.specs import derive
from .support.testbed import STRANGER, in_node, listening
from .test_serve_e2e import cancel_and_check_clean

pytestmark = pytest.mark.e2e
LOOPBACK = ("127.0.0.1", "::1")


def surface(testbed: dict[str, str], spec: Path, nodes: list[int]) -> list[dict[str, object]]:
    """Submit SPEC, wait READY, and return one row per socket the job listens on."""
    before = {n: listening(n) for n in nodes}
    out = cli("submit", str(spec), "--wait", "--json", timeout=900)
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout.splitlines()[0])
    try:
        endpoint = json.loads(cli("endpoint", job["job_id"], "--json").stdout)
        key = Path(endpoint["api_key_file"]).read_text().strip()
        rows: list[dict[str, object]] = []
        for n in nodes:
            ip = socket.gethostbyname(f"node{n}")
            for addr, port, program in sorted(listening(n) - before[n]):
                host = ip if addr in ("0.0.0.0", "*", "::") else addr
                target = None if addr in LOOPBACK else f"{host}:{port}"
                rows.append({"node": f"node{n}", "listen": f"{addr}:{port}", "program": program,
                             "target": target})
        targets = [str(r["target"]) for r in rows if r["target"]]
        stranger = subprocess.Popen(in_node(3, [os.environ["SLURM_VLLM_TEST_VENV"] + "/bin/python", "-c",
                                                STRANGER, json.dumps(targets), "20"]),
                                    stdout=subprocess.PIPE, text=True)
        assert stranger.stdout is not None and stranger.stdout.readline().strip() == "ready"
        for _ in range(3):
            assert chat(endpoint, key) == expected(testbed["SLURM_VLLM_TEST_MODEL"])
        seen = json.loads(stranger.communicate(timeout=60)[0])
        for r in rows:
            t = r["target"]
            r["reachable"] = bool(t and seen["reach"][t])
            r["messages"] = seen["messages"].get(t, 0) if t else 0
        api_port = int(endpoint["url"].rsplit(":", 1)[1].split("/")[0])
        r_api = [r for r in rows if str(r["listen"]).endswith(f":{api_port}")]
        assert [r["program"] for r in r_api] == ["python3"] or len(r_api) == 1, r_api   # the front door
        return rows
    finally:
        cancel_and_check_clean(job["job_id"], nodes=3)


def table(title: str, rows: list[dict[str, object]]) -> str:
    lines = [title, f"{'node':6} {'listens on':24} {'program':18} {'from node3':12} {'pickles got':>11}"]
    for r in rows:
        where = "reachable" if r["reachable"] else ("loopback" if not r["target"] else "refused")
        lines.append(f"{r['node']:6} {r['listen']!s:24} {r['program']!s:18} {where:12} {r['messages']!s:>11}")
    return "\n".join(lines)


@pytest.mark.parametrize("backend", ["ray", "mp"])
def test_what_a_stranger_on_the_network_reaches_of_a_two_node_job(backend: str, testbed: dict[str, str],
                                                                   tmp_path: Path) -> None:
    base = "test-none-tp2.yaml" if backend == "ray" else "test-none-tp2-mp.yaml"
    spec = derive(tmp_path, base, f"exposure-{backend}",
                  **{"slurm.extra_directives": {"nodelist": "node[1-2]"}})
    rows = surface(testbed, spec, [1, 2])
    print("\n" + table(f"TP2 over node1+node2, backend {backend}:", rows))
    leaking = [r for r in rows if r["messages"]]
    # What the README says a stranger receives: the head's engine broadcast (vLLM's ZeroMQ publisher)
    # and nothing from any other program.
    assert all(r["node"] == "node1" and r["program"] not in ("raylet", "gcs_server")
               for r in leaking), leaking


def test_what_a_stranger_on_the_network_reaches_of_a_one_node_job(testbed: dict[str, str],
                                                                  tmp_path: Path) -> None:
    """A 1-node job with the default backend (auto: vLLM's own executor within one node, no Ray):
    nothing of the prompts leaves the node, and on the node's address only the front door, torch's
    store and srun listen (the README's table; what Ray would add — its servers bound to every
    interface whatever --node-ip-address says — shows in the 2-node Ray job above)."""
    spec = derive(tmp_path, "test-none-tp2.yaml", "exposure-1node", **{
        "slurm.nodes": 1, "parallelism.tensor": 1, "slurm.extra_directives": {"nodelist": "node1"}})
    rows = surface(testbed, spec, [1])
    print("\n" + table("TP1 on node1 (backend auto):", rows))
    assert not any(r["messages"] for r in rows), rows       # nothing of the prompts leaves the node
    reachable = {str(r["program"]) for r in rows if r["reachable"]}
    assert reachable <= {"python", "python3", "VLLM::EngineCor", "srun"}, reachable
