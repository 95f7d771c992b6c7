"""The head and worker phases of a rank: Ray up, the barrier, vLLM, readiness, supervision, teardown.

Rank 0 (Head) starts the Ray head, waits until Ray reports every node and GPU, starts `vllm serve`
in the same container, probes /health, /v1/models and a 1-token completion, then writes
endpoint.json and READY and supervises. Other ranks (Worker) join Ray once the head's GCS port
answers and stay until the head says done. With backend mp there is no Ray: the head starts
`vllm serve --nnodes N --node-rank 0 --master-addr HEAD`, each worker the same headless with its
node rank, and the readiness probes, supervision and teardown are the same. Ranks meet only
through the job folder and the head's ports; every wait polls a fact (probes.py) and fails at once
when a child dies or a stop comes.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from . import preflight as preflight_mod
from . import proc, safefile
from .batchdriver import BatchError, Driver
from .batchio import merge, part_path
from .batchout import private_parts
from .container import Runtime, env_file_text
from .errors import ClusterError, JobFolderError, ServeError
from .frontdoor import FrontDoor
from .jobdir import JobDir, atomic_write, make_private_dir, read_secret, write_secret
from .jobenv import JobEnv
from .netid import Identity, identity, interface_network
from .plan import Plan, Ports, ray_argv, vllm_argv
from .portclaim import PortClaims
from .probes import RAY_WATCH, Http, parse_ray_nodes, port_free, port_open
from .rankenv import (
    LOOPBACK,
    NON_CARRY_OVER,
    Stopped,
    choose_ports,
    environment,
    loopback_only,
    server_environment,
)
from .records import BatchProgress, Endpoint, HeadInfo, RankFailure, RayNode, RayNodes, Rendezvous, Stage
from .spec import JobSpec
from .watchdog import Watchdog

POLL = 0.5          # seconds between two looks at a fact (port, Ray, HTTP); never a stand-in for one
BATCH_DRAIN = 50.0  # after SIGUSR2 (90 s before the limit), wait this long for the requests in flight
CANCEL_DRAIN = 5.0  # after a cancel: Slurm's KillWait (30 s by default) covers this and the teardown
STOP_RACE = 3.0     # scancel signals every process of the step at once: vLLM may go before the rank hears
API_SOCKET = "api.sock"   # vLLM's API server (--uds), in a folder only this user can enter
MAX_SOCKET_PATH = 100      # a Unix socket's path is at most 107 bytes


class Rank:
    """One task of the allocation."""

    def __init__(self, jd: JobDir, job: JobEnv) -> None:
        self.jd = jd.verified()
        self.plan = Plan.read(jd.plan)
        self.spec: JobSpec = self.jd.read_spec()
        self.job = job
        self.rank = job.rank
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.stop_reason = ""
        self.children: list[proc.Child] = []
        self.runtime: Runtime | None = None
        self.env: dict[str, str] = {}       # Ray's and vLLM's environment on this node, built once
        self.env_files: dict[Path, dict[str, str]] = {}   # each env file written, and what it holds
        self.claims = PortClaims(job.job_id)
        self.watchdog = Watchdog()           # cleans up after this rank if it is killed outright
        self.done_detail = ""                # what a job that ended by itself says (a batch's summary)
        self.serving = False                 # vLLM answered the readiness probes
        self.socket_dir = self.jd.path               # where vLLM's API socket is (private_socket_dir)
        self.door: FrontDoor | None = None       # the endpoint's front door (serve mode, rank 0)

    # -- signals -----------------------------------------------------------------------------

    def install_signals(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            if not self.stop_reason:
                self.stop_reason = {signal.SIGUSR2: "TIMEOUT"}.get(signal.Signals(signum), "CANCELLED")
            self.stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
            signal.signal(sig, handler)

    def check(self) -> None:
        """Raise Stopped on a stop, ClusterError when a child died."""
        if self.stop.is_set():
            raise Stopped(self.stop_reason or "stopped")
        self.check_alive()

    def check_alive(self) -> None:
        """ClusterError when a child of this rank died."""
        for child in self.children:
            if not child.alive():
                raise ClusterError(f"{child.name} exited (code {child.returncode()}) on "
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
                           head_gcs=ports.gcs if self.rank == 0 and self.plan.backend == "ray" else None,
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
        self.runtime = self.make_runtime(ident, ports)
        if self.wants_preflight:
            self.preflight(ident, ports)
            if self.plan.mode == "preflight":
                return None
        return ports

    @property
    def wants_preflight(self) -> bool:
        return self.plan.mode == "preflight" or self.plan.preflight

    def preflight(self, ident: Identity, ports: Ports) -> None:
        """Every rank: the cross-node all-reduce (preflight.py) in this rank's container."""
        assert self.runtime is not None
        if self.rank == 0:
            self.jd.write(self.jd.preflight_addr, Rendezvous(ident.ip, ports.client))
            self.jd.write_stage(Stage.PREFLIGHT, f"all-reduce across {self.plan.nodes} nodes")
        addr = Rendezvous.read(self.jd.preflight_addr)
        out = self.jd.path / "preflight-raw.json"
        argv = ["python3", "-c", preflight_mod.SCRIPT, str(self.rank), str(self.plan.nodes), addr.ip,
                str(addr.port), str(out), ",".join(map(str, preflight_mod.SIZES))]
        log_path = self.jd.rank_log("preflight", self.rank)
        child = proc.spawn("preflight", self.runtime.start(argv, suffix="-preflight"), log_path,
                           env=self.child_env())
        self.watchdog.watch(child.popen.pid)
        deadline = time.monotonic() + 300
        try:
            while child.alive():
                if self.stop.is_set():
                    raise Stopped(self.stop_reason or "stopped")
                if time.monotonic() > deadline:
                    raise ClusterError("preflight: no result within 300 s: a hang at process-group init "
                                       "(check network.interface and that the nodes reach each other)")
                self.stop.wait(POLL)
        finally:
            child.terminate(timeout=5)
        if child.returncode():
            raise ClusterError(f"preflight failed on {socket.gethostname()} (exit {child.returncode()}): "
                               f"{child.tail(6)}")
        if self.rank == 0:
            result = preflight_mod.verdict(json.loads(out.read_text()), log_path.read_text(errors="replace"),
                                           ib_requested=self.spec.nccl.ib_hca is not None)
            self.jd.write(self.jd.preflight, result)
            self.jd.write_stage(Stage.PREFLIGHT, f"ok: {result.transport}, "
                                                 f"{result.rows[-1].busbw_GBps:.2f} GB/s bus bandwidth")

    def choose_ports(self) -> Ports:
        """This node's port block (rankenv.choose_ports), probed by binding each port here and
        claimed against other jobs starting at the same moment (portclaim)."""
        return choose_ports(self.plan, self.job.job_id, port_free, socket.gethostname(),
                            claim=self.claims.claim)

    def private_socket_dir(self) -> Path:
        """Where vLLM's API socket goes: the job folder (0700: only this user can connect), or, when
        that path is too long for a Unix socket (108 bytes), a 0700 folder of this user's in the
        node's /tmp, bound into the container like the job folder."""
        if len(str(self.jd.path / API_SOCKET)) <= MAX_SOCKET_PATH:
            return self.jd.path
        folder = Path("/tmp") / f"slurm-vllm-{os.geteuid()}-{self.job.job_id}"
        make_private_dir(folder)
        return folder

    def make_runtime(self, ident: Identity, ports: Ports) -> Runtime:
        self.env = self.environment(ident, ports)
        env_file = self.write_env_file(f"rank-{self.rank}", self.env)
        self.socket_dir = self.private_socket_dir()
        binds = (*self.spec.container.binds, f"{self.jd.path}:{self.jd.path}",
                 *([] if self.socket_dir == self.jd.path else [f"{self.socket_dir}:{self.socket_dir}"]))
        name = f"slurm-vllm-{self.job.job_id}-{self.rank}"
        runtime = Runtime(self.spec.container, name, env_file, binds, self.job.gpus,
                          infiniband=self.spec.nccl.ib_hca is not None)
        remove = runtime.remove(("", "-preflight"))
        if remove:
            self.watchdog.cleanup(remove)
        return runtime

    def child_env(self, env_file: Path | None = None) -> dict[str, str] | None:
        """The process environment of a child: for runtime none what the env file (the rank's, or
        ENV_FILE) holds goes in directly; a container reads the file itself."""
        assert self.runtime is not None
        if self.runtime.kind != "none":
            return None
        return {**os.environ, **self.env_files[env_file or self.runtime.env_file]}

    def spawn(self, name: str, argv: list[str], env_file: Path | None = None) -> proc.Child:
        child = proc.spawn(name, argv, self.jd.rank_log(name, self.rank), env=self.child_env(env_file))
        self.children.append(child)
        self.watchdog.watch(child.popen.pid)
        return child

    def run(self) -> None:
        raise NotImplementedError

    # -- teardown ------------------------------------------------------------------------------

    def teardown(self) -> None:
        """Stop every child (SIGTERM, SIGKILL after 10 s; a vLLM that is still loading at once:
        it ignores SIGTERM then, and nothing of it is worth saving), remove the containers."""
        if self.door is not None:              # no new request reaches a vLLM that is stopping
            self.door.stop()
        proc.kill([c for c in self.children if c.name == "vllm" and not self.serving])
        proc.terminate_all(self.children, timeout=10)
        (self.socket_dir / API_SOCKET).unlink(missing_ok=True)
        if self.socket_dir != self.jd.path:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        if self.runtime is not None:
            remove = self.runtime.remove(("", "-preflight"))
            if remove:
                proc.run(remove, check=False, timeout=30)
        self.claims.release()
        self.watchdog.done()


