"""The per-rank program: role, network identity, Ray bring-up, vLLM, readiness, signals, teardown.

Every task of the allocation runs `main(job_dir)` (through submitit, or `python -m slurm_vllm.node
run DIR` from a rendered sbatch script). Rank 0 starts the Ray head, waits until Ray reports every
node and GPU, starts `vllm serve` in the same container, probes /health, /v1/models and a 1-token
completion, then writes endpoint.json and the stage READY. Other ranks join Ray once the head's
GCS port answers. Ranks meet only through the job folder and the head's ports; no sleeps stand in
for facts. SIGTERM/SIGINT (scancel) and SIGUSR2 (time limit near) stop everything of this rank.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import psutil
import yaml

from . import hostlist, proc
from . import preflight as preflight_mod
from . import spec as spec_mod
from .container import Runtime, env_file_text
from .errors import ClusterError, ServeError, SlurmVllmError
from .jobdir import FINAL, JobDir, link_job_id, read_secret, write_secret
from .plan import Plan, Ports, ray_argv, vllm_argv
from .plan import ports as plan_ports
from .spec import JobSpec

POLL = 0.5          # seconds between two looks at a fact (port, Ray, HTTP); never a stand-in for one

# Run inside the container with its Python: how many Ray nodes are alive, with their IPs and GPUs.
RAY_PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes = [n for n in ray.nodes() if n["Alive"]]
print(json.dumps([{"ip": n["NodeManagerAddress"], "gpus": n["Resources"].get("GPU", 0)} for n in nodes]))
"""


class Stopped(SlurmVllmError):
    """This rank was told to stop (signal) or the job ended elsewhere."""


@dataclass(frozen=True)
class Identity:
    """This node's one network identity, decided once and applied everywhere."""

    hostname: str
    ip: str
    interface: str
    head_host: str
    head_ip: str


