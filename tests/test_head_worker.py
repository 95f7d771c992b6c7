"""Head and Worker against a fake launcher and a real job folder: what they do for every backend.

The launcher is the only part faked (launchers.py holds the real ones, run by the e2e tier): its head
part starts a small OpenAI-shaped server on the head's Unix socket (a real process, spawned and
supervised as vLLM is), its worker part a process standing for the node's share. Everything else
is the real thing: the job folder, the front door on a real port with the job's key, the readiness
probes, supervision, a worker's failure file, the stop, the batch driver, teardown.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from slurm_vllm.core.errors import ClusterError
from slurm_vllm.core.jobdir import JobDir
from slurm_vllm.core.plan import Backend, Mode, Plan, Ports
from slurm_vllm.core.records import Endpoint, HeadInfo, RankFailure, Rendezvous, Stage
from slurm_vllm.node import heartbeat
from slurm_vllm.node.head import Head
from slurm_vllm.node.jobenv import JobEnv
from slurm_vllm.node.launchers import Launcher
from slurm_vllm.node.netid import Identity
from slurm_vllm.node.rank import Rank
from slurm_vllm.node.rankenv import Stopped
from slurm_vllm.node.worker import Worker

pytestmark = pytest.mark.unit

# An OpenAI-shaped server on a Unix socket: /health, /v1/models, /v1/completions and chat.
FAKE_SERVER = r"""
import json, socketserver, sys
from http.server import BaseHTTPRequestHandler
path, model = sys.argv[1], sys.argv[2]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def address_string(self): return "unix"
    def answer(self, body, status=200):
        data = json.dumps(body).encode()
        self.send_response(status); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)
    def do_GET(self):
        self.answer({} if self.path == "/health" else {"data": [{"id": model}]})
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("prompt") == "bad":
            return self.answer({"error": {"message": "bad request", "code": 400}}, 400)
        self.answer({"choices": [{"text": "ok", "index": 0}], "model": body.get("model"),
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
class S(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
S(path, H).serve_forever()
"""


class FakeLauncher(Launcher):
    backend: ClassVar[Backend] = Backend.MP
    ups: ClassVar[list[str]] = []

    def head_up(self, head: Rank, ident: Identity, ports: Ports, sock: str, server_env: Path) -> None:
        head.jd.write(head.jd.head, HeadInfo(ident.hostname, ident.ip, ident.interface, ports.gcs, ports.api))
        head.spawn("vllm", [sys.executable, "-c", FAKE_SERVER, sock, head.plan.served_name], server_env)
        self.ups.append("head")

    def worker_up(self, worker: Any, ident: Identity, ports: Ports) -> None:
        worker.spawn("part", [sys.executable, "-c", "import time; time.sleep(600)"])
        self.ups.append(f"worker {worker.rank}")


RANKS: list[Rank] = []


@pytest.fixture(autouse=True)
def _teardown() -> Iterator[None]:
    FakeLauncher.ups.clear()
    yield
    for r in RANKS:               # stopped first, as a signal does: a rank still serving must not
        r.stop.set()              # start again what the teardown kills (a replica restarts its server)
    for r in RANKS:
        thread = getattr(r, "thread", None)
        if thread is not None:
            thread.join(15)
    while RANKS:
        RANKS.pop().teardown()


def job_folder(tmp_path: Path, plan_mode: Mode = Mode.SERVE, **spec: Any) -> JobDir:
    data = {"name": "j", "model": {"path": "/m", "served_name": "tiny"},
            "slurm": {"nodes": 2, "gpus_per_node": 1},
            "container": {"runtime": "none"}, "network": {"interface": "lo"}, **spec}
    plan = Plan(name="j", nodes=2, gpus_per_node=1, tp=1, pp=2, served_name="tiny", model_path="/m",
                vllm_args=(), gcs_port=None, api_port=None, ready_timeout=60, api_key=True, mode=plan_mode)
    jd = JobDir(tmp_path / "j-1")
    jd.create(yaml.safe_dump(data), plan.to_json(), api_key=True)
    return jd


def make(cls: type[Rank], jd: JobDir, rank: int) -> Any:
    job = JobEnv(rank=rank, job_id=4242 + rank, hosts=(socket.gethostname(), "other"), cpus=1, gpus=())
    r = cls(jd, job, launcher=FakeLauncher())
    RANKS.append(r)
    return r


def start(r: Rank) -> list[BaseException]:
    """R.run() in a thread (R.thread); what it raised lands in the returned list."""
    raised: list[BaseException] = []

    def body() -> None:
        try:
            r.run()
        except BaseException as exc:
            raised.append(exc)

    r.thread = threading.Thread(target=body, daemon=True)  # type: ignore[attr-defined]
    r.thread.start()  # type: ignore[attr-defined]
    return raised


def wait(what: str, fact: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not fact():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def get(ep: Endpoint, path: str, key: str | None) -> int:
    conn = http.client.HTTPConnection(ep.host, ep.port, timeout=10)
    conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
    status = conn.getresponse().status
    conn.close()
    return status


def post(ep: Endpoint, key: str, prompt: str = "x") -> int:
    conn = http.client.HTTPConnection(ep.host, ep.port, timeout=10)
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 1})
    conn.request("POST", "/v1/completions", body=body,
                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    status = conn.getresponse().status
    conn.close()
    return status


def router_call(ep: Endpoint, method: str, path: str, key: str | None, body: object = None) -> int:
    conn = http.client.HTTPConnection(ep.host, ep.port, timeout=10)
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers={"Content-Type": "application/json",
                          **({"Authorization": f"Bearer {key}"} if key else {})})
    status = conn.getresponse().status
    conn.close()
    return status


def test_the_head_serves_through_its_door_and_fails_when_its_server_dies(tmp_path: Path) -> None:
    jd = job_folder(tmp_path)
    head = make(Head, jd, 0)
    raised = start(head)
    wait("READY", lambda: jd.read_stage().stage == Stage.READY or raised)
    assert not raised, raised
    assert FakeLauncher.ups == ["head"]
    ep = Endpoint.read(jd.endpoint)
    key = jd.api_key.read_text().strip()
    assert ep.url == f"http://127.0.0.1:{ep.port}/v1" and ep.model == "tiny"
    assert get(ep, "/v1/models", None) == 401 and get(ep, "/metrics", None) == 401
    assert get(ep, "/v1/models", key) == 200 and get(ep, "/health", None) == 200
    server = next(c for c in head.children if c.name == "vllm")
    server.popen.kill()
    wait("the failure", lambda: raised)
    assert isinstance(raised[0], ClusterError) and "vllm exited" in str(raised[0]), raised
    head.teardown()
    assert not (head.socket_dir / "api.sock").exists()
    with pytest.raises(OSError):
        socket.create_connection((ep.host, ep.port), timeout=2)          # the door is closed


def test_a_workers_failure_file_fails_the_serving_head_naming_it(tmp_path: Path) -> None:
    jd = job_folder(tmp_path)
    head = make(Head, jd, 0)
    raised = start(head)
    wait("READY", lambda: jd.read_stage().stage == Stage.READY or raised)
    jd.write(jd.rank_failed(1), RankFailure(1, "node2", "ray-worker exited (code 1) on node2: boom"))
    wait("the failure", lambda: raised)
    assert isinstance(raised[0], ClusterError) and "node2" in str(raised[0]) and "boom" in str(raised[0])


def test_a_stop_ends_the_head_and_teardown_leaves_no_child(tmp_path: Path) -> None:
    jd = job_folder(tmp_path)
    head = make(Head, jd, 0)
    raised = start(head)
    wait("READY", lambda: jd.read_stage().stage == Stage.READY or raised)
    children = list(head.children)
    head.stop_reason = "CANCELLED"
    head.stop.set()
    wait("the stop", lambda: raised)
    assert isinstance(raised[0], Stopped) and str(raised[0]) == "CANCELLED"
    head.teardown()
    assert children and not any(c.alive() for c in children)


def test_a_batch_head_sends_every_request_and_says_done(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                       "body": {"model": "tiny", "prompt": f"p{i}", "max_tokens": 1}}) + "\n"
                           for i in range(50)))
    out = tmp_path / "out.jsonl"
    jd = job_folder(tmp_path, Mode.BATCH, mode="batch", batch={"input": str(inp), "output": str(out)})
    head = make(Head, jd, 0)
    head.run()
    assert head.door is None                                 # a batch has no endpoint on the network
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"r{i}" for i in range(50))
    assert head.done_detail.startswith("50/50 done"), head.done_detail


def test_a_worker_takes_its_part_after_the_head_and_stops_when_it_is_done(tmp_path: Path) -> None:
    jd = job_folder(tmp_path)
    worker = make(Worker, jd, 1)
    raised = start(worker)
    time.sleep(0.3)
    assert FakeLauncher.ups == [] and not raised              # nothing before the head published
    jd.write(jd.head, HeadInfo("h", "127.0.0.1", "lo", 20000, 20008))
    wait("its part", lambda: FakeLauncher.ups == ["worker 1"] or raised)
    part = next(c for c in worker.children if c.name == "part")
    jd.done.touch()
    wait("its end", lambda: not worker.thread.is_alive(), timeout=10)
    worker.teardown()
    assert not part.alive() and not raised


def test_a_worker_whose_head_ended_stops_instead_of_waiting(tmp_path: Path) -> None:
    jd = job_folder(tmp_path)
    worker = make(Worker, jd, 1)
    raised = start(worker)
    jd.write_stage(Stage.FAILED, "the head could not start")
    wait("the stop", lambda: raised)
    assert isinstance(raised[0], Stopped) and "the head ended" in str(raised[0])
    assert FakeLauncher.ups == []


# -- the heartbeat: a peer node that stops answering on the job's network ------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_worker_node_that_stops_answering_fails_the_head_naming_it(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heartbeat, "SILENCE", 2.0)
    jd = job_folder(tmp_path)
    head = make(Head, jd, 0)
    raised = start(head)
    wait("READY", lambda: jd.read_stage().stage == Stage.READY or raised)
    port = free_port()
    worker_node = heartbeat.Beacon("127.0.0.1", port)            # rank 1's node, answering
    jd.write(jd.heartbeat(1), Rendezvous("127.0.0.1", port))
    time.sleep(3)                                                  # answered: nothing happens
    assert not raised and head.peers is not None and head.peers.watching("1")
    worker_node.stop()                                             # its link goes down
    lost = time.monotonic()
    wait("the failure", lambda: raised, timeout=20)
    assert isinstance(raised[0], ClusterError), raised
    said = str(raised[0])
    assert said.startswith("other (127.0.0.1) stopped answering at "), said
    assert "no answer on the job's network" in said
    assert time.monotonic() - lost < 2.0 + 10                     # SILENCE, then the next looks
    assert head.lost == said


def test_a_worker_that_loses_the_head_stops_its_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heartbeat, "SILENCE", 2.0)
    jd = job_folder(tmp_path)
    port = free_port()
    head_node = heartbeat.Beacon("127.0.0.1", port)
    worker = make(Worker, jd, 1)
    raised = start(worker)
    jd.write(jd.head, HeadInfo("h", "127.0.0.1", "lo", 20000, 20008, port))
    wait("its part", lambda: FakeLauncher.ups == ["worker 1"] or raised)
    assert Rendezvous.read(jd.heartbeat(1)).ip == "127.0.0.1"       # where the head probes it
    head_node.stop()
    wait("the stop", lambda: raised, timeout=20)
    assert isinstance(raised[0], ClusterError) and str(raised[0]).startswith("lost the head: ") \
        and "(the head) (127.0.0.1) stopped answering" in str(raised[0]), raised
    part = next(c for c in worker.children if c.name == "part")
    worker.teardown()
    assert not part.alive()


def test_a_node_too_busy_to_run_still_answers_the_heartbeat(tmp_path: Path) -> None:
    """The handshake is the kernel's: a node program stopped outright (SIGSTOP, the extreme of a
    starved CPU) still completes every probe, so load alone never makes a node look gone."""
    port = free_port()
    code = ("import sys, time; from slurm_vllm.node.heartbeat import Beacon; "
            f"b = Beacon('127.0.0.1', {port}); print('ready', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGSTOP)
        assert all(heartbeat.probe("127.0.0.1", port) for _ in range(20))
    finally:
        child.send_signal(signal.SIGCONT)
        child.kill()
        child.wait()
    assert not heartbeat.probe("127.0.0.1", port)                 # gone: refused at once


def test_a_node_whose_own_link_is_down_says_the_loss_is_on_its_side() -> None:
    """In a fresh network namespace the loopback is down: the failure line says it is this side's."""
    code = ("from slurm_vllm.node import heartbeat; import time; "
            "p = heartbeat.Peer('node2', '10.0.0.2', 1, time.time() - 12, time.time() - 12); "
            "print(heartbeat.interface_down('lo'), heartbeat.interface_down('nonexistent0')); "
            "print(heartbeat.says(p, 'lo'))")
    out = subprocess.run(["unshare", "-n", sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == "True False"
    assert out[1].startswith("node2 (10.0.0.2) stopped answering at ") and out[1].endswith(
        "(no answer on the job's network for 12 s); this node's own lo is down: the loss is on this side")
    assert not heartbeat.interface_down("lo")                     # here: up


def test_only_failed_probes_make_a_peer_gone_not_a_prober_that_did_not_run() -> None:
    """A peer last heard of long ago counts as gone only after probes failed for the whole silence
    (at least two): a prober starved of CPU (no probe ran) says nothing."""
    watch = heartbeat.Watch(silence=10)
    watch.stop()
    now = time.time()
    watch.peers = {"starved": heartbeat.Peer("a", "10.0.0.1", 1, last_ok=now - 60),
                   "failing": heartbeat.Peer("b", "10.0.0.2", 1, last_ok=now - 60, silent_since=now - 11,
                                             failures=11),
                   "new": heartbeat.Peer("c", "10.0.0.3", 1, last_ok=now - 60, silent_since=now - 5,
                                         failures=5)}
    assert [p.name for p in watch.gone()] == ["b"]


def two_replicas(tmp_path: Path, api_key: bool) -> tuple[JobDir, Any, Any, list[BaseException],
                                                            list[BaseException]]:
    """R=2 (1 node each) with the fake server, both heads running here: (job folder, the job's head,
    replica 1's head, what each raised), READY 2/2."""
    from slurm_vllm.core.replicadir import ReplicaDir
    from slurm_vllm.node import replicas

    data = {"name": "j", "model": {"path": "/m", "served_name": "tiny"},
            "slurm": {"nodes": 2, "gpus_per_node": 1}, "parallelism": {"data": 2},
            "container": {"runtime": "none"}, "network": {"interface": "lo"},
            "vllm": {"api_key": "auto" if api_key else "none"}}
    plan = Plan(name="j", nodes=2, gpus_per_node=1, tp=1, pp=1, served_name="tiny", model_path="/m",
                vllm_args=(), gcs_port=None, api_port=None, ready_timeout=60, api_key=api_key, replicas=2)
    jd = JobDir(tmp_path / "j-1")
    jd.create(yaml.safe_dump(data), plan.to_json(), api_key=api_key)
    host = socket.gethostname()
    head = replicas.JobHead(jd, JobEnv(rank=0, job_id=5150, hosts=(host,), cpus=1, gpus=()),
                            launcher=FakeLauncher())
    other = replicas.ReplicaHead(ReplicaDir(jd.path, 1, 1).verified(),
                                 JobEnv(rank=0, job_id=5151, hosts=(host,), cpus=1, gpus=()),
                                 launcher=FakeLauncher())
    RANKS.extend([other, head])
    raised, raised1 = start(head), start(other)
    wait("READY 2/2", lambda: "(2/2 replicas)" in jd.read_stage().detail or raised or raised1)
    assert not raised and not raised1, (raised, raised1)
    return jd, head, other, raised, raised1


def test_replicas_behind_the_router_restart_and_the_job_serves_while_one_does(tmp_path: Path) -> None:
    """R=2 (1 node each) with the fake server: the job's head and replica 1's head run here, the real
    sglang-router and doors between them. READY says 2/2; the job's own server killed is started again
    (1/2 meanwhile); replica 1 that cannot come back ends alone and READY says so while the job's
    server goes on serving; when that one cannot come back either, no replica can serve: the job fails."""
    from slurm_vllm.node import replicas

    jd, head, other, raised, raised1 = two_replicas(tmp_path, api_key=True)
    r1 = other.jd
    detail = lambda: jd.read_stage().detail  # noqa: E731
    ep = Endpoint.read(jd.endpoint)
    key = jd.api_key.read_text().strip()
    assert get(ep, "/v1/models", None) == 401 and get(ep, "/v1/models", key) == 200
    # the router on loopback (open to every user of the node) lists, adds and removes replicas only
    # for the key: a stranger cannot put a server of theirs among the replicas
    argv = list(next(c for c in head.children if c.name == "router").popen.args)  # type: ignore[arg-type]
    port = int(argv[argv.index("slurm_vllm.node.balancer") + 1])
    router = Endpoint(url="", model="", host="127.0.0.1", port=port, api_key_file=None, job_id="5")
    stranger = {"url": "http://127.0.0.1:9", "model_id": "tiny"}
    assert get(router, "/workers", None) == 401
    assert router_call(router, "POST", "/workers", None, stranger) == 401
    assert router_call(router, "DELETE", "/workers/x", None) == 401
    assert router_call(router, "POST", "/flush_cache", None) == 401 and post(router, "not-the-key") == 401
    assert get(router, "/workers", key) == 200
    # a client's bad requests are its own: 20 refusals in a row take no replica out of rotation
    assert [post(ep, key, "bad") for _ in range(20)] == [400] * 20
    assert [post(ep, key) for _ in range(4)] == [200] * 4
    # the job's own server dies: started again, 1/2 meanwhile
    server = next(c for c in head.children if c.name == "vllm")
    server.popen.kill()
    def ready_lines() -> list[str]:                       # every READY line, however short-lived
        return [line.split("(")[-1] for line in jd.stage_log.read_text().splitlines() if " READY " in line]
    # until 1/2 then 2/2 were said (the stage file says the old 2/2 until the kill is seen: waiting on
    # it alone passed before the restart was said, on a fast host)
    back = ["1/2 replicas)", "2/2 replicas)"]
    wait("the restart", lambda: head.restarts == 1 and ready_lines()[-2:] == back)
    assert ready_lines() == ["2/2 replicas)", "1/2 replicas)", "2/2 replicas)"], jd.stage_log.read_text()
    assert get(ep, "/v1/models", key) == 200
    # replica 1 cannot come back: it ends alone (main() writes its FAILED), the job serves on
    other.restarts = replicas.MAX_RESTARTS
    next(c for c in other.children if c.name == "vllm").popen.kill()
    wait("replica 1's end", lambda: raised1)
    r1.write_stage(Stage.FAILED, str(raised1[0]))
    assert [post(ep, key) for _ in range(6)] == [200] * 6     # the router retries on the other one
    wait("READY 1/2", lambda: "(1/2 replicas; replica 1: FAILED vllm exited" in detail())
    assert jd.read_stage().stage == Stage.READY and not raised
    wait("the router's health checks", lambda: get(ep, "/v1/models", key) == 200, 15)
    # and when the job's own server cannot come back either: no replica can serve
    head.restarts = replicas.MAX_RESTARTS
    next(c for c in head.children if c.name == "vllm").popen.kill()
    wait("the job's failure", lambda: raised)
    assert isinstance(raised[0], ClusterError) and "no replica can serve" in str(raised[0]), raised


def test_replicas_of_a_job_without_a_key_still_have_a_router_only_the_door_can_use(tmp_path: Path) -> None:
    """vllm.api_key: none with R=2: the endpoint answers without a key, as the user chose, but the
    router on loopback still refuses a stranger (its own key, 0600, which the job's door adds)."""
    jd, head, _other, _raised, _raised1 = two_replicas(tmp_path, api_key=False)
    ep = Endpoint.read(jd.endpoint)
    assert ep.api_key_file is None and not jd.api_key.exists()
    assert [post(ep, "anything") for _ in range(4)] == [200] * 4
    assert get(ep, "/v1/models", None) == 200
    argv = list(next(c for c in head.children if c.name == "router").popen.args)  # type: ignore[arg-type]
    router = Endpoint(url="", model="", host="127.0.0.1", api_key_file=None, job_id="6",
                      port=int(argv[argv.index("slurm_vllm.node.balancer") + 1]))
    assert get(router, "/workers", None) == 401 and post(router, "anything") == 401
    assert jd.router_key.stat().st_mode & 0o777 == 0o600
    assert get(router, "/workers", jd.router_key.read_text().strip()) == 200
