"""Rank 0: the launcher's head part, readiness, the endpoint (front door) or the batch, supervision.

The head starts what its launcher starts (launchers.py: Ray or vLLM's own mp), probes /health,
/v1/models and a 1-token completion through vLLM's Unix socket, then writes endpoint.json and READY
and supervises (or runs the batch: batchrun.py). Ranks meet only through the job folder and the
head's ports; every wait polls a fact (probes.py) and fails at once when a child dies or a stop
comes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

from slurm_vllm.core.errors import ServeError
from slurm_vllm.core.jobdir import atomic_write, read_secret
from slurm_vllm.core.plan import Mode, Ports
from slurm_vllm.core.records import Endpoint, Stage
from slurm_vllm.node import batchrun
from slurm_vllm.node.frontdoor import FrontDoor
from slurm_vllm.node.netid import Identity, identity
from slurm_vllm.node.probes import Http
from slurm_vllm.node.rank import API_SOCKET, Rank
from slurm_vllm.node.rankenv import NON_CARRY_OVER, Stopped, server_environment


class Head(Rank):
    """Rank 0: the endpoint or the batch (for `preflight --ray`, the Ray cluster alone)."""

    def run(self) -> None:
        try:
            self.serve()
        except Stopped as stop:
            if self.plan.mode is Mode.BATCH and self.stop_reason == "TIMEOUT":
                raise Stopped(str(stop), detail=batchrun.goes_on(self, stop.detail)) from None
            raise

    def serve(self) -> None:
        hosts = self.job.hosts
        ident = identity(self.job.head_host, self.spec.network.interface)
        self.jd.write_stage(Stage.STARTING, f"{len(hosts)} nodes: {','.join(hosts)}")
        ports = self.setup(ident)
        if ports is None:
            return
        if self.plan.mode is Mode.RAY:       # preflight --ray: the Ray cluster only, then DONE
            self.done_detail = self.launcher.cluster_only(self, ident, ports)
            return
        key = read_secret(self.jd.api_key) if self.plan.api_key else None
        config_root = self.jd.env_dir / "vllm-config"
        config_root.mkdir(exist_ok=True)
        atomic_write(config_root / NON_CARRY_OVER, json.dumps(["VLLM_API_KEY"]) + "\n")
        server_env = self.write_env_file("vllm-0", server_environment(self.env, key, config_root))
        # vLLM's API server listens on a Unix socket only this user can reach; a serving job's
        # endpoint is the front door on this node's address (the key on every route), a batch's
        # driver talks to the socket itself (nothing on the network at all).
        sock = self.socket_dir / API_SOCKET
        sock.unlink(missing_ok=True)              # a requeued run's, or a killed one's
        url = f"unix:{sock}"
        if self.plan.mode is not Mode.BATCH or self.plan.replicas > 1:   # replicas: the router's way in
            port = self.door_port(ports)
            self.door = FrontDoor(ident.ip, port, str(sock), key)
            try:
                self.door.start()
            except OSError as exc:
                raise ServeError(f"the endpoint's port {ident.ip}:{port}: {exc.strerror}") from None
            url = f"http://{ident.ip}:{port}"
        self.launcher.head_up(self, ident, ports, str(sock), server_env)
        self.wait_ready(url)
        if self.plan.mode is Mode.BATCH and self.sends_batch:
            self.done_detail = batchrun.run_batch(self, *self.batch_target(url, ports, key))
            return
        self.publish(url, ident, ports, key)
        self.supervise(lambda: self.launcher.server_again(self, ident, ports, str(sock), server_env), url)

    def supervise(self, start: Callable[[], None], url: str) -> None:
        """Until vLLM or Ray dies, a worker fails, or a stop comes (START, URL: how the server starts
        again and where it answers, for a replica that restarts it: replicas.py)."""
        while True:
            self.check()
            self.check_workers()
            self.stop.wait(1.0)

    sends_batch = True          # a batch job's head sends its input (a replica's head only serves)

    def batch_target(self, url: str, ports: Ports, key: str | None) -> tuple[str, str | None]:
        """Where a batch is sent and with which key: this server (URL, KEY; with replicas, their
        router: replicas.py)."""
        return url, key

    def metrics_urls(self, url: str) -> tuple[str, ...]:
        """Where the batch driver reads the server's load: the server it sends to (URL)."""
        return (url,)

    def door_port(self, ports: Ports) -> int:
        """The port of the door to this server's vLLM (the job's endpoint: the API port)."""
        return ports.api

    def publish(self, url: str, ident: Identity, ports: Ports, key: str | None) -> None:
        """vLLM answers at URL (its door): the job's endpoint.json, and READY."""
        self.jd.write(self.jd.endpoint, Endpoint(
            url=f"{url}/v1", model=self.plan.served_name, host=ident.ip, port=self.door_port(ports),
            api_key_file=str(self.jd.api_key) if self.plan.api_key else None, job_id=str(self.job.job_id)))
        self.jd.write_stage(Stage.READY, f"{url}/v1")

    def wait_ready(self, url: str) -> None:
        """vLLM is ready when /health answers, /v1/models lists the model and 1 token comes back."""
        http = Http(url, read_secret(self.jd.api_key) if self.plan.api_key else None)

        def healthy() -> bool:
            self.check_workers()          # a worker that failed while vLLM loads fails the job now
            return http.healthy()

        self.wait_for("vLLM's /health", healthy, self.plan.ready_timeout)
        http.check_models(self.plan.served_name)
        # The completion blocks for as long as vLLM takes: it runs in a thread so that the usual poll
        # still fails the job at once on a dead child, a failed worker, a stop or the deadline.
        answer: list[str | None] = []
        left = max(1.0, self.started + self.plan.ready_timeout - time.monotonic())
        threading.Thread(target=lambda: answer.append(http.complete_one(self.plan.served_name, left)),
                         name="first-completion", daemon=True).start()

        def answered() -> bool:
            self.check_workers()
            return bool(answer)

        self.wait_for("a 1-token completion", answered, self.plan.ready_timeout)
        if answer[0] is not None:
            raise ServeError(answer[0])
        self.serving = True
