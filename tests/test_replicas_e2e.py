"""e2e on the test bed: replicas (parallelism.data) behind one endpoint through the router (sglang-router)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from slurm_vllm.core.records import Endpoint, Replicas

from .support.cli import chat, cli, expected, status
from .support.specs import derive
from .support.testbed import node_processes
from .test_serve_e2e import allocation, cancel_and_check_clean, submit_wait

pytestmark = pytest.mark.e2e
LOAD = 100
LINKS = ("eth0", "eth1")


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
        stranger_meets_a_closed_router(job_dir, nodes[0])
        kill_one_replica_under_load(job, job_dir, endpoint, key, replica_urls[1], nodes[1])
        lose_a_replicas_node(job, endpoint, key, nodes[1])
    finally:
        for link in LINKS:                                    # back up, whatever happened
            subprocess.run(["ip", "netns", "exec", f"svt-node{nodes[1][-1]}", "ip", "link", "set", link,
                            "up"], check=False)
        cancel_and_check_clean(job)


def stranger_meets_a_closed_router(job_dir: Path, head: str) -> None:
    """Another user on the head node reaches the router's loopback port: without the key it can
    neither list, add nor remove replicas, nor send a request (every route that serves or changes
    something answers 401), and the replicas stay the job's two."""
    argv = next(cmd for _, _, cmd in node_processes(int(head[-1])) if "slurm_vllm.node.balancer" in cmd)
    port = int(argv.split("slurm_vllm.node.balancer", 1)[1].split()[0])

    def call(method: str, path: str, body: object = None) -> int:
        script = ("import json, sys, urllib.request, urllib.error\n"
                  "req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode() or None, "
                  "method=sys.argv[3], headers={'Content-Type': 'application/json'})\n"
                  "try:\n    print(urllib.request.urlopen(req, timeout=10).status)\n"
                  "except urllib.error.HTTPError as e:\n    print(e.code)\n")
        out = subprocess.run(["ip", "netns", "exec", f"svt-node{head[-1]}", sys.executable, "-c", script,
                              f"http://127.0.0.1:{port}{path}", json.dumps(body) if body else "", method],
                             capture_output=True, text=True, timeout=30, check=True)
        return int(out.stdout)

    attempts = {"list": call("GET", "/workers"),
                "add": call("POST", "/workers", {"url": "http://127.0.0.1:9", "model_id": "x"}),
                "remove": call("DELETE", "/workers/any"), "flush": call("POST", "/flush_cache"),
                "chat": call("POST", "/v1/chat/completions", {"model": "x", "messages": []})}
    assert attempts == dict.fromkeys(attempts, 401), attempts
    metrics = subprocess.run(["ip", "netns", "exec", f"svt-node{head[-1]}", "curl", "-s",
                              f"http://127.0.0.1:{port}/engine_metrics"], capture_output=True, text=True,
                             timeout=30)
    assert "vllm:" not in metrics.stdout, metrics.stdout[:300]     # the replicas' doors refuse it too
    assert len(Replicas.read(job_dir / "replicas.json").urls) == 2


def lose_a_replicas_node(job: str, endpoint: dict[str, str], key: str, node: str) -> None:
    """Replica 1's node drops off the network (its links down): within 30 s READY names it
    (`1/2 replicas; replica 1: FAILED lost its node: nodeN …`) and the endpoint serves on."""
    for link in LINKS:
        subprocess.run(["ip", "netns", "exec", f"svt-node{node[-1]}", "ip", "link", "set", link, "down"],
                       check=True)
    down = time.monotonic()
    while "replica 1: FAILED lost its node" not in (st := status(job))["detail"]:
        assert st["stage"] == "READY", st
        assert time.monotonic() - down < 30, f"the lost node not named within 30 s: {st}"
        time.sleep(0.3)
    named = time.monotonic() - down
    assert "(1/2 replicas" in st["detail"] and f"{node} (replica 1's head)" in st["detail"], st
    answers = [chat(endpoint, key, f"after the loss {i}") for i in range(6)]
    assert all(isinstance(a, str) for a in answers)
    print(f"replicas: replica 1's node taken off the network: named in {named:.0f} s ({st['detail']}); "
          f"6 of 6 requests answered after")


def started_in(stage_log: Path) -> float:
    """Seconds from STARTING to the first READY in a stage.log."""
    times = {}
    for line in stage_log.read_text().splitlines():
        t, stage = line.split()[:2]
        times.setdefault(stage, float(t))
    return times["READY"] - times["STARTING"]


