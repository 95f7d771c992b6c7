"""e2e: failures are explained, fast, and leave nothing behind (real Slurm, Ray, vLLM, containers).

A job that dies before slurm_vllm starts on its nodes; a worker's raylet or container killed after
READY; the head's vLLM killed; a real time limit; two jobs starting together on the same nodes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from .support.cli import chat, cli, expected, status
from .support.slurm import SLURM_PERIOD, end_soon
from .support.specs import derive
from .support.testbed import in_node, leftovers, node_process, node_processes
from .test_serve_e2e import allocation, logs

pytestmark = pytest.mark.e2e


def submit(spec: Path, wait: bool = False) -> dict[str, str]:
    out = cli("submit", str(spec), "--json", *(["--wait"] if wait else []), timeout=900)
    job: dict[str, str] = json.loads(out.stdout.splitlines()[0]) if out.stdout else {}
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n" + logs(job.get("job_dir", ""))
    return job


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


def raylet(node: int) -> int:
    """The pid of the raylet on test-bed NODE (by its executable's name: other command lines, the
    job folder's path included, may hold the word)."""
    found = [pid for pid, comm, _ in node_processes(node) if comm == "raylet"]
    assert len(found) == 1, f"raylets on node{node}: {found}"
    return found[0]


def worker_node(job_id: str) -> int:
    """The test-bed node number of the job's second node (a worker: the head is the first)."""
    return int(allocation(job_id)[1].removeprefix("node"))


@pytest.mark.parametrize("case", ["python-missing", "jobs-root-in-tmp"])
def test_a_job_that_dies_before_slurm_vllm_starts_is_explained(case: str, testbed: dict[str, str],
                                                               tmp_path: Path) -> None:
    """No bare `FAILED (slurm: FAILED)`: Slurm's state and exit code, and the batch output's last
    line, or that the nodes could not write it where this machine looks (a node-local jobs_root)."""
    if case == "python-missing":
        spec = derive(tmp_path, "test-none-tp2.yaml", "no-python",
                         **{"slurm.python": "/nonexistent/python3"})
    else:
        root = Path("/tmp") / f"svt-local-{uuid.uuid4().hex[:8]}"      # each test-bed node has its own /tmp
        spec = derive(tmp_path, "test-none-tp2.yaml", "local-root", jobs_root=str(root))
    out = cli("submit", str(spec), "--json")
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    if case == "jobs-root-in-tmp":
        assert "warning: jobs_root /tmp/svt-local-" in out.stderr, out.stderr
        assert "use a file system they share" in out.stderr, out.stderr
    st, _ = wait_final(job["job_id"], 60)
    assert st["stage"] == "FAILED", st
    assert "ended before slurm_vllm started on the nodes (Slurm: FAILED, exit code" in st["detail"], st
    if case == "python-missing":
        assert "/nonexistent/python3" in st["detail"] and "No such file" in st["detail"], st
    else:
        assert "is not on this machine: is jobs_root" in st["detail"], st
    text = cli("status", job["job_id"])
    assert text.returncode == 0 and len(text.stdout.splitlines()) == 1, text.stdout


@pytest.mark.parametrize("kill", ["worker-raylet", "head-vllm", "worker-node-program", "worker-vllm-mp"])
def test_a_death_while_serving_fails_the_job_within_30s(kill: str, testbed: dict[str, str],
                                                       tmp_path: Path) -> None:
    """After READY, kill -9 a worker's raylet, the head's `vllm serve`, or a worker's node program
    (as the OOM killer would: srun then stops the other tasks, which must not read as a cancel):
    FAILED within 30 s, naming the node, every node cleaned and the allocation released. With
    backend mp (no Ray), kill -9 of a worker's headless `vllm serve`."""
    changes = {"backend": "mp"} if kill.endswith("-mp") else {}
    name = f"death-{kill.split('-')[0]}{'-mp' if changes else ''}"
    job = submit(derive(tmp_path, "test-none-tp2.yaml", name, **changes), wait=True)
    job_id = job["job_id"]
    try:
        head = int(allocation(job_id)[0].removeprefix("node"))
        node = head if kill == "head-vllm" else worker_node(job_id)
        pid = {"worker-raylet": lambda: raylet(node), "head-vllm": lambda: node_process(node, "vllm serve"),
               "worker-node-program": lambda: node_process(node, "slurm_vllm.node run"),
               "worker-vllm-mp": lambda: node_process(node, "vllm serve")}[kill]()
        os.kill(pid, signal.SIGKILL)
        st, took = wait_final(job_id, 30)
        assert st["stage"] == "FAILED", st
        assert f"node{node}" in st["detail"], st
        what = {"worker-raylet": "ray-worker exited", "head-vllm": "vllm exited",
                "worker-node-program": "the node program of rank 1 ended (Killed)",
                "worker-vllm-mp": "vllm exited"}[kill]
        assert what in st["detail"], st
        print(f"{kill} killed: FAILED after {took:.1f} s: {st['detail'][:200]}")
        wait_released(job_id)
    finally:
        subprocess.run(["scancel", job_id], check=False)


def test_a_worker_container_killed_fails_the_job_within_30s(testbed: dict[str, str], tmp_path: Path) -> None:
    job = submit(derive(tmp_path, "test-docker-pp2.yaml", "kill-container"), wait=True)
    job_id = job["job_id"]
    try:
        node = worker_node(job_id)
        name = f"slurm-vllm-{job_id}-1"
        subprocess.run(in_node(node, ["docker", "kill", name]), check=True, capture_output=True)
        st, took = wait_final(job_id, 30)
        assert st["stage"] == "FAILED" and f"node{node}" in st["detail"], st
        print(f"container {name} killed: FAILED after {took:.1f} s: {st['detail'][:160]}")
        wait_released(job_id)
    finally:
        subprocess.run(["scancel", job_id], check=False)


def test_a_real_time_limit_ends_in_timeout_and_leaves_nothing(testbed: dict[str, str],
                                                              tmp_path: Path) -> None:
    """A real time limit while serving: Slurm sends SIGUSR2 90 s before the limit (--signal=USR2@90),
    the ranks stop cleanly and the stage says TIMEOUT, before Slurm has to kill anything (sacct:
    COMPLETED, before the limit). The job starts with room to load whatever the host's speed; once
    READY, the cluster's admin (the tests run as root) cuts its limit so that the signal comes within
    Slurm's next 30 s check (end_soon)."""
    spec = derive(tmp_path, "test-none-tp2.yaml", "time-limit", **{"slurm.nodes": 1, "parallelism.tensor": 1})
    job = submit(spec, wait=True)
    limit = end_soon(job["job_id"])
    st, took = wait_final(job["job_id"], SLURM_PERIOD + 60)
    assert st["stage"] == "TIMEOUT", st
    stages = [line.split()[1] for line in (Path(job["job_dir"]) / "stage.log").read_text().splitlines()]
    assert stages[-2:] == ["READY", "TIMEOUT"], stages
    wait_released(job["job_id"])
    acct = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job["job_id"], "-o", "State,ElapsedRaw"],
                          capture_output=True, text=True).stdout.strip()
    state, elapsed = acct.split("|")
    assert state == "COMPLETED" and int(elapsed) < limit * 60, acct   # ended by itself, not killed
    print(f"time limit: READY, limit cut to {limit} min, then TIMEOUT {took:.0f} s later; sacct {acct}")