def route_ip(target: str) -> str:
    """The local address the kernel would use to reach TARGET (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((target, 9))
        return str(s.getsockname()[0])


def interface_of(ip: str) -> str:
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    raise ClusterError(f"no network interface holds {ip}")


def interface_addresses() -> dict[str, tuple[str, str]]:
    """{interface: (IPv4, netmask)} of this node."""
    out: dict[str, tuple[str, str]] = {}
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET:
                out.setdefault(name, (a.address, a.netmask or "255.255.255.255"))
    return out


def interface_network(interface: str) -> ipaddress.IPv4Network:
    ip, mask = interface_addresses()[interface]
    return ipaddress.IPv4Network(f"{ip}/{mask}", strict=False)


def identity(head_host: str, interface: str | None, head_ip: str | None = None) -> Identity:
    """This node's address: on INTERFACE if given, else the one on the route to the head."""
    if interface:
        addrs = interface_addresses()
        if interface not in addrs:
            have = ", ".join(f"{n} {a[0]}" for n, a in sorted(addrs.items()))
            raise ClusterError(f"network.interface: {interface} has no IPv4 address on "
                               f"{socket.gethostname()} (interfaces here: {have})")
        ip = addrs[interface][0]
        return Identity(socket.gethostname(), ip, interface, head_host, head_ip or ip)
    resolved = head_ip or socket.gethostbyname(head_host)
    ip = route_ip(resolved)
    if ip.startswith("127."):
        ip = resolved         # this is the head: its address on the route others use
    return Identity(socket.gethostname(), ip, interface_of(ip), head_host, resolved)


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Rank:
    """One task of the allocation."""

    def __init__(self, jd: JobDir) -> None:
        self.jd = jd
        self.plan = Plan.from_json(jd.plan.read_text())
        self.spec: JobSpec = spec_mod.parse(yaml.safe_load(jd.spec.read_text()))
        self.rank = int(os.environ.get("SLURM_PROCID", "0"))
        self.job_id = int(os.environ["SLURM_JOB_ID"])
        self.hosts = hostlist.expand(os.environ["SLURM_JOB_NODELIST"])
        self.cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or os.cpu_count() or 1)
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.stop_reason = ""
        self.children: list[proc.Child] = []
        self.runtime: Runtime | None = None

    # -- signals -----------------------------------------------------------------------------

    def install_signals(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            if not self.stop_reason:
                self.stop_reason = {signal.SIGUSR2: "TIMEOUT"}.get(signal.Signals(signum), "CANCELLED")
            self.stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
            signal.signal(sig, handler)

    def check(self) -> None:
        if self.stop.is_set():
            raise Stopped(self.stop_reason or "stopped")
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

    def environment(self, ident: Identity, ports: Ports) -> dict[str, str]:
        """What Ray and vLLM see on this node (inside the container): spec env, identity, secrets."""
        env = dict(self.spec.env)
        env.update({
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.jd.ray_token),
            **self.spec.nccl.env(),
            "RAY_USAGE_STATS_ENABLED": "0",
            "VLLM_HOST_IP": ident.ip,
            "GLOO_SOCKET_IFNAME": ident.interface,
            "NCCL_SOCKET_IFNAME": ident.interface,
        })
        for key, path in self.spec.secret_env.items():
            try:
                env[key] = read_secret(Path(os.path.expandvars(path)).expanduser())
            except OSError as exc:
                raise ClusterError(f"secret_env.{key}: cannot read {path} on {socket.gethostname()}: "
                                   f"{exc.strerror}") from exc
        if self.rank == 0:
            env["RAY_ADDRESS"] = f"{ident.ip}:{ports.gcs}"   # vllm serve joins this Ray, never its own
            if self.plan.api_key:
                env["VLLM_API_KEY"] = read_secret(self.jd.api_key)
        return env

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
            self.jd.write_json(self.jd.preflight_addr, {"ip": ident.ip, "port": ports.client})
            self.jd.write_stage("PREFLIGHT", f"all-reduce across {self.plan.nodes} nodes")
        addr = self.jd.read_json(self.jd.preflight_addr)
        out = self.jd.path / "preflight-raw.json"
        argv = ["python3", "-c", preflight_mod.SCRIPT, str(self.rank), str(self.plan.nodes), str(addr["ip"]),
                str(addr["port"]), str(out), ",".join(map(str, preflight_mod.SIZES))]
        log_path = self.jd.rank_log("preflight", self.rank)
        child = proc.spawn("preflight", self.runtime.start(argv, suffix="-preflight"), log_path,
                           env=self.child_env())
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
            self.jd.write_json(self.jd.preflight, result)
            self.jd.write_stage("PREFLIGHT", f"ok: {result['transport']}, "
                                             f"{result['rows'][-1]['busbw_GBps']:.2f} GB/s bus bandwidth")

    def choose_ports(self) -> Ports:
        """This node's port block: planned from the job id, moved on when any port is taken here."""
        for attempt in range(16):
            ports = plan_ports(self.plan, self.job_id, attempt)
            if all(port_free(p) for p in ports.all()):
                return ports
            if self.plan.gcs_port or self.plan.api_port:
                break
        raise ClusterError(f"{socket.gethostname()}: no free port block (tried from "
                           f"{plan_ports(self.plan, self.job_id).gcs}); is another job holding them?")

    def make_runtime(self, ident: Identity, ports: Ports) -> Runtime:
        env_file = self.jd.env_dir / f"rank-{self.rank}.env"
        env = self.environment(ident, ports)
        write_secret(env_file, env_file_text(env, self.spec.container.runtime).rstrip("\n"))
        gpus = tuple(g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g)
        binds = (*self.spec.container.binds, f"{self.jd.path}:{self.jd.path}")
        name = f"slurm-vllm-{self.job_id}-{self.rank}"
        return Runtime(self.spec.container, name, env_file, binds, gpus,
                       infiniband=self.spec.nccl.ib_hca is not None)

    def child_env(self) -> dict[str, str] | None:
        """The process environment of a child: for runtime none the job env goes in directly."""
        assert self.runtime is not None
        if self.runtime.kind != "none":
            return None
        env = dict(os.environ)
        for line in self.runtime.env_file.read_text().splitlines():
            key, _, value = line.partition("=")
            env[key] = value
        return env

    def spawn(self, name: str, argv: list[str]) -> proc.Child:
        child = proc.spawn(name, argv, self.jd.rank_log(name, self.rank), env=self.child_env())
        self.children.append(child)
        return child

    def run(self) -> None:
        raise NotImplementedError

    # -- teardown ------------------------------------------------------------------------------

    def teardown(self) -> None:
        proc.terminate_all(self.children, timeout=10)
        if self.runtime is not None:
            remove = self.runtime.remove(("", "-preflight"))
            if remove:
                proc.run(remove, check=False, timeout=30)


