"""Replicas (parallelism.data > 1): each replica's head, and the job's head over them with the router.

Every replica is a one-server job of its own nodes (its ranks work in its folder view, replicadir):
its head serves vLLM behind a door on its node (the replica API port; the key on every route, as
the job's endpoint). The job's head is replica 0's head too: once every replica is READY it starts
vllm-router on loopback over the replicas' doors (balancer.py) and the job's door on the API port
in front of it, writes endpoint.json and READY "R/R replicas", and supervises the replicas: one
that ends fails the job (it names the replica and what it said). A replica's head stops when the
job's head has ended.
"""

from __future__ import annotations

import sys

from slurm_vllm.core import proc
from slurm_vllm.core.errors import ClusterError, ServeError
from slurm_vllm.core.jobdir import JobDir
from slurm_vllm.core.plan import Ports
from slurm_vllm.core.records import Endpoint, Replicas, Stage
from slurm_vllm.core.replicadir import ReplicaDir, replicas_file
from slurm_vllm.node.frontdoor import FrontDoor
from slurm_vllm.node.head import Head
from slurm_vllm.node.netid import Identity
from slurm_vllm.node.probes import port_open
from slurm_vllm.node.rankenv import Stopped


class ReplicaHead(Head):
    """The head of replica K >= 1: its server behind its door, READY in its own folder."""

    def door_port(self, ports: Ports) -> int:
        return ports.replica_api

    def check_workers(self) -> None:
        super().check_workers()
        top = JobDir(self.jd.path)
        if top.done.exists() or top.read_stage().stage.final:
            raise Stopped("the job's head ended")


class JobHead(Head):
    """Rank 0: replica 0's head, then the router over every replica and the job's endpoint."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.public: FrontDoor | None = None

    def door_port(self, ports: Ports) -> int:
        return ports.replica_api

    def replicas(self) -> list[ReplicaDir]:
        return [ReplicaDir(self.jd.path, k, self.plan.replica_nodes) for k in range(1, self.plan.replicas)]

    def check_replicas(self) -> int:
        """How many replicas are READY (this one included); ClusterError when one has ended."""
        ready = 1
        for rd in self.replicas():
            info = rd.read_stage()
            if info.stage.final:
                raise ClusterError(f"replica {rd.replica} ended: {info.stage.value}: {info.detail}")
            ready += info.stage == Stage.READY
        return ready

    def check_workers(self) -> None:
        super().check_workers()
        self.check_replicas()

    def publish(self, url: str, ident: Identity, ports: Ports, key: str | None) -> None:
        """Every replica READY, then the router and the job's door; endpoint.json and READY."""
        total = self.plan.replicas
        seen = 0

        def all_ready() -> bool:
            nonlocal seen
            ready = self.check_replicas()
            if ready != seen:
                seen = ready
                self.jd.write_stage(Stage.LOADING, f"replicas ready: {ready}/{total}")
            return ready == total

        self.wait_for(f"{total} replicas to be READY", all_ready, self.plan.ready_timeout)
        urls = [url] + [Endpoint.read(rd.endpoint).url.removesuffix("/v1") for rd in self.replicas()]
        self.jd.write(replicas_file(self.jd), Replicas(tuple(urls)))
        argv = [sys.executable, "-m", "slurm_vllm.node.balancer", str(ports.router),
                str(ports.router_metrics), *urls]
        router = proc.spawn("router", argv, self.jd.rank_log("router", 0), env=None)   # no secret in its env
        self.children.append(router)
        self.watchdog.watch(router.popen.pid)
        self.wait_for(f"the router on 127.0.0.1:{ports.router}",
                      lambda: port_open("127.0.0.1", ports.router), self.plan.ready_timeout)
        self.public = FrontDoor(ident.ip, ports.api, f"tcp:127.0.0.1:{ports.router}", key)
        try:
            self.public.start()
        except OSError as exc:
            raise ServeError(f"the endpoint's port {ident.ip}:{ports.api}: {exc.strerror}") from None
        public = f"http://{ident.ip}:{ports.api}"
        self.jd.write(self.jd.endpoint, Endpoint(
            url=f"{public}/v1", model=self.plan.served_name, host=ident.ip, port=ports.api,
            api_key_file=str(self.jd.api_key) if self.plan.api_key else None, job_id=str(self.job.job_id)))
        self.jd.write_stage(Stage.READY, f"{public}/v1 ({total}/{total} replicas)")

    def teardown(self) -> None:
        if self.public is not None:         # no new request reaches the router or the replicas
            self.public.stop()
        super().teardown()
