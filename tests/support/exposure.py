"""What another user on the cluster's network reaches of a READY job (the README's surface table).

Every TCP socket the job opened on its nodes (ss in each node's namespace, before and after), tried
from node3 (outside the allocations that use this) as a stranger would: a TCP connect, and a plain
ZeroMQ subscriber on each reachable port while the endpoint answers three chats.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

from .cli import chat, cli
from .testbed import STRANGER, in_node, listening

LOOPBACK = ("127.0.0.1", "::1")
Sockets = dict[int, set[tuple[str, int, str]]]


def sockets(nodes: list[int]) -> Sockets:
    """The listening sockets of each test-bed node in NODES (take it before the job starts)."""
    return {n: listening(n) for n in nodes}


def surface(job: str, before: Sockets, answer: str) -> list[dict[str, object]]:
    """One row per socket the READY JOB listens on (those not in BEFORE), with whether the stranger
    on node3 reached it and how many pickled messages it got while the endpoint answered three chats
    (each must be ANSWER)."""
    endpoint = json.loads(cli("endpoint", job, "--json").stdout)
    key = Path(endpoint["api_key_file"]).read_text().strip()
    rows: list[dict[str, object]] = []
    for n in before:
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
        assert chat(endpoint, key) == answer
    seen = json.loads(stranger.communicate(timeout=60)[0])
    for r in rows:
        t = r["target"]
        r["reachable"] = bool(t and seen["reach"][t])
        r["messages"] = seen["messages"].get(t, 0) if t else 0
    api_port = int(endpoint["url"].rsplit(":", 1)[1].split("/")[0])
    r_api = [r for r in rows if str(r["listen"]).endswith(f":{api_port}")]
    assert [r["program"] for r in r_api] == ["python3"] or len(r_api) == 1, r_api   # the front door
    return rows


def table(title: str, rows: list[dict[str, object]]) -> str:
    lines = [title, f"{'node':6} {'listens on':24} {'program':18} {'from node3':12} {'pickles got':>11}"]
    for r in rows:
        where = "reachable" if r["reachable"] else ("loopback" if not r["target"] else "refused")
        lines.append(f"{r['node']:6} {r['listen']!s:24} {r['program']!s:18} {where:12} {r['messages']!s:>11}")
    return "\n".join(lines)


def beyond_the_engine_broadcast(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """The rows that sent the stranger anything other than what the README says a 2-node job gives
    away: the head's engine broadcast (vLLM's ZeroMQ publisher), never a Ray server's."""
    return [r for r in rows
            if r["messages"] and (r["node"] != "node1" or r["program"] in ("raylet", "gcs_server"))]
