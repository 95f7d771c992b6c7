"""How vLLM's processes come up across the nodes: one launcher a backend (Ray; vLLM's own mp).

The head (head.py) and the workers (worker.py) do the same for every backend — ports, runtime,
readiness, supervision, teardown — and ask their launcher for the part that differs: what the head
starts before READY can be probed, and what a worker starts to take its part. New launchers (a
data-parallel one, a Pyxis step) slot in beside these two; `launcher_for` picks one from the plan.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from slurm_vllm.core import proc
from slurm_vllm.core.errors import ClusterError
from slurm_vllm.core.plan import Backend, Ports, ray_argv, vllm_argv
from slurm_vllm.core.records import HeadInfo, RayNode, RayNodes, Stage
from slurm_vllm.node.netid import Identity, interface_network
from slurm_vllm.node.probes import RAY_WATCH, parse_ray_nodes, port_open
from slurm_vllm.node.rankenv import LOOPBACK, loopback_only

if TYPE_CHECKING:
    from slurm_vllm.node.rank import Rank
    from slurm_vllm.node.worker import Worker


class Launcher:
    """The backend-specific steps of a rank; the base starts nothing of its own."""

    backend: ClassVar[Backend]

    def ray_address_port(self, rank: int, ports: Ports) -> int | None:
        """The GCS port the head's vLLM joins as RAY_ADDRESS (None: no Ray)."""
        return None

    def head_up(self, head: Rank, ident: Identity, ports: Ports, sock: str, server_env: Path) -> None:
        """Start what serves on the head (`vllm serve` on the Unix socket SOCK) and what the workers
        wait for; return once the workers can take their part (vLLM may still be loading)."""
        raise NotImplementedError

    def worker_up(self, worker: Worker, ident: Identity, ports: Ports) -> None:
        """Start this worker node's part once the head has published what it needs."""
        raise NotImplementedError

    def keeps(self, head: Rank) -> set[str]:
        """The head's children that a restart of its server keeps (replicas.py): none here."""
        return set()

    def server_again(self, head: Rank, ident: Identity, ports: Ports, sock: str, server_env: Path) -> None:
        """Start the head's server again after it died (what keeps() kept still runs)."""
        self.head_up(head, ident, ports, sock, server_env)

    def cluster_only(self, head: Rank, ident: Identity, ports: Ports) -> str:
        """`preflight --ray`: bring up the cluster alone; what DONE says."""
        raise ClusterError(f"backend {self.backend.value} starts no Ray cluster")


class RayLauncher(Launcher):
    """A Ray cluster (head on rank 0, workers join it) and `vllm serve` with vLLM's Ray executor."""

    backend = Backend.RAY

    def ray_address_port(self, rank: int, ports: Ports) -> int | None:
        return ports.gcs if rank == 0 else None

    def head_up(self, head: Rank, ident: Identity, ports: Ports, sock: str, server_env: Path) -> None:
        """The Ray head, then `vllm serve` at once (pipelined: its imports and engine set-up overlap
        the workers' join, it waits for its placement group); the barrier still fails the job at
        once if a worker fails, and if vLLM dies while it waits."""
        self.start_head(head, ident, ports)
        argv = vllm_argv(head.plan, ident.ip, ports.api, uds=sock)
        head.spawn("vllm", head.runtime.exec(argv, server_env), server_env)
        nodes = self.join(head, ident, ports)
        head.say(Stage.LOADING, f"vllm serve TP{head.plan.tp}xPP{head.plan.pp} on "
                                           f"{', '.join(sorted(n.ip for n in nodes))}")

    def keeps(self, head: Rank) -> set[str]:
        """A 1-node replica whose vLLM died keeps its Ray head (a live one): vLLM alone starts again."""
        alive = any(c.name == "ray-head" and c.alive() for c in head.children)
        return {"ray-head"} if alive and head.plan.replica_nodes == 1 else set()

    def server_again(self, head: Rank, ident: Identity, ports: Ports, sock: str, server_env: Path) -> None:
        if not any(c.name == "ray-head" for c in head.children):
            self.head_up(head, ident, ports, sock, server_env)
            return
        argv = vllm_argv(head.plan, ident.ip, ports.api, uds=sock)
        head.spawn("vllm", head.runtime.exec(argv, server_env), server_env)
        head.say(Stage.LOADING, f"vllm serve TP{head.plan.tp}xPP{head.plan.pp} again on {ident.ip}")

    def cluster_only(self, head: Rank, ident: Identity, ports: Ports) -> str:
        self.start_head(head, ident, ports)
        nodes = self.join(head, ident, ports)
        return (f"Ray: {len(nodes)} nodes, {sum(n.gpus for n in nodes):g} GPUs joined at "
                f"{ident.ip}:{ports.gcs}: {', '.join(sorted(n.ip for n in nodes))}")

    def worker_up(self, worker: Worker, ident: Identity, ports: Ports) -> None:
        def head_ready() -> bool:
            if not worker.published(worker.jd.head):
                return False
            info = HeadInfo.read(worker.jd.head)
            return port_open(info.ip, info.gcs_port)

        worker.wait_for("the Ray head (head.json)", head_ready, worker.plan.ready_timeout)
        info = HeadInfo.read(worker.jd.head)
        argv = ray_argv(worker.plan, ports, ident.ip, f"{info.ip}:{info.gcs_port}", worker.job.cpus)
        worker.spawn("ray-worker", worker.runtime.start(argv))

    def start_head(self, head: Rank, ident: Identity, ports: Ports) -> None:
        """`ray start --head` in the head's container; head.json once its GCS port answers (the
        workers join then)."""
        head.spawn("ray-head", head.runtime.start(ray_argv(head.plan, ports, ident.ip, None, head.job.cpus)))
        head.wait_for(f"the Ray head's port {ident.ip}:{ports.gcs}",
                      lambda: port_open(ident.ip, ports.gcs), head.plan.ready_timeout)
        head.jd.write(head.jd.head, HeadInfo(ident.hostname, ident.ip, ident.interface, ports.gcs, ports.api,
                                                    ports.heartbeat))
        head.say(Stage.RAY_HEAD, f"{ident.ip}:{ports.gcs}")

    def join(self, head: Rank, ident: Identity, ports: Ports) -> tuple[RayNode, ...]:
        """The barrier, then ray_nodes.json and the check that every node is on the right network."""
        nodes = self.barrier(head, ident, ports)
        head.jd.write(head.jd.ray_nodes, RayNodes(nodes))
        check_network(ident, nodes)
        return nodes

    def barrier(self, head: Rank, ident: Identity, ports: Ports) -> tuple[RayNode, ...]:
        """Wait until Ray reports every node and every GPU of the allocation."""
        want_nodes = head.plan.replica_nodes
        want_gpus = want_nodes * head.plan.gpus_per_node
        argv = ["python3", "-c", RAY_WATCH, f"{ident.ip}:{ports.gcs}", str(want_nodes), str(want_gpus)]
        log = head.jd.rank_log("ray-watch", head.rank)
        watch = proc.spawn("ray-watch", head.runtime.exec(argv), log, env=head.child_env())
        head.watchdog.watch(watch.popen.pid)
        seen: tuple[RayNode, ...] = ()
        last = -1

        def joined() -> bool:
            nonlocal seen, last
            head.check_workers()
            ended = not watch.alive()            # read after: its last line is then surely in the log
            parsed = parse_ray_nodes(log.read_text(errors="replace"))
            if parsed is not None:
                seen = parsed
                if len(seen) != last:
                    last = len(seen)
                    head.say(Stage.RAY_JOINED, f"{len(seen)}/{want_nodes}")
            if len(seen) >= want_nodes and sum(n.gpus for n in seen) >= want_gpus:
                return True
            if ended:
                raise ClusterError(f"the Ray probe exited (code {watch.returncode()}) on "
                                   f"{socket.gethostname()}: {watch.tail(8)}")
            return False

        try:
            head.wait_for(f"Ray to report {want_nodes} nodes and {want_gpus} GPUs", joined,
                          head.plan.ready_timeout)
        finally:
            watch.terminate(timeout=5)
        return seen


