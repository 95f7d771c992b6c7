"""e2e on the test bed: Pyxis/enroot built from their release sources, loaded by every slurmd."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .support.cli import chat, cli, expected, status, submit
from .support.failures import wait_final, wait_released
from .support.specs import derive
from .support.testbed import enroot_containers, env_delivery_problems, in_node, node_process_env
from .test_batch_e2e import chat as chat_request
from .test_batch_e2e import results
from .test_network_e2e import key_exposure
from .test_serve_e2e import (
    allocation,
    assert_vllm_workers_on,
    cancel_and_check_clean,
    job_secrets,
    submit_wait,
)

pytestmark = pytest.mark.e2e


def steps(job: str) -> dict[str, str]:
    """{step name: node} of JOB's running steps (Slurm's view)."""
    out = subprocess.run(["squeue", "-h", "-s", "-j", job, "-o", "%j %N"], capture_output=True, text=True,
                         check=True).stdout
    return dict(line.split() for line in out.splitlines())


def test_pyxis_serves_tp2_across_two_nodes_in_srun_steps(testbed: dict[str, str]) -> None:
    """TP2 over 2 nodes, each rank's Ray and vLLM in a Pyxis container on an srun step of the job:
    the answer through the OpenAI client, a vLLM worker on each node, the spec's env over the image's,
    no secret on any command line, and after cancel no process and no enroot container on any node."""
    job, job_dir = submit_wait("test-pyxis-tp2.yaml")        # job.sbatch == render (Pyxis's lines)
    try:
        image = testbed["SLURM_VLLM_TEST_PYXIS_IMAGE"]
        assert f"--container-image={image}" in (job_dir / "job.sbatch").read_text()
        endpoint = json.loads(cli("endpoint", job, "--json").stdout)
        key = Path(endpoint["api_key_file"]).read_text().strip()
        assert chat(endpoint, key) == expected(testbed["SLURM_VLLM_TEST_MODEL"])
        assert_vllm_workers_on(job)                      # one tensor-parallel rank on each node
        nodes = allocation(job)
        # Slurm runs each rank's containers as steps of the job, on the rank's own node
        assert {steps(job).get(f"slurm-vllm-{job}-{r}") for r in (0, 1)} == set(nodes), steps(job)
        for r, node in enumerate(nodes):
            assert enroot_containers(int(node[-1])) == [f"pyxis_slurm-vllm-{job}-{r}"]
            env = node_process_env(int(node[-1]), "ray::RayWorker")
            assert env["SLURM_VLLM_IMAGE_SET"] == "from the spec", env.get("SLURM_VLLM_IMAGE_SET")
        assert env_delivery_problems(nodes, "pyxis", job_secrets(job_dir)) == []
        on_command_lines = [line for secret in job_secrets(job_dir)
                            for line in key_exposure(secret, 3, allowed=set()) if "command line" in line]
        assert on_command_lines == []               # srun's and enroot's argv included
    finally:
        cancel_and_check_clean(job)


def test_a_pyxis_batch_from_a_registry_image_imports_it_once_and_ends_done(testbed: dict[str, str],
                                                                          job_dir: Path) -> None:
    """A registry image (here the node's dockerd) is imported by rank 0 alone into the job folder;
    both nodes start from that file; the batch ends DONE with a line per request, and the imported
    file and every container are gone at the end."""
    requests = [chat_request(i) for i in range(60)]
    (job_dir / "input.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    spec = derive(job_dir, "test-pyxis-tp2.yaml", "pyxis-batch", mode="batch",
                  **{"container.image": f"dockerd://{testbed['SLURM_VLLM_TEST_IMAGE']}",
                     "batch.input": str(job_dir / "input.jsonl"),
                     "batch.output": str(job_dir / "results.jsonl")})
    rendered = cli("render", str(spec)).stdout
    assert "enroot import --output" in rendered and "dockerd://" in rendered, rendered
    job = submit(spec, wait=True)
    st = status(job["job_id"])
    assert st["stage"] == "DONE", st
    ids = [line["custom_id"] for line in results(job_dir)]
    assert sorted(ids) == sorted(r["custom_id"] for r in requests)
    folder = Path(job["job_dir"])
    logs = {p.name for p in (folder / "logs").iterdir()}
    assert "enroot-import-0.log" in logs and not any(n.startswith("enroot-import-1") for n in logs), logs
    assert not (folder / "image.sqsh").exists()
    wait_released(job["job_id"])            # no process and no enroot container left on any node


def test_a_wrong_pyxis_image_fails_within_seconds_naming_it(testbed: dict[str, str], tmp_path: Path) -> None:
    missing = "/var/lib/slurm-vllm-testbed/no-such-image.sqsh"
    spec = derive(tmp_path, "test-pyxis-tp2.yaml", "pyxis-wrong-image", **{"container.image": missing})
    job = submit(spec)
    st, took = wait_final(job["job_id"], 60)
    assert st["stage"] == "FAILED" and missing in st["detail"], st
    assert took < 30, f"{took:.0f} s from submit to FAILED"
    wait_released(job["job_id"])
    for i in (1, 2, 3):
        assert subprocess.run(in_node(i, ["enroot", "list"]), capture_output=True, text=True).stdout == ""
