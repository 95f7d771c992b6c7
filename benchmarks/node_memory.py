"""Benchmark: peak memory (summed RSS) of everything running on the test-bed nodes while a command runs.

Samples every 0.5 s the processes inside each node's network namespace (Slurm's own daemons
excluded), and prints the peak total and per node. Usage (root, test bed up):
    python benchmarks/node_memory.py -- pytest tests/test_serve_e2e.py -k podman_tensor
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psutil

DAEMONS = {"slurmd", "dockerd", "containerd"}


def node_rss(nodes: int) -> dict[str, int]:
    out = {}
    for i in range(1, nodes + 1):
        pids = subprocess.run(["ip", "netns", "pids", f"svt-node{i}"], capture_output=True, text=True).stdout
        total = 0
        for pid in pids.split():
            try:
                p = psutil.Process(int(pid))
                if p.name() not in DAEMONS:
                    total += p.memory_info().rss
            except psutil.Error:
                continue
        out[f"node{i}"] = total
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run (after --)")
    args = parser.parse_args()
    argv = [a for a in args.command if a != "--"] if args.command[:1] == ["--"] else args.command
    if not argv:
        parser.error("give the command to run after --")
    child = subprocess.Popen(argv)
    peak_total, peak_nodes = 0, {}
    while child.poll() is None:
        sample = node_rss(3)
        if sum(sample.values()) > peak_total:
            peak_total, peak_nodes = sum(sample.values()), sample
        time.sleep(0.5)
    mib = 1 << 20
    per_node = ", ".join(f"{k} {v / mib:.0f} MiB" for k, v in peak_nodes.items())
    print(f"peak RSS on the nodes: {peak_total / mib:.0f} MiB ({per_node}); command exit {child.returncode}")
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