def check_network(ident: Identity, nodes: tuple[RayNode, ...]) -> None:
    """Every Ray node registered an address on the chosen interface's network, or fail now
    (else vLLM's placement group waits forever for a node it cannot match)."""
    net = interface_network(ident.interface)
    wrong = [n.ip for n in nodes if ipaddress.ip_address(n.ip) not in net]
    if wrong:
        raise ClusterError(f"Ray nodes {', '.join(wrong)} are not on {ident.interface}'s network {net} "
                           f"(the head is {ident.ip}); set network.interface to an interface every "
                           f"node has on one network")


class MpLauncher(Launcher):
    """No Ray: `vllm serve --nnodes N --node-rank 0 --master-addr HEAD` on the head, the same
    headless with its node rank on each worker; vLLM's own rendezvous is the barrier."""

    backend = Backend.MP

    def head_up(self, head: Rank, ident: Identity, ports: Ports, sock: str, server_env: Path) -> None:
        """head.json names the master (this node's address, or loopback for a 1-node job; the
        job's planned GCS port as vLLM's master port); each worker starts its part as soon as
        head.json is there, and a worker's failure file fails the job while vLLM waits for it."""
        head.jd.write(head.jd.head, HeadInfo(ident.hostname, ident.ip, ident.interface, ports.gcs, ports.api,
                                                    ports.heartbeat))
        master = LOOPBACK[0] if loopback_only(head.plan) else ident.ip
        argv = vllm_argv(head.plan, ident.ip, ports.api, master=(master, ports.gcs), node_rank=0, uds=sock)
        head.spawn("vllm", head.runtime.start(argv, env_file=server_env), server_env)
        head.say(Stage.LOADING, f"vllm serve TP{head.plan.tp}xPP{head.plan.pp} (backend mp, "
                                           f"master {master}:{ports.gcs}) on {len(head.job.hosts)} nodes")

    def worker_up(self, worker: Worker, ident: Identity, ports: Ports) -> None:
        worker.wait_for("the head (head.json)", lambda: worker.published(worker.jd.head),
                        worker.plan.ready_timeout)
        info = HeadInfo.read(worker.jd.head)
        argv = vllm_argv(worker.plan, ident.ip, 0, master=(info.ip, info.gcs_port), node_rank=worker.rank)
        worker.spawn("vllm", worker.runtime.start(argv))


LAUNCHERS: dict[Backend, Launcher] = {Backend.RAY: RayLauncher(), Backend.MP: MpLauncher()}


def launcher_for(backend: Backend) -> Launcher:
    return LAUNCHERS[backend]
