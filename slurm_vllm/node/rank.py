"""One task of the allocation, the part every rank shares: signals, waits, environment, ports,
runtime, the preflight, children and teardown (head.py and worker.py build on it)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from slurm_vllm.core import proc, safefile
from slurm_vllm.core.errors import ClusterError, JobFolderError
from slurm_vllm.core.jobdir import JobDir, make_private_dir, read_secret, write_secret
from slurm_vllm.core.plan import Mode, Plan, Ports
from slurm_vllm.core.records import RankFailure, Rendezvous, Stage
from slurm_vllm.core.spec import JobSpec
from slurm_vllm.node import pyxisimage
from slurm_vllm.node.container import Runtime, env_file_text
from slurm_vllm.node.frontdoor import FrontDoor
from slurm_vllm.node.heartbeat import SUSPECT, Beacon, Watch, says
from slurm_vllm.node.jobenv import JobEnv
from slurm_vllm.node.launchers import Launcher, launcher_for
from slurm_vllm.node.netid import Identity
from slurm_vllm.node.portclaim import PortClaims
from slurm_vllm.node.preflightrun import run_preflight
from slurm_vllm.node.probes import port_free
from slurm_vllm.node.rankenv import Stopped, choose_ports, environment, loopback_only
from slurm_vllm.node.watchdog import Watchdog

POLL = 0.5          # seconds between two looks at a fact (port, Ray, HTTP); never a stand-in for one
API_SOCKET = "api.sock"   # vLLM's API server (--uds), in a folder only this user can enter
MAX_SOCKET_PATH = 100      # a Unix socket's path is at most 107 bytes


class Rank:
    """One task of the allocation."""

    def __init__(self, jd: JobDir, job: JobEnv, launcher: Launcher | None = None) -> None:
        self.jd = jd.verified()
        self.plan = Plan.read(jd.plan)
        self.spec: JobSpec = self.jd.read_spec()
        self.job = job
        self.rank = job.rank
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.stop_reason = ""
        self.children: list[proc.Child] = []
        self._runtime: Runtime | None = None
        self.launcher: Launcher = launcher or launcher_for(self.plan.backend)
        self.env: dict[str, str] = {}       # Ray's and vLLM's environment on this node, built once
        self.env_files: dict[Path, dict[str, str]] = {}   # each env file written, and what it holds
        self.claims = PortClaims(job.job_id)
        self.watchdog = Watchdog()           # cleans up after this rank if it is killed outright
        self.done_detail = ""                # what a job that ended by itself says (a batch's summary)
        self.serving = False                 # vLLM answered the readiness probes
        self.socket_dir = self.jd.own                # where vLLM's API socket is (private_socket_dir)
        self.door: FrontDoor | None = None       # the endpoint's front door (serve mode, rank 0)
        self.beacon: Beacon | None = None        # multi-node: this node answers heartbeat probes
        self.peers: Watch | None = None          # multi-node: the other ranks this one probes
        self.interface = ""                      # the job's interface on this node
        self.lost = ""                           # a peer node gone: what the failure says

    # -- signals -----------------------------------------------------------------------------

    def install_signals(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            if not self.stop_reason:
                self.stop_reason = {signal.SIGUSR2: "TIMEOUT"}.get(signal.Signals(signum), "CANCELLED")
            self.stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
            signal.signal(sig, handler)

    def say(self, stage: Stage, detail: str) -> None:
        """A stage of this rank's server coming up (the launchers' progress): the job's stage."""
        self.jd.write_stage(stage, detail)

    def check(self) -> None:
        """Raise Stopped on a stop, ClusterError when a child died."""
        if self.stop.is_set():
            raise Stopped(self.stop_reason or "stopped")
        self.check_alive()

    def check_alive(self) -> None:
        """ClusterError when a child of this rank died."""
        for child in self.children:
            if not child.alive():
                raise ClusterError(f"{self.suspect()}{child.name} exited (code {child.returncode()}) on "
                                   f"{socket.gethostname()}: {child.tail(8)}")

    def wait_for(self, what: str, fact: Callable[[], bool], timeout: float) -> None:
        """Poll FACT() until true; fail at once if a child died or a stop came; fail at TIMEOUT."""
        deadline = self.started + timeout
        while True:
            self.check()
            if fact():
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}")
            self.stop.wait(POLL)

    # -- environment -----------------------------------------------------------------------------

    def secrets(self) -> dict[str, str]:
        """secret_env: each file's content, read here on the node (never on the login node)."""
        out = {}
        for key, path in self.spec.secret_env.items():
            try:      # the user's own file, where they keep it: a regular file, bounded
                out[key] = safefile.read_input(Path(path).expanduser(), 1 << 16).decode().strip()
            except OSError as exc:
                raise ClusterError(f"secret_env.{key}: cannot read {path} on {socket.gethostname()}: "
                                   f"{exc.strerror}") from exc
            except ValueError as exc:
                raise ClusterError(f"secret_env.{key}: {path} on {socket.gethostname()}: {exc}") from None
        return out

    def environment(self, ident: Identity, ports: Ports) -> dict[str, str]:
        """What Ray and vLLM see on this node (rankenv.environment with this rank's secrets)."""
        return environment(self.spec, ident, self.jd.ray_token, self.secrets(),
                           head_gcs=self.launcher.ray_address_port(self.rank, ports),
                           autoscaler_metrics=ports.autoscaler_metrics, loopback=loopback_only(self.plan))

    def write_env_file(self, name: str, env: dict[str, str]) -> Path:
        """ENV as env/NAME.env (0600), the file a container reads its environment from."""
        path = self.jd.env_dir / f"{name}.env"
        write_secret(path, env_file_text(env).rstrip("\n"))
        self.env_files[path] = env
        return path

    def secret_values(self) -> list[str]:
        """This job's secrets as this rank knows them: kept out of every stage and failure line."""
        found = [self.env.get(k, "") for k in self.spec.secret_env]
        for path in (self.jd.api_key, self.jd.ray_token):
            try:
                found.append(read_secret(path))
            except (OSError, JobFolderError):
                continue
        return [v for v in found if v]

    def setup(self, ident: Identity) -> Ports | None:
        """This rank's ports and runtime, then the preflight if asked; None: the job was only that."""
        ports = self.choose_ports()
        self.start_heartbeat(ident, ports)
        self._runtime = self.make_runtime(ident, ports)
        if self.wants_preflight:
            run_preflight(self, ident, ports)
            if self.plan.mode is Mode.PREFLIGHT:
                return None
        return ports

    def start_heartbeat(self, ident: Identity, ports: Ports) -> None:
        """Multi-node: answer probes on the job's address, say where (a worker: in the job folder;
        the head: in head.json), and probe the peers (heartbeat.py)."""
        watches = self.plan.replica_nodes >= 2                  # this server's other nodes
        watched = self.plan.replicas > 1 and self.rank == 0     # a replica's head: by the job's head
        if not (watches or watched):
            return
        try:
            self.beacon = Beacon(ident.ip, ports.heartbeat)
        except OSError as exc:
            raise ClusterError(f"the heartbeat port {ident.ip}:{ports.heartbeat}: {exc.strerror}") from None
        self.interface = ident.interface
        if watches:
            self.peers = Watch()
        if self.rank > 0 or watched:
            self.jd.write(self.jd.heartbeat(self.rank), Rendezvous(ident.ip, ports.heartbeat))

    def check_peers(self) -> None:
        """ClusterError naming the peer node that stopped answering on the job's network."""
        gone = self.peers.gone() if self.peers is not None else []
        if gone:
            self.lost = says(gone[0], self.interface)
            raise ClusterError(self.lost if self.rank == 0 else
                               f"lost the head: {self.lost}; this node's processes are stopped")

    def suspect(self) -> str:
        """A peer silent for a few seconds when a child died: the likely cause, named first."""
        silent = self.peers.silent(SUSPECT) if self.peers is not None else []
        if silent:
            self.lost = says(silent[0], self.interface)
        return f"{self.lost}; " if silent else ""

    @property
    def wants_preflight(self) -> bool:
        return self.plan.mode is Mode.PREFLIGHT or self.plan.preflight

    def choose_ports(self) -> Ports:
        """This node's port block (rankenv.choose_ports), probed by binding each port here and
        claimed against other jobs starting at the same moment (portclaim)."""
        return choose_ports(self.plan, self.job.job_id, port_free, socket.gethostname(),
                            claim=self.claims.claim)

    def private_socket_dir(self) -> Path:
        """Where vLLM's API socket goes: the job folder (0700: only this user can connect), or, when
        that path is too long for a Unix socket (108 bytes), a 0700 folder of this user's in the
        node's /tmp, bound into the container like the job folder."""
        if len(str(self.jd.own / API_SOCKET)) <= MAX_SOCKET_PATH:
            return self.jd.own
        folder = Path("/tmp") / f"slurm-vllm-{os.geteuid()}-{self.job.job_id}"
        make_private_dir(folder)
        return folder

    def make_runtime(self, ident: Identity, ports: Ports) -> Runtime:
        self.env = self.environment(ident, ports)
        env_file = self.write_env_file(f"rank-{self.rank}", self.env)
        self.socket_dir = self.private_socket_dir()
        own_socket_dir = self.socket_dir.is_relative_to(self.jd.path)
        binds = (*self.spec.container.binds, f"{self.jd.path}:{self.jd.path}",
                 *([] if own_socket_dir else [f"{self.socket_dir}:{self.socket_dir}"]))
        name = f"slurm-vllm-{self.job.job_id}-{self.rank}"
        pyxis = self.spec.container.runtime == "pyxis"
        runtime = Runtime(self.spec.container, name, env_file, binds, self.job.gpus,
                          infiniband=self.spec.nccl.ib_hca is not None,
                          image=pyxisimage.prepare(self) if pyxis else "", job_id=str(self.job.job_id),
                          host=os.environ.get("SLURMD_NODENAME") or self.job.hosts[self.rank],
                          cpus=int(os.environ.get("SLURM_CPUS_ON_NODE") or self.job.cpus))
        remove = runtime.remove(("", "-preflight"))
        if remove:
            if pyxis:       # a container a killed run of this job left (a requeue keeps the job id)
                proc.run(remove, check=False, timeout=60)
            self.watchdog.cleanup(remove)
        return runtime

    def child_env(self, env_file: Path | None = None) -> dict[str, str] | None:
        """The process environment of a child: for runtime none what the env file (the rank's, or
        ENV_FILE) holds goes in directly; a container reads the file itself."""
        if self.runtime.kind != "none":
            return None
        return {**os.environ, **self.env_files[env_file or self.runtime.env_file]}

    def spawn(self, name: str, argv: list[str], env_file: Path | None = None) -> proc.Child:
        child = proc.spawn(name, argv, self.jd.rank_log(name, self.rank), env=self.child_env(env_file))
        self.children.append(child)
        self.watchdog.watch(child.popen.pid)
        return child

    @property
    def runtime(self) -> Runtime:
        """This rank's container runtime (set by setup())."""
        if self._runtime is None:
            raise RuntimeError("the runtime is made by setup()")
        return self._runtime

    def run(self) -> None:
        raise NotImplementedError

    def check_workers(self) -> None:
        """ClusterError when another rank wrote its failure file, or a worker's node stopped
        answering (each worker is probed once it said where)."""
        for failed in self.jd.failed_ranks():     # a peer silent meanwhile: the network went first
            raise ClusterError(f"{self.suspect()}{RankFailure.read(failed)}")
        if self.peers is not None:
            for k in range(1, self.plan.replica_nodes):
                if not self.peers.watching(str(k)) and self.jd.heartbeat(k).exists():
                    addr = Rendezvous.read(self.jd.heartbeat(k))
                    self.peers.add(str(k), self.job.hosts[k], addr.ip, addr.port)
        self.check_peers()

    # -- teardown ------------------------------------------------------------------------------

    def teardown(self) -> None:
        """Stop every child (SIGTERM, SIGKILL after 10 s; a vLLM that is still loading at once:
        it ignores SIGTERM then, and nothing of it is worth saving; 3 s when a peer node is gone),
        stop the heartbeat, remove the containers."""
        if self.door is not None:              # no new request reaches a vLLM that is stopping
            self.door.stop()
        proc.kill([c for c in self.children if c.name == "vllm" and not self.serving])
        proc.terminate_all(self.children, timeout=3 if self.lost else 10)   # a peer gone: nothing to drain
        if self.beacon is not None:
            self.beacon.stop()
        if self.peers is not None:
            self.peers.stop()
            print(self.peers.summary(), file=sys.stderr, flush=True)     # to logs/task-<rank>.out
        (self.socket_dir / API_SOCKET).unlink(missing_ok=True)
        if not self.socket_dir.is_relative_to(self.jd.path):
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        if self._runtime is not None:
            remove = self._runtime.remove(("", "-preflight"))
            if remove:
                proc.run(remove, check=False, timeout=30)
            if self._runtime.kind == "pyxis":
                pyxisimage.discard(self)
        self.claims.release()
        self.watchdog.done()
