"""Where the test bed script is, and the environment it exports for tests."""

from __future__ import annotations

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


def leftovers(nodes: int) -> list[str]:
    """What still runs on the nodes besides the test bed's own daemons, and any container left."""
    found = []
    for i in range(1, nodes + 1):
        pids = subprocess.run(["ip", "netns", "pids", f"svt-node{i}"], capture_output=True, text=True).stdout
        for pid in pids.split():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:100]
            except OSError:
                continue
            if comm not in ("slurmd", "dockerd", "containerd"):
                found.append(f"node{i} pid {pid}: {cmd}")
        for engine in ("docker", "podman"):
            names = subprocess.run(in_node(i, [engine, "ps", "-a", "--format", "{{.Names}}"]),
                                   capture_output=True, text=True).stdout.split()
            found += [f"node{i} {engine} container {n}" for n in names if n.startswith("slurm-vllm-")]
    return found