class Head(Rank):
    """Rank 0: Ray head, barrier, vLLM, readiness, endpoint, supervision (or the batch driver;
    for `preflight --ray`, the Ray head and the barrier alone)."""

    def run(self) -> None:
        try:
            self.serve()
        except Stopped as stop:
            if self.plan.mode == "batch" and self.stop_reason == "TIMEOUT":
                raise Stopped(str(stop), detail=self.batch_goes_on(stop.detail)) from None
            raise

    def batch_goes_on(self, detail: str) -> str:
        """At the time limit, a batch with runs left (batch.max_jobs) leaves the mark that makes the
        script requeue the job (same id and folder); DETAIL then says so."""
        b = self.spec.batch
        runs_left = b.max_jobs - 1 - self.job.restart_count
        said = detail or "stopped before sending"
        if runs_left > 0:
            self.jd.requeue_mark.touch()
            return f"{said}; goes on in run {self.job.restart_count + 2} of up to {b.max_jobs} (requeued)"
        return f"{said}; no run left (batch.max_jobs {b.max_jobs}): submit again to finish"

    def serve(self) -> None:
        hosts = self.job.hosts
        ident = identity(self.job.head_host, self.spec.network.interface)
        self.jd.write_stage(Stage.STARTING, f"{len(hosts)} nodes: {','.join(hosts)}")
        ports = self.setup(ident)
        if ports is None:
            return
        assert self.runtime is not None
        if self.plan.mode == "ray":          # preflight --ray: the Ray cluster only, then DONE
            self.start_ray_head(ident, ports)
            nodes = self.join(ident, ports)
            self.done_detail = (f"Ray: {len(nodes)} nodes, {sum(n.gpus for n in nodes):g} GPUs joined at "
                                f"{ident.ip}:{ports.gcs}: {', '.join(sorted(n.ip for n in nodes))}")
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
        if self.plan.mode != "batch":
            self.door = FrontDoor(ident.ip, ports.api, str(sock), key)
            try:
                self.door.start()
            except OSError as exc:
                raise ServeError(f"the endpoint's port {ident.ip}:{ports.api}: {exc.strerror}") from None
            url = f"http://{ident.ip}:{ports.api}"
        if self.plan.backend == "mp":
            self.bring_up_mp(ident, ports, str(sock), server_env)
        else:
            self.bring_up_ray(ident, ports, str(sock), server_env)
        self.wait_ready(url)
        if self.plan.mode == "batch":
            self.run_batch(url, key)
            return
        self.jd.write(self.jd.endpoint, Endpoint(
            url=f"{url}/v1", model=self.plan.served_name, host=ident.ip, port=ports.api,
            api_key_file=str(self.jd.api_key) if self.plan.api_key else None, job_id=str(self.job.job_id)))
        self.jd.write_stage(Stage.READY, f"{url}/v1")
        while True:                      # supervise until vLLM or Ray dies, a worker fails, or a stop comes
            self.check()
            self.check_workers()
            self.stop.wait(1.0)

    def bring_up_ray(self, ident: Identity, ports: Ports, sock: str, server_env: Path) -> None:
        """The Ray head, then `vllm serve` at once (pipelined: its imports and engine set-up overlap
        the workers' join, it waits for its placement group); the barrier still fails the job at
        once if a worker fails, and if vLLM dies while it waits."""
        assert self.runtime is not None
        self.start_ray_head(ident, ports)
        argv = vllm_argv(self.plan, ident.ip, ports.api, uds=sock)
        self.spawn("vllm", self.runtime.exec(argv, server_env), server_env)
        nodes = self.join(ident, ports)
        self.jd.write_stage(Stage.LOADING, f"vllm serve TP{self.plan.tp}xPP{self.plan.pp} on "
                                           f"{', '.join(sorted(n.ip for n in nodes))}")

    def start_ray_head(self, ident: Identity, ports: Ports) -> None:
        """`ray start --head` in this rank's container; head.json once its GCS port answers (the
        workers join then)."""
        assert self.runtime is not None
        self.spawn("ray-head", self.runtime.start(ray_argv(self.plan, ports, ident.ip, None, self.job.cpus)))
        self.wait_for(f"the Ray head's port {ident.ip}:{ports.gcs}",
                      lambda: port_open(ident.ip, ports.gcs), self.plan.ready_timeout)
        self.jd.write(self.jd.head, HeadInfo(ident.hostname, ident.ip, ident.interface, ports.gcs, ports.api))
        self.jd.write_stage(Stage.RAY_HEAD, f"{ident.ip}:{ports.gcs}")

    def join(self, ident: Identity, ports: Ports) -> tuple[RayNode, ...]:
        """The barrier, then ray_nodes.json and the check that every node is on the right network."""
        nodes = self.barrier(ident, ports)
        self.jd.write(self.jd.ray_nodes, RayNodes(nodes))
        self.check_network(ident, nodes)
        return nodes

    def bring_up_mp(self, ident: Identity, ports: Ports, sock: str, server_env: Path) -> None:
        """backend mp: no Ray. head.json names the master (this node's address, the job's planned
        GCS port as vLLM's master port); `vllm serve --node-rank 0` starts here, and each worker
        starts its headless `vllm serve --node-rank R` as soon as head.json is there. vLLM's own
        rendezvous is the barrier; a worker's failure file fails the job while it waits."""
        assert self.runtime is not None
        self.jd.write(self.jd.head, HeadInfo(ident.hostname, ident.ip, ident.interface, ports.gcs, ports.api))
        master = LOOPBACK[0] if loopback_only(self.plan) else ident.ip
        argv = vllm_argv(self.plan, ident.ip, ports.api, master=(master, ports.gcs), node_rank=0, uds=sock)
        self.spawn("vllm", self.runtime.start(argv, env_file=server_env), server_env)
        self.jd.write_stage(Stage.LOADING, f"vllm serve TP{self.plan.tp}xPP{self.plan.pp} (backend mp, "
                                           f"master {master}:{ports.gcs}) on {len(self.job.hosts)} nodes")

    def run_batch(self, url: str, key: str | None) -> None:
        """Batch mode: the driver sends the input to the private server; DONE when every request
        has its line, else a stop (cancel, time limit: see run()) with the counts. A shard (a task of
        the job array) sends its 1/K of the input to its part, then merges the parts it finds."""
        b = self.spec.batch
        out = self.spec.batch_output
        if out != self.jd.results and not self.jd.results.is_symlink():
            self.jd.results.symlink_to(out)
        shard = (self.job.array_task or 0, b.shards) if b.shards > 1 else None
        writes = out
        also_done: tuple[Path, ...] = ()
        if shard is not None:
            parts = self.spec.batch_parts
            private_parts(parts)
            writes = part_path(parts, *shard)
            also_done = (out, *(p for p in sorted(parts.glob("part-*.jsonl")) if p != writes))
        what = f"shard {shard[0]} of {shard[1]} of " if shard else ""
        self.jd.write_stage(Stage.READY, f"batch: private server {url}; {what}input {b.input}")
        self.jd.write_stage(Stage.BATCH, "starting")

        def report(progress: BatchProgress) -> None:
            self.jd.write(self.jd.batch, progress)
            self.jd.write_stage(Stage.BATCH, progress.line(), log=False)

        def alive() -> None:
            self.check_alive()
            self.check_workers()

        driver = Driver(url, key, Path(b.input or ""), writes, self.plan.served_name, b.concurrency,
                        self.stop, check=alive, report=report, shard=shard, also_done=also_done)
        try:
            progress = driver.run(drain=self.drain_time)
        except BatchError:
            # Requests lost because the server went away: a failure, unless it went away because the
            # job is being stopped (scancel's SIGTERM reaches vLLM and this rank at the same moment;
            # the rank's stop may come a little after the resets). Wait for that stop, bounded.
            if not self.stop.wait(STOP_RACE):
                raise
            progress = driver.progress()
        if not progress.finished:
            raise Stopped(self.stop_reason or "stopped", detail=progress.summary())
        self.done_detail = progress.summary()
        if shard is not None:            # the last shard to end completes the output
            merged = merge(out, self.spec.batch_parts, Path(b.input or ""))
            self.done_detail += f"; {merged.line()}"

    def drain_time(self) -> float:
        """How long a stopped batch waits for its requests in flight: long at the time limit (the
        server stays up), short after a cancel."""
        return BATCH_DRAIN if self.stop_reason == "TIMEOUT" else CANCEL_DRAIN

    def barrier(self, ident: Identity, ports: Ports) -> tuple[RayNode, ...]:
        """Wait until Ray reports every node and every GPU of the allocation."""
        assert self.runtime is not None
        want_nodes = self.plan.nodes
        want_gpus = self.plan.nodes * self.plan.gpus_per_node
        argv = ["python3", "-c", RAY_WATCH, f"{ident.ip}:{ports.gcs}", str(want_nodes), str(want_gpus)]
        log = self.jd.rank_log("ray-watch", self.rank)
        watch = proc.spawn("ray-watch", self.runtime.exec(argv), log, env=self.child_env())
        self.watchdog.watch(watch.popen.pid)
        seen: tuple[RayNode, ...] = ()
        last = -1

        def joined() -> bool:
            nonlocal seen, last
            self.check_workers()
            ended = not watch.alive()            # read after: its last line is then surely in the log
            parsed = parse_ray_nodes(log.read_text(errors="replace"))
            if parsed is not None:
                seen = parsed
                if len(seen) != last:
                    last = len(seen)
                    self.jd.write_stage(Stage.RAY_JOINED, f"{len(seen)}/{want_nodes}")
            if len(seen) >= want_nodes and sum(n.gpus for n in seen) >= want_gpus:
                return True
            if ended:
                raise ClusterError(f"the Ray probe exited (code {watch.returncode()}) on "
                                   f"{socket.gethostname()}: {watch.tail(8)}")
            return False

        try:
            self.wait_for(f"Ray to report {want_nodes} nodes and {want_gpus} GPUs", joined,
                          self.plan.ready_timeout)
        finally:
            watch.terminate(timeout=5)
        return seen

    def check_network(self, ident: Identity, nodes: tuple[RayNode, ...]) -> None:
        """Every Ray node registered an address on the chosen interface's network, or fail now
        (else vLLM's placement group waits forever for a node it cannot match)."""
        net = interface_network(ident.interface)
        wrong = [n.ip for n in nodes if ipaddress.ip_address(n.ip) not in net]
        if wrong:
            raise ClusterError(f"Ray nodes {', '.join(wrong)} are not on {ident.interface}'s network {net} "
                               f"(the head is {ident.ip}); set network.interface to an interface every "
                               f"node has on one network")

    def check_workers(self) -> None:
        for failed in self.jd.failed_ranks():
            raise ClusterError(str(RankFailure.read(failed)))

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


