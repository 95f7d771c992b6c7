"""Replicas (parallelism.data > 1): each replica's head, and the job's head over them with the router.

Every replica is a one-server job of its own nodes (its ranks work in its folder view, replicadir):
its head serves vLLM behind a door on its node (the replica API port; the key on every route, as
the job's endpoint). The job's head is replica 0's head too: once every replica is READY it starts
the router on loopback over the replicas' doors (balancer.py) and the job's door on the API port
in front of it, writes endpoint.json and READY "R/R replicas".

A replica's server that dies while serving is started again on its node (a 1-node replica; up to
MAX_RESTARTS times): meanwhile the router's health checks keep it out of rotation and its retries
send what found it dead to another replica. A replica that cannot come back ends (FAILED, in its
folder); the job goes on with the others, its READY saying how many serve, and fails only when none
can. A replica's head stops when the job's head has ended.
"""

from __future__ import annotations

import secrets
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from slurm_vllm.core import proc
from slurm_vllm.core.errors import ClusterError, ServeError
from slurm_vllm.core.jobdir import JobDir, read_secret, write_secret
from slurm_vllm.core.plan import Ports
from slurm_vllm.core.records import Endpoint, Rendezvous, Replicas, Stage
from slurm_vllm.core.replicadir import ReplicaDir, replicas_file
from slurm_vllm.node import balancer
from slurm_vllm.node.frontdoor import FrontDoor
from slurm_vllm.node.head import Head
from slurm_vllm.node.heartbeat import Watch, says
from slurm_vllm.node.netid import Identity
from slurm_vllm.node.probes import port_open
from slurm_vllm.node.rank import API_SOCKET
from slurm_vllm.node.rankenv import Stopped

MAX_RESTARTS = 3


class Restarting(Head):
    """A replica's head: its server started again on this node when it dies while serving."""

    restarts = 0

    def door_port(self, ports: Ports) -> int:
        return ports.replica_api

    def may_restart(self) -> bool:
        """A 1-node replica whose node is still there, not stopping, with restarts left."""
        return (self.plan.replica_nodes == 1 and self.restarts < MAX_RESTARTS and not self.stop.is_set()
                and not self.lost)

    def restart(self, start: Callable[[], None], url: str, why: ClusterError) -> None:
        """Stop what is left of the server (not the router), start it again, wait until it answers."""
        self.restarts += 1
        self.started = time.monotonic()          # the restart gets the whole ready_timeout
        self.server_down(f"restarting ({self.restarts}/{MAX_RESTARTS}): {why}")
        self.serving = False
        keep = {"router", *self.launcher.keeps(self)}           # the router; a live Ray head
        proc.kill([c for c in self.children if c.name not in keep])    # what is left of a dead server
        self.children = [c for c in self.children if c.name in keep]
        (self.socket_dir / API_SOCKET).unlink(missing_ok=True)     # the killed server's
        start()
        self.wait_ready(url)
        self.server_up()

    def supervise(self, start: Callable[[], None], url: str) -> None:
        """As every head, but a server that dies is started again (server_died)."""
        while True:
            try:
                self.check()
                self.check_workers()
            except ClusterError as exc:
                self.server_died(start, url, exc)
            self.tick()
            self.stop.wait(1.0)

    def server_died(self, start: Callable[[], None], url: str, exc: ClusterError) -> None:
        """Start the server again, or raise EXC when it may not come back."""
        if not self.may_restart():
            raise exc
        self.restart(start, url, exc)

    def tick(self) -> None:
        """Once a supervision round (the job's head: READY with how many replicas serve)."""

    def server_down(self, detail: str) -> None:
        self.jd.write_stage(Stage.LOADING, detail)

    def server_up(self) -> None:
        self.jd.write_stage(Stage.READY, f"serving again after restart {self.restarts}")