def kill_one_replica_under_load(job: str, job_dir: Path, endpoint: dict[str, str], key: str, url: str,
                                node: str) -> None:
    """Replica 1's vLLM killed while 200 requests go through the endpoint: every request answered
    (the client retries nothing), READY says 1/2 while it is away, it is started again on its node
    and is back in rotation (its new server answers requests) within its first start's time."""
    first_start = started_in(job_dir / "replica-1" / "stage.log")
    done: list[str] = []
    failed: list[str] = []
    seen_degraded = False

    def one(i: int) -> None:
        import openai
        try:
            done.append(chat(endpoint, key, f"again {i}"))
        except openai.APIError as exc:           # generating on the killed server at that moment
            failed.append(f"{type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(LOAD)]
        while len(done) < 40:
            time.sleep(0.05)
        victim = next(pid for pid, _, cmd in node_processes(int(node[-1])) if "vllm serve" in cmd)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        while not all(f.done() for f in futures):
            seen_degraded |= "(1/2 replicas" in status(job)["detail"]
            time.sleep(0.3)
        for f in futures:
            f.result()
    # A request the killed server had not begun to answer (a non-streamed answer comes whole, at
    # the end) gets 503 from its door, and the router sends it to the other replica: none fails.
    assert len(done) == LOAD and not failed, failed
    while "(2/2 replicas" not in (st := status(job))["detail"]:
        seen_degraded |= "(1/2 replicas" in st["detail"]
        assert st["stage"] == "READY", st
        assert time.monotonic() - killed < 1.5 * first_start + 30, f"replica 1 not back: {st}"
        time.sleep(0.3)
    ready_again = time.monotonic() - killed
    assert seen_degraded, "READY never said 1/2 replicas while replica 1 was away"
    assert "serving again after restart 1" in (job_dir / "replica-1" / "stage").read_text()
    sent = 0
    with ThreadPoolExecutor(4) as pool:     # the router's next health checks put it back in rotation
        while served(url, key) < 4:
            assert sent < 200, f"the restarted replica got {served(url, key):.0f} of {sent} requests"
            list(pool.map(lambda i: chat(endpoint, key, f"back {i}"), range(sent, sent + 4)))
            sent += 4
    back = time.monotonic() - killed
    assert back < 1.5 * first_start + 30, f"back in rotation {back:.0f} s after the kill"
    print(f"replicas: replica 1's vLLM killed under load: {len(done)}/{LOAD} answered; READY again "
          f"{ready_again:.0f} s and back in rotation {back:.0f} s after the kill (its first start: "
          f"{first_start:.0f} s); {served(url, key):.0f} of the next {sent} requests went to it")


def test_a_batch_over_three_replicas_goes_through_their_router_and_ends_done(testbed: dict[str, str],
                                                                            job_dir: Path) -> None:
    """mode batch with R=3 on 3 nodes: the job's head sends the input through the router (its
    concurrency for each replica); every custom_id once, each server answered a share (its own access
    log: a batch turns it off unless vllm.args says, as this spec does), DONE by itself and nothing
    left on the nodes."""
    from .support.cli import submit
    from .support.failures import wait_released
    from .test_batch_e2e import chat as chat_request
    from .test_batch_e2e import results

    requests = [chat_request(i) for i in range(120)]
    (job_dir / "input.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    spec = derive(job_dir, "test-none-replicas2.yaml", "replicas-batch", mode="batch",
                  **{"parallelism.data": 3, "slurm.nodes": 3, "batch.input": str(job_dir / "input.jsonl"),
                     "batch.output": str(job_dir / "results.jsonl"), "batch.concurrency": 8,
                     "vllm.args.disable_uvicorn_access_log": False})
    job = submit(spec, wait=True)
    st = status(job["job_id"])
    assert st["stage"] == "DONE" and st["batch"]["total"] == 120, st
    ids = [line["custom_id"] for line in results(job_dir)]
    assert sorted(ids) == sorted(r["custom_id"] for r in requests)
    logs = Path(job["job_dir"]) / "logs"
    answered = [(logs / f"vllm-{k}.log").read_text().count('"POST /v1/chat/completions HTTP/1.1" 200')
                for k in (0, 1, 2)]
    assert sum(answered) >= 120 and min(answered) >= 0.2 * 120, answered
    wait_released(job["job_id"])
    print(f"replicas: a batch of 120 over 3 replicas: {' / '.join(map(str, answered))} answered by each")