class Worker(Rank):
    """Ranks above 0: join the head's Ray cluster, stay until the head says done."""

    def run(self) -> None:
        first = self.jd.preflight_addr if self.wants_preflight else self.jd.head
        self.wait_for(f"the head ({first.name})", lambda: self.published(first), self.plan.ready_timeout)
        head_ip = (Rendezvous.read(first).ip if first == self.jd.preflight_addr else HeadInfo.read(first).ip)
        ident = identity(self.job.head_host, self.spec.network.interface, head_ip=head_ip)
        ports = self.setup(ident)
        if ports is None:
            return
        assert self.runtime is not None
        if self.plan.backend == "mp":         # vLLM's own launcher: this node's part, headless
            self.wait_for("the head (head.json)", lambda: self.published(self.jd.head),
                          self.plan.ready_timeout)
            head = HeadInfo.read(self.jd.head)
            master = (head.ip, head.gcs_port)
            argv = vllm_argv(self.plan, ident.ip, 0, master=master, node_rank=self.rank)
            self.spawn("vllm", self.runtime.start(argv))
        else:
            self.wait_for("the Ray head (head.json)", self.head_ready, self.plan.ready_timeout)
            head = HeadInfo.read(self.jd.head)
            address = f"{head.ip}:{head.gcs_port}"
            argv = ray_argv(self.plan, ports, ident.ip, address, self.job.cpus)
            self.spawn("ray-worker", self.runtime.start(argv))
        while not self.jd.done.exists():
            self.check()
            self.stop.wait(POLL)

    def published(self, path: Path) -> bool:
        if self.jd.done.exists() or self.jd.read_stage().stage.final:
            raise Stopped("the head ended")
        return path.exists()

    def head_ready(self) -> bool:
        if not self.published(self.jd.head):
            return False
        head = HeadInfo.read(self.jd.head)
        return port_open(head.ip, head.gcs_port)
