"""The test bed's life cycle: up (idempotent), down (only what up started), health and status."""

from __future__ import annotations

import secrets
import shutil
import time

from . import engines, net, packages, procs, pyxis, slurm, testenv
from .config import (
    APPTAINER,
    JOBS_ROOT,
    NODE_BIN,
    NODE_IFNAMES,
    STATE,
    TEST_SECRET,
    Shape,
    node_ip,
    node_name,
)
from .procs import run


class Timer:
    def __init__(self) -> None:
        self.t0 = self.last = time.monotonic()
        self.phases: list[tuple[str, float]] = []

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.phases.append((phase, now - self.last))
        self.last = now

    def report(self) -> str:
        parts = ", ".join(f"{name} {secs:.1f} s" for name, secs in self.phases if secs >= 0.05)
        return f"{time.monotonic() - self.t0:.1f} s ({parts})"


def _daemons(shape: Shape) -> list[str]:
    names = ["munged", "mariadb", "slurmdbd", "slurmctld"]
    for i in range(1, shape.nodes + 1):
        names += [f"slurmd-{node_name(i)}", f"dockerd-{node_name(i)}"]
    return names


def problems(shape: Shape | None = None) -> list[str]:
    """What is wrong with the running test bed (empty: healthy)."""
    shape = shape or Shape.load()
    if shape is None:
        return ["the test bed is not up (run: scripts/testbed up)"]
    found = [f"{name} is not running" for name in _daemons(shape) if procs.pid_of(name) is None]
    if found:
        return found
    states = slurm.node_states()
    for i in range(1, shape.nodes + 1):
        state = states.get(node_name(i), "missing").rstrip("*")
        if state not in ("idle", "mixed", "allocated", "completing"):
            found.append(f"{node_name(i)} is {state}")
    return found


def up(shape: Shape) -> None:
    timer = Timer()
    packages.ensure()
    timer.mark("packages")
    testenv.ensure_venv()
    timer.mark("virtualenv")
    testenv.ensure_model()
    timer.mark("model")
    testenv.ensure_image_rootfs()
    testenv.ensure_apptainer_image()
    timer.mark("image")
    testenv.ensure_apptainer()
    timer.mark("apptainer")
    pyxis.ensure_built()
    pyxis.link_node_bin(NODE_BIN, APPTAINER / "usr" / "bin" / "apptainer")
    timer.mark("enroot+pyxis")
    if Shape.load() == shape and not problems(shape):
        for i in range(1, shape.nodes + 1):      # a rebuilt image reaches the running engines
            engines.import_images(i)
        pyxis.ensure_image(slurm.in_node(1, []), testenv.rootfs_digest())
        timer.mark("images")
        print(f"testbed: already up ({shape.nodes} nodes); checked in {timer.report()}")
        return
    if procs.recorded() or Shape.load() is not None:
        print("testbed: an older or unhealthy test bed is in the way: taking it down first")
        down(quiet=True)
        timer.mark("down")
    try:
        _start(shape, timer)
    except BaseException:
        print("testbed: up failed; cleaning up what it started (logs kept in "
              f"{STATE}/log until the next up)")
        down(quiet=True, keep_logs=True)
        raise
    print(f"testbed: up: {shape.nodes} nodes x {shape.gpus_per_node} GPUs in {timer.report()}")


def _start(shape: Shape, timer: Timer) -> None:
    shutil.rmtree(STATE / "log", ignore_errors=True)
    STATE.mkdir(parents=True, exist_ok=True)
    JOBS_ROOT.mkdir(parents=True, exist_ok=True)
    if not TEST_SECRET.exists():             # what the test configs' secret_env names: any value will do
        TEST_SECRET.write_text(f"svt-secret-{secrets.token_hex(16)}\n")
        TEST_SECRET.chmod(0o600)
    net.up(shape.nodes)
    slurm.make_fake_gpus(shape)
    timer.mark("network")
    slurm.start_munge()
    password = slurm.start_mariadb()
    slurm.write_configs(shape, password)
    timer.mark("munge+mariadb")
    slurm.start_slurmdbd()
    slurm.start_slurmctld()
    timer.mark("slurmdbd+slurmctld")
    nodes = range(1, shape.nodes + 1)
    for i in nodes:
        engines.write_podman_conf(i)
        slurm.start_slurmd(i)
    slurm.wait_nodes_idle(shape)
    timer.mark("slurmd")
    for i in nodes:
        engines.start_dockerd(i)
    for i in nodes:
        engines.wait_dockerd(i)
    timer.mark("dockerd")
    for i in nodes:
        engines.import_images(i)
    pyxis.ensure_image(slurm.in_node(1, []), testenv.rootfs_digest())
    timer.mark("images")
    shape.save()
    left = problems(shape)
    if left:
        raise RuntimeError("test bed unhealthy after up: " + "; ".join(left))


def _cancel_jobs() -> None:
    if procs.pid_of("slurmctld") is None:
        return
    jobs = run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
    if not jobs:
        return
    run(["scancel", *jobs], check=False)
    deadline = time.monotonic() + 45
    while run(["squeue", "-h", "-o", "%i"], check=False).stdout.split() and time.monotonic() < deadline:
        time.sleep(0.2)


def _sweep_node(i: int) -> None:
    """Stop every process still inside nodeI's network namespace: by construction, ours."""
    inode = net.netns_inode(i)
    if inode is None:
        return
    procs.kill_all([(pid, procs.start_time(pid)) for pid in procs.pids_in_netns(inode)], timeout=10)


def down(quiet: bool = False, keep_logs: bool = False) -> None:
    timer = Timer()
    shape = Shape.load()
    _cancel_jobs()
    timer.mark("jobs")
    procs.stop_all([n for n in procs.recorded() if n.startswith("dockerd-")], timeout=20)
    timer.mark("dockerd")
    nodes = shape.nodes if shape else 16
    for i in range(1, nodes + 1):
        _sweep_node(i)
    procs.stop_all(procs.recorded())
    timer.mark("daemons")
    net.down()
    slurm.restore_configs()
    slurm.unlink_default_munge()
    for entry in STATE.iterdir() if STATE.exists() else []:
        if keep_logs and entry.name == "log":
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink()
    timer.mark("network+files")
    if not quiet:
        print(f"testbed: down in {timer.report()}")


def status() -> int:
    shape = Shape.load()
    if shape is None:
        print("testbed: not up")
        return 1
    states = slurm.node_states()
    print(f"cluster: {shape.nodes} nodes x {shape.gpus_per_node} GPUs, {shape.cpus_per_node} CPUs each")
    for i in range(1, shape.nodes + 1):
        n = node_name(i)
        ips = ", ".join(f"{NODE_IFNAMES[k]} {node_ip(i, k)}" for k in range(len(NODE_IFNAMES)))
        print(f"  {n:7} {states.get(n, 'missing'):10} {ips}   slurmd pid {procs.pid_of(f'slurmd-{n}')}, "
              f"dockerd pid {procs.pid_of(f'dockerd-{n}')}")
    for name in ("munged", "mariadb", "slurmdbd", "slurmctld"):
        print(f"  {name:10} pid {procs.pid_of(name)}")
    print(testenv.machine_line())
    left = problems(shape)
    for p in left:
        print(f"problem: {p}")
    print("healthy" if not left else "NOT healthy")
    return 0 if not left else 1