class ReplicaHead(Restarting):
    """The head of replica K >= 1: its server behind its door, READY in its own folder (in a batch
    job too: the job's head sends the batch through the router)."""

    sends_batch = False

    def install_signals(self) -> None:
        """As every rank, but the time limit's early signal (SIGUSR2) does not stop a replica: the
        job's head drains its batch through it, and the replica stops when the job's head is done."""
        super().install_signals()
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)

    def job_ended(self) -> bool:
        top = JobDir(self.jd.path)
        return top.done.exists() or top.read_stage().stage.final

    def check_workers(self) -> None:
        super().check_workers()
        if self.job_ended():
            raise Stopped("the job's head ended")

    def linger(self) -> None:
        """After this replica ended while the job goes on: stay until the job ends (a task that
        ended would end the job step, and with it every replica: srun --kill-on-bad-exit)."""
        while not self.job_ended() and not self.stop.is_set():
            self.stop.wait(1.0)



class JobHead(Restarting):
    """Rank 0: replica 0's head, then the router over every replica and the job's endpoint."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.public: FrontDoor | None = None
        self.public_url = ""
        self.own = "serving"            # replica 0's server: serving, restarting or the error that ended it
        self.shown = ""
        self.heads = Watch()            # the other replicas' heads, probed on the job's network

    def replicas(self) -> list[ReplicaDir]:
        return [ReplicaDir(self.jd.path, k, self.plan.replica_nodes) for k in range(1, self.plan.replicas)]

    def watch_heads(self) -> None:
        """Probe each other replica's head once it said where; a head whose node stopped answering
        cannot say so itself: its replica is FAILED here, naming the node (the job serves on)."""
        for rd in self.replicas():
            key = str(rd.replica)
            if not self.heads.watching(key) and rd.heartbeat(0).exists():
                addr = Rendezvous.read(rd.heartbeat(0))
                first = rd.replica * self.plan.replica_nodes          # its head's node
                hosts = self.job.allocation
                host = hosts[first] if first < len(hosts) else addr.ip
                self.heads.add(key, f"{host} (replica {rd.replica}'s head)", addr.ip, addr.port)
        gone = {id(peer) for peer in self.heads.gone()}
        for rd in self.replicas():
            peer = self.heads.peers.get(str(rd.replica))
            if peer is not None and id(peer) in gone and not rd.read_stage().stage.final:
                rd.write_stage(Stage.FAILED, f"lost its node: {says(peer, self.interface)}")

    def count(self) -> tuple[int, int, list[str]]:
        """(replicas serving, replicas that may still serve, what the ended ones said)."""
        serving, alive = int(self.own == "serving"), int(self.own in ("serving", "restarting"))
        ended = [] if alive else [f"replica 0: {self.own}"]
        for rd in self.replicas():
            info = rd.read_stage()
            serving += info.stage == Stage.READY
            alive += not info.stage.final
            if info.stage.final:
                ended.append(f"replica {rd.replica}: {info.stage.value} {info.detail}")
        return serving, alive, ended

    def router_key(self) -> Path:
        """The file of the key the router checks: the job's API key, or with `vllm.api_key: none` an
        internal one (0600) that the job's door adds to each request it lets in."""
        if self.plan.api_key:
            return self.jd.api_key
        if not self.jd.router_key.exists():
            write_secret(self.jd.router_key, "sk-" + secrets.token_urlsafe(32))
        return self.jd.router_key

    def start_router(self, url: str, ports: Ports) -> tuple[str, str]:
        """Every replica READY (URL: this one's door), then the router over their doors on loopback,
        each registered; (the router's URL, the key it checks)."""
        total = self.plan.replicas
        seen = 0

        def all_ready() -> bool:
            nonlocal seen
            self.watch_heads()
            ready, alive, ended = self.count()
            if alive < total:
                raise ClusterError(f"a replica ended before the job was READY: {'; '.join(ended)}")
            if ready != seen:
                seen = ready
                self.jd.write_stage(Stage.LOADING, f"replicas ready: {ready}/{total}")
            return ready == total

        self.wait_for(f"{total} replicas to be READY", all_ready, self.plan.ready_timeout)
        urls = [url] + [Endpoint.read(rd.endpoint).url.removesuffix("/v1") for rd in self.replicas()]
        self.jd.write(replicas_file(self.jd), Replicas(tuple(urls)))
        key_file = self.router_key()
        key = read_secret(key_file)
        argv = [sys.executable, "-m", "slurm_vllm.node.balancer", str(ports.router),
                str(ports.router_metrics), str(key_file)]
        router = proc.spawn("router", argv, self.jd.rank_log("router", 0), env=None)   # no secret in its env
        self.children.append(router)
        self.watchdog.watch(router.popen.pid)

        def alive() -> None:
            if not router.alive():
                raise ClusterError(f"the router ended (exit {router.popen.poll()}): see "
                                   f"{self.jd.rank_log('router', 0)}")

        def listens() -> bool:
            alive()
            return port_open("127.0.0.1", ports.router)

        def registered() -> bool:
            alive()
            return balancer.healthy_workers(ports.router, key) == total

        self.wait_for(f"the router on 127.0.0.1:{ports.router}", listens, self.plan.ready_timeout)
        try:
            balancer.register(ports.router, key, self.plan.served_name, urls)
        except (OSError, ValueError) as exc:
            raise ClusterError(f"registering the replicas with the router: {exc}") from None
        self.wait_for(f"the router on 127.0.0.1:{ports.router} with {total} replicas", registered,
                      self.plan.ready_timeout)
        return f"http://127.0.0.1:{ports.router}", key

    def metrics_urls(self, url: str) -> tuple[str, ...]:
        """Each replica's door (replicas.json): the router keeps vLLM's metrics to itself."""
        return Replicas.read(replicas_file(self.jd)).urls

    def batch_target(self, url: str, ports: Ports, key: str | None) -> tuple[str, str | None]:
        """A batch over replicas goes through their router (a fixed batch.concurrency: for each)."""
        return self.start_router(url, ports)

    def publish(self, url: str, ident: Identity, ports: Ports, key: str | None) -> None:
        """Every replica READY, then the router and the job's door; endpoint.json and READY."""
        router, router_key = self.start_router(url, ports)
        self.public = FrontDoor(ident.ip, ports.api, f"tcp:{router.removeprefix('http://')}", key,
                                upstream_key=None if key else router_key)
        try:
            self.public.start()
        except OSError as exc:
            raise ServeError(f"the endpoint's port {ident.ip}:{ports.api}: {exc.strerror}") from None
        self.public_url = f"http://{ident.ip}:{ports.api}/v1"
        self.jd.write(self.jd.endpoint, Endpoint(
            url=self.public_url, model=self.plan.served_name, host=ident.ip, port=ports.api,
            api_key_file=str(self.jd.api_key) if self.plan.api_key else None, job_id=str(self.job.job_id)))
        self.show()

    def show(self) -> None:
        """READY with how many replicas serve (and what the ended ones said); ClusterError when none
        serves and none can come back."""
        serving, alive, ended = self.count()
        if alive == 0:
            raise ClusterError(f"no replica can serve: {'; '.join(ended)}")
        detail = f"{self.public_url} ({serving}/{self.plan.replicas} replicas{'; ' if ended else ''}" \
                 f"{'; '.join(ended)})"
        if detail != self.shown:
            self.shown = detail
            self.jd.write_stage(Stage.READY, detail)

    def server_died(self, start: Callable[[], None], url: str, exc: ClusterError) -> None:
        if any(c.name == "router" and not c.alive() for c in self.children):
            raise exc                               # no endpoint without it
        try:
            super().server_died(start, url, exc)
        except (ClusterError, ServeError) as end:   # replica 0's server is over: the others serve
            self.own = f"FAILED {end}"
            server = [c for c in self.children if c.name != "router"]
            proc.terminate_all(server, timeout=5)
            self.children = [c for c in self.children if c.name == "router"]

    def tick(self) -> None:
        self.watch_heads()
        self.show()

    def check_workers(self) -> None:
        if self.own == "serving":                   # replica 0's workers, while its server lives
            super().check_workers()

    def say(self, stage: Stage, detail: str) -> None:
        if self.public is None:                     # once the endpoint is up, the job stays READY
            super().say(stage, detail)

    def server_down(self, detail: str) -> None:
        self.own = "restarting"
        self.show()

    def server_up(self) -> None:
        self.own = "serving"
        self.show()

    def teardown(self) -> None:
        self.heads.stop()
        if self.public is not None:         # no new request reaches the router or the replicas
            self.public.stop()
        super().teardown()
