"""e2e: failures are explained, fast, and leave nothing behind (real Slurm, Ray, vLLM, containers).

A job that dies before slurm_vllm starts on its nodes; the head's vLLM or a worker's headless vLLM
killed after READY; two jobs starting together on the same nodes, then one's raylet killed (a
worker's node program and container die at the end of other jobs: tests/support/failures.py; a real
time limit: tests/test_exposure_e2e.py).
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from .support.cli import chat, cli, expected, logs, status, submit
from .support.failures import in_queue, kill_and_see_it_fail, wait_final, wait_released
from .support.slurm import allocation
from .support.specs import derive

pytestmark = pytest.mark.e2e


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


@pytest.mark.parametrize("kill", ["head-vllm", "worker-vllm-mp"])
def test_a_death_while_serving_fails_the_job_within_30s(kill: str, testbed: dict[str, str],
                                                       tmp_path: Path) -> None:
    """After READY, kill -9 the head's `vllm serve` (Ray), or with backend mp (no Ray) a worker's
    headless `vllm serve`: kill_and_see_it_fail. (A worker's raylet, node program and container
    die at the end of jobs that first answer other questions: the twin jobs below, the
    second-interface job, the Docker job.)"""
    changes = {"backend": "mp"} if kill.endswith("-mp") else {}
    name = f"death-{kill.split('-')[0]}{'-mp' if changes else ''}"
    job = submit(derive(tmp_path, "test-none-tp2.yaml", name, **changes), wait=True)
    try:
        kill_and_see_it_fail(job["job_id"], kill)
    finally:
        subprocess.run(["scancel", job["job_id"]], check=False)


def test_two_jobs_starting_together_on_the_same_nodes(testbed: dict[str, str], tmp_path: Path) -> None:
    """One spec submitted twice at the same moment onto node1 and node2 (same name, same second: the
    folders differ by job id): both READY on distinct ports; cancel one, the other still answers.
    Then a worker's raylet of the other dies: FAILED naming it (kill_and_see_it_fail)."""
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
        kill_and_see_it_fail(jobs[1]["job_id"], "worker-raylet")      # and the other twin's end
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