class Head(Rank):
    """Rank 0: Ray head, barrier, vLLM, readiness, endpoint, supervision."""

    def run(self) -> None:
        hosts = self.hosts
        ident = identity(hosts[0], self.spec.network.interface)
        self.jd.write_stage("STARTING", f"{len(hosts)} nodes: {','.join(hosts)}")
        ports = self.setup(ident)
        if ports is None:
            return
        assert self.runtime is not None
        self.spawn("ray-head", self.runtime.start(ray_argv(self.plan, ports, ident.ip, None, self.cpus)))
        self.wait_for(f"the Ray head's port {ident.ip}:{ports.gcs}",
                      lambda: port_open(ident.ip, ports.gcs), self.plan.ready_timeout)
        self.jd.write_json(self.jd.head, {"host": ident.hostname, "ip": ident.ip, "gcs_port": ports.gcs,
                                          "api_port": ports.api, "interface": ident.interface})
        self.jd.write_stage("RAY_HEAD", f"{ident.ip}:{ports.gcs}")
        nodes = self.barrier(ident, ports)
        self.jd.write_json(self.jd.path / "ray_nodes.json", nodes)
        self.check_network(ident, nodes)
        self.jd.write_stage("LOADING", f"vllm serve TP{self.plan.tp}xPP{self.plan.pp} on "
                                       f"{', '.join(sorted(str(n['ip']) for n in nodes))}")
        self.spawn("vllm", self.runtime.exec(vllm_argv(self.plan, ident.ip, ports.api)))
        url = f"http://{ident.ip}:{ports.api}"
        self.wait_ready(url)
        endpoint = {"url": f"{url}/v1", "model": self.plan.served_name, "host": ident.ip,
                    "port": ports.api, "api_key_file": str(self.jd.api_key) if self.plan.api_key else None,
                    "job_id": str(self.job_id)}
        self.jd.write_json(self.jd.endpoint, endpoint)
        self.jd.write_stage("READY", f"{url}/v1")
        while True:                      # supervise until vLLM or Ray dies, or a stop comes
            self.check()
            self.stop.wait(1.0)

    def barrier(self, ident: Identity, ports: Ports) -> list[dict[str, object]]:
        """Wait until Ray reports every node and every GPU of the allocation."""
        assert self.runtime is not None
        want_nodes = self.plan.nodes
        want_gpus = self.plan.nodes * self.plan.gpus_per_node
        probe = self.runtime.exec(["python3", "-c", RAY_PROBE, f"{ident.ip}:{ports.gcs}"])
        seen: list[dict[str, object]] = []
        last = -1

        def joined() -> bool:
            nonlocal seen, last
            self.check_workers()
            out = proc.run(probe, env=self.child_env(), check=False, timeout=60)
            try:
                seen = json.loads(out.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                return False
            if len(seen) != last:
                last = len(seen)
                self.jd.write_stage("RAY_JOINED", f"{len(seen)}/{want_nodes}")
            gpus = sum(float(str(n["gpus"])) for n in seen)
            return len(seen) >= want_nodes and gpus >= want_gpus

        self.wait_for(f"Ray to report {want_nodes} nodes and {want_gpus} GPUs", joined,
                      self.plan.ready_timeout)
        return seen

    def check_network(self, ident: Identity, nodes: list[dict[str, object]]) -> None:
        """Every Ray node registered an address on the chosen interface's network, or fail now
        (else vLLM's placement group waits forever for a node it cannot match)."""
        net = interface_network(ident.interface)
        wrong = [str(n["ip"]) for n in nodes if ipaddress.ip_address(str(n["ip"])) not in net]
        if wrong:
            raise ClusterError(f"Ray nodes {', '.join(wrong)} are not on {ident.interface}'s network {net} "
                               f"(the head is {ident.ip}); set network.interface to an interface every "
                               f"node has on one network")

    def check_workers(self) -> None:
        for failed in self.jd.path.glob("rank-*.failed"):
            raise ClusterError(f"{failed.stem}: {failed.read_text().strip()}")

    def wait_ready(self, url: str) -> None:
        """vLLM is ready when /health answers, /v1/models lists the model and 1 token comes back."""
        key = read_secret(self.jd.api_key) if self.plan.api_key else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}

        def http(path: str, body: dict[str, object] | None = None) -> tuple[int, str]:
            data = json.dumps(body).encode() if body is not None else None
            req = urllib.request.Request(url + path, data=data, headers={
                **headers, **({"Content-Type": "application/json"} if data else {})})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return int(resp.status), resp.read().decode()
            except urllib.error.HTTPError as exc:
                return int(exc.code), exc.read().decode(errors="replace")
            except OSError:
                return 0, ""

        self.wait_for("vLLM's /health", lambda: http("/health")[0] == 200, self.plan.ready_timeout)
        status, text = http("/v1/models")
        if status != 200 or self.plan.served_name not in text:
            raise ServeError(f"/v1/models answered {status}: {text[:200]}")
        status, text = http("/v1/completions", {"model": self.plan.served_name, "prompt": "Hello",
                                                "max_tokens": 1})
        if status != 200:
            raise ServeError(f"a 1-token completion answered {status}: {text[:300]}")


