"""Failures on the test bed: kill a part of a READY job, wait for its final stage and its release."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from slurm_vllm.core.records import HeadInfo

from .cli import status
from .slurm import allocation
from .testbed import in_node, leftovers, node_process, node_processes


def in_queue(job_id: str) -> bool:
    return bool(subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True,
                               text=True).stdout.strip())


def wait_final(job_id: str, within: float) -> tuple[dict[str, Any], float]:
    """The job's status once final, and the seconds it took; fails after WITHIN s."""
    t0 = time.monotonic()
    while True:
        st = status(job_id)
        if st["stage"] in ("FAILED", "CANCELLED", "DONE", "TIMEOUT"):
            return st, time.monotonic() - t0
        assert time.monotonic() - t0 < within, f"still {st} after {within:.0f} s"
        time.sleep(0.5)


def wait_released(job_id: str, nodes: int = 3, within: float = 60) -> None:
    """Nothing of the job runs on any node, and Slurm has given its nodes back."""
    t0 = time.monotonic()
    while (left := leftovers(nodes)) or in_queue(job_id):
        assert time.monotonic() - t0 < within, f"{within:.0f} s later: {left}, in queue: {in_queue(job_id)}"
        time.sleep(0.5)


def raylet(node: int, job_id: str) -> int:
    """The pid of JOB_ID's raylet on test-bed NODE: by its executable's name (other command lines,
    the job folder's path included, may hold the word) and the job's GCS address (another job's
    raylet may still be on its way out)."""
    gcs = HeadInfo.read(Path(status(job_id)["job_dir"]) / "head.json").gcs_port
    found = [pid for pid, comm, cmd in node_processes(node) if comm == "raylet" and f":{gcs} " in f"{cmd} "]
    assert len(found) == 1, f"raylets of job {job_id} (GCS port {gcs}) on node{node}: {found}"
    return found[0]


def worker_node(job_id: str) -> int:
    """The test-bed node number of the job's second node (a worker: the head is the first)."""
    return int(allocation(job_id)[1].removeprefix("node"))


# What the FAILED line says ended (a killed container takes its `ray start` with it: code 137).
KILLED = {"worker-raylet": "ray-worker exited", "head-vllm": "vllm exited",
          "worker-node-program": "the node program of rank 1 ended (Killed)", "worker-vllm-mp": "vllm exited",
          "worker-container": "ray-worker exited (code 137)"}


def kill_and_see_it_fail(job_id: str, kill: str) -> None:
    """kill -9 (KILL, a key of KILLED) in the READY job JOB_ID — a worker's raylet, the head's `vllm
    serve`, a worker's node program (as the OOM killer would: srun then stops the other tasks, which
    must not read as a cancel), a worker's headless `vllm serve` (backend mp), or `docker kill` of a
    worker's container: FAILED within 30 s, naming the node and what ended, every node cleaned and
    the allocation released."""
    head = int(allocation(job_id)[0].removeprefix("node"))
    node = head if kill == "head-vllm" else worker_node(job_id)
    if kill == "worker-container":
        subprocess.run(in_node(node, ["docker", "kill", f"slurm-vllm-{job_id}-1"]), check=True,
                       capture_output=True)
    else:
        pid = {"worker-raylet": lambda: raylet(node, job_id),
               "head-vllm": lambda: node_process(node, "vllm serve"),
               "worker-node-program": lambda: node_process(node, "slurm_vllm.node run"),
               "worker-vllm-mp": lambda: node_process(node, "vllm serve")}[kill]()
        os.kill(pid, signal.SIGKILL)
    st, took = wait_final(job_id, 30)
    assert st["stage"] == "FAILED", st
    assert f"node{node}" in st["detail"] and KILLED[kill] in st["detail"], st
    print(f"{kill} killed: FAILED after {took:.1f} s: {st['detail'][:200]}")
    wait_released(job_id)