def test_two_jobs_starting_together_on_the_same_nodes(testbed: dict[str, str], tmp_path: Path) -> None:
    """One spec submitted twice at the same moment onto node1 and node2 (same name, same second: the
    folders differ by job id): both READY on distinct ports; cancel one, the other still answers."""
    same_nodes = {"slurm.extra_directives": {"nodelist": "node[1-2]"}}
    spec = derive(tmp_path, "test-none-tp2.yaml", "twin", **same_nodes)
    procs = [subprocess.Popen([*cli_argv(), "submit", str(spec), "--json", "--wait"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    jobs = [json.loads(o.splitlines()[0]) for o, _ in outs]
    try:
        for p, (o, e), j in zip(procs, outs, jobs, strict=True):
            assert p.returncode == 0, f"{o}\n{e}\n" + logs(j["job_dir"])
        assert [allocation(j["job_id"]) for j in jobs] == [["node1", "node2"]] * 2
        assert jobs[0]["job_dir"] != jobs[1]["job_dir"]
        endpoints = [json.loads(cli("endpoint", j["job_id"], "--json").stdout) for j in jobs]
        assert endpoints[0]["url"] != endpoints[1]["url"], endpoints
        answer = expected(testbed["SLURM_VLLM_TEST_MODEL"])
        keys = [Path(e["api_key_file"]).read_text().strip() for e in endpoints]
        assert [chat(e, k) for e, k in zip(endpoints, keys, strict=True)] == [answer, answer]
        cancel_and_check_clean_one(jobs[0]["job_id"])
        assert status(jobs[1]["job_id"])["stage"] == "READY"
        assert chat(endpoints[1], keys[1]) == answer
    finally:
        for j in jobs:
            subprocess.run(["scancel", j["job_id"]], check=False)
        for j in jobs:
            wait_released(j["job_id"])


def cli_argv() -> list[str]:
    import sys

    return [sys.executable, "-m", "slurm_vllm"]


def cancel_and_check_clean_one(job_id: str) -> None:
    """Cancel JOB_ID: CANCELLED, out of the queue; the other job's processes are not touched."""
    assert cli("cancel", job_id).returncode == 0
    st, _ = wait_final(job_id, 60)
    assert st["stage"] == "CANCELLED", st
    t0 = time.monotonic()
    while in_queue(job_id):
        assert time.monotonic() - t0 < 60
        time.sleep(0.5)