class Worker(Rank):
    """Ranks above 0: join the head's Ray cluster, stay until the head says done."""

    def run(self) -> None:
        first = self.jd.preflight_addr if self.wants_preflight else self.jd.head
        self.wait_for(f"the head ({first.name})", lambda: self.published(first), self.plan.ready_timeout)
        head_ip = str(self.jd.read_json(first)["ip"])
        ident = identity(self.hosts[0], self.spec.network.interface, head_ip=head_ip)
        ports = self.setup(ident)
        if ports is None:
            return
        assert self.runtime is not None
        self.wait_for("the Ray head (head.json)", self.head_ready, self.plan.ready_timeout)
        head = self.jd.read_json(self.jd.head)
        address = f"{head['ip']}:{head['gcs_port']}"
        self.spawn("ray-worker", self.runtime.start(ray_argv(self.plan, ports, ident.ip, address, self.cpus)))
        while not self.jd.done.exists():
            self.check()
            self.stop.wait(POLL)

    def published(self, path: Path) -> bool:
        if self.jd.done.exists() or self.jd.read_stage().stage in FINAL:
            raise Stopped("the head ended")
        return path.exists()

    def head_ready(self) -> bool:
        if not self.published(self.jd.head):
            return False
        head = self.jd.read_json(self.jd.head)
        return port_open(str(head["ip"]), int(head["gcs_port"]))


def main(job_dir: str) -> int:
    """Run this task's rank; return its exit code (0: stopped on purpose or finished)."""
    jd = JobDir(Path(job_dir))
    is_head = int(os.environ.get("SLURM_PROCID", "0")) == 0
    try:
        rank: Rank = (Head if is_head else Worker)(jd)
    except Exception as exc:      # an unreadable job folder: say so where the CLI looks
        if is_head:
            jd.write_stage("FAILED", f"{socket.gethostname()}: cannot start: {type(exc).__name__}: {exc}")
        raise
    rank.install_signals()
    code = 0
    final, detail = "DONE", ""    # DONE: the rank's work ended by itself (preflight, a worker told so)
    try:
        rank.run()
    except Stopped:
        final = rank.stop_reason or "CANCELLED"
    except SlurmVllmError as exc:
        final, detail, code = "FAILED", str(exc), 1
    except Exception as exc:  # a bug: still tear down and say what happened
        final, detail, code = "FAILED", f"{type(exc).__name__}: {exc}", 1
        raise
    finally:
        if rank.rank == 0:
            jd.done.touch()       # workers stop when they see it
            failed = sorted(jd.path.glob("rank-*.failed"))
            if failed and final != "FAILED":
                final, detail = "FAILED", f"{failed[0].stem}: {failed[0].read_text().strip()}"
        elif final == "FAILED":
            (jd.path / f"rank-{rank.rank}.failed").write_text(f"{socket.gethostname()}: {detail}\n")
        rank.teardown()
        if rank.rank == 0:
            jd.write_stage(final, detail)
    return code


def run_task(job_dir: str) -> None:
    """submitit's entry point: a failed rank raises, so its task exits non-zero and Slurm says FAILED."""
    if main(job_dir):
        raise ClusterError(f"this rank failed; see {job_dir}/stage and {job_dir}/logs")


def init(job_dir: str, script: str | None, spec_yaml: str) -> None:
    """The first step of a rendered sbatch script: create the job folder from the embedded spec."""
    from . import plan as plan_mod

    spec = spec_mod.parse(yaml.safe_load(spec_yaml))
    plan = plan_mod.make(spec)
    jd = JobDir(Path(job_dir))
    jd.create(spec_mod.dump(spec), plan.to_json(), api_key=plan.api_key)
    job_id = os.environ["SLURM_JOB_ID"]
    jd.job_id_file.write_text(job_id + "\n")
    if script:
        jd.sbatch.write_text(Path(script).read_text())
    link_job_id(spec.jobs_root_path, job_id, jd.path)


def _cli(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "run":
        return main(argv[1])
    if len(argv) in (2, 3) and argv[0] == "init":
        init(argv[1], argv[2] if len(argv) == 3 else None, sys.stdin.read())
        return 0
    print("usage: python -m slurm_vllm.node run JOB_DIR | init JOB_DIR [SCRIPT] < spec.yaml", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
