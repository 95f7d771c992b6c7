"""e2e: what a stranger on the cluster's network reaches of a job, in jobs that answer more.

For a READY TP2 job over node1+node2 of each backend and a 1-node job on node1, the surface table
(tests/support/exposure.py: tried from node3, outside the allocation) is printed (the README's
security section holds it) and checked. The same jobs show more, to keep the suite's job count down:
the Ray job is a user's template rendered and submitted with plain sbatch, the mp job vLLM's own
launcher without Ray, and the 1-node job ends at a real time limit.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from .support.cli import cli, expected, submit, wait_stage
from .support.exposure import beyond_the_engine_broadcast, sockets, surface, table
from .support.failures import wait_final, wait_released
from .support.slurm import SLURM_PERIOD, allocation, end_soon
from .support.specs import derive
from .support.testbed import node_process_env
from .test_serve_e2e import assert_mp_without_ray, assert_vllm_workers_on, cancel_and_check_clean

pytestmark = pytest.mark.e2e
SAME_NODES = {"slurm.extra_directives": {"nodelist": "node[1-2]"}}       # node3 is the stranger's

SITE_TEMPLATE = """{% extends "job.sbatch.j2" %}
{% block directives %}{{ super() }}#SBATCH --comment=site-template
{% endblock %}
{% block setup %}{{ super() }}export SLURM_VLLM_SITE=loaded   # a site's `module load`-style line
{% endblock %}
"""


def test_a_rendered_ray_job_from_a_user_template_and_what_a_stranger_reaches_of_it(
        testbed: dict[str, str], job_dir: Path) -> None:
    """A user template (an extra directive, a setup line) → `render --template` → plain sbatch →
    READY, TP2 over node1+node2 with Ray; then what node3 reaches of it: nothing of the prompts but
    the head's engine broadcast, nothing from Ray's servers."""
    template = job_dir / "site.sbatch.j2"
    template.write_text(SITE_TEMPLATE)
    spec = derive(job_dir, "test-none-tp2.yaml", **SAME_NODES)
    script = job_dir / "serve.sbatch"
    out = cli("render", str(spec), "--template", str(template), "-o", str(script))
    assert out.returncode == 0, out.stderr
    before = sockets([1, 2])
    sub = subprocess.run(["sbatch", "--parsable", str(script)], cwd=job_dir, capture_output=True,
                         text=True, check=True)
    job = sub.stdout.strip().split(";")[0]
    folder = Path(testbed["SLURM_VLLM_TEST_JOBS_ROOT"]) / f"test-none-tp2-{job}"
    try:
        deadline = time.monotonic() + 60
        while not (folder / "plan.json").exists():    # plain sbatch: the job is ours once init ran
            assert time.monotonic() < deadline, f"the job folder {folder} never appeared"
            time.sleep(0.5)
        wait_stage(job, ("READY",), 600)          # by job id: init indexed it on the node
        assert (folder / "job.sbatch").read_text() == script.read_text()
        comment = subprocess.run(["squeue", "-h", "-j", job, "-o", "%k"], capture_output=True, text=True)
        assert comment.stdout.strip() == "site-template"
        endpoint = json.loads(cli("endpoint", job, "--json").stdout)
        key = Path(endpoint["api_key_file"]).read_text().strip()
        assert key not in script.read_text()
        assert_vllm_workers_on(job)
        assert node_process_env(int(allocation(job)[0][-1]), "vllm serve")["SLURM_VLLM_SITE"] == "loaded"
        rows = surface(job, before, expected(testbed["SLURM_VLLM_TEST_MODEL"]))
        print("\n" + table("TP2 over node1+node2, backend ray:", rows))
        assert beyond_the_engine_broadcast(rows) == [], rows
    finally:
        if (folder / "plan.json").exists():
            cancel_and_check_clean(str(folder), nodes=3)
        else:
            subprocess.run(["scancel", job], check=False)


def test_mp_across_two_nodes_without_ray_and_what_a_stranger_reaches_of_it(testbed: dict[str, str],
                                                                            tmp_path: Path) -> None:
    """backend mp, TP2 over node1+node2 without a container (tests/test_serve_e2e.py runs it in
    Podman): vLLM's own launcher and no Ray (assert_mp_without_ray); what node3 reaches of it."""
    spec = derive(tmp_path, "test-none-tp2-mp.yaml", **SAME_NODES)
    before = sockets([1, 2])
    job = submit(spec, wait=True)
    try:
        assert_mp_without_ray(job["job_id"], Path(job["job_dir"]))
        rows = surface(job["job_id"], before, expected(testbed["SLURM_VLLM_TEST_MODEL"]))
        print("\n" + table("TP2 over node1+node2, backend mp:", rows))
        assert beyond_the_engine_broadcast(rows) == [], rows
    finally:
        idle = cancel_and_check_clean(job["job_id"], nodes=3)
        print(f"backend mp: nodes idle {idle:.1f} s after cancel")


def test_a_one_node_job_shows_a_stranger_its_door_alone_and_ends_at_its_time_limit(
        testbed: dict[str, str], tmp_path: Path) -> None:
    """A 1-node job with the default backend (auto: vLLM's own executor within one node, no Ray):
    nothing of the prompts leaves the node, and on the node's address only the front door, torch's
    store and srun listen (the README's table; what Ray would add — its servers bound to every
    interface whatever --node-ip-address says — shows in the 2-node Ray job above).

    Then a real time limit while serving: Slurm sends SIGUSR2 90 s before the limit
    (--signal=USR2@90), the rank stops cleanly and the stage says TIMEOUT, before Slurm has to kill
    anything (sacct: COMPLETED, before the limit). The job starts with room to load whatever the
    host's speed; the cluster's admin (the tests run as root) then cuts its limit so that the signal
    comes within Slurm's next 30 s check (end_soon)."""
    spec = derive(tmp_path, "test-none-tp2.yaml", "one-node", **{
        "slurm.nodes": 1, "parallelism.tensor": 1, "slurm.extra_directives": {"nodelist": "node1"}})
    before = sockets([1])
    job = submit(spec, wait=True)
    try:
        rows = surface(job["job_id"], before, expected(testbed["SLURM_VLLM_TEST_MODEL"]))
        print("\n" + table("TP1 on node1 (backend auto):", rows))
        assert not any(r["messages"] for r in rows), rows       # nothing of the prompts leaves the node
        reachable = {str(r["program"]) for r in rows if r["reachable"]}
        assert reachable <= {"python", "python3", "VLLM::EngineCor", "srun"}, reachable
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
    finally:
        subprocess.run(["scancel", job["job_id"]], check=False)
