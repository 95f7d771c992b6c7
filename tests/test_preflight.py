"""NCCL transport detection from real NCCL_DEBUG=INFO lines, and the preflight verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from slurm_vllm.core.errors import ClusterError
from slurm_vllm.core.preflight import table, transport, verdict

pytestmark = pytest.mark.unit

# Lines as NCCL prints them (from public NCCL issue reports).
IB_LOG = """\
nccl-test:179:179 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/IB [RO]; OOB eth0:10.0.0.1<0>
nccl-test:179:179 [0] NCCL INFO Using network IB
nccl-test:179:179 [0] NCCL INFO NCCL_IB_HCA set to mlx5_0,mlx5_1,mlx5_2,mlx5_3
nccl-test:179:179 [0] NCCL INFO Channel 00/0 : 0[0] -> 8[0] [send] via NET/IB/0/GDRDMA
"""
SOCKET_LOG = """\
ip-172-31-12-21:45361:45361 [0] NCCL INFO NET/IB : No device found.
ip-172-31-12-21:45361:45361 [0] NCCL INFO NET/Socket : Using [0]ens3:172.31.12.210<0>
ip-172-31-12-21:45361:45361 [0] NCCL INFO Using network Socket
ip-172-31-12-21:45361:45361 [0] NCCL INFO Channel 00 : 0[0] -> 1[0] [send] via NET/Socket/0
"""
# Bootstrap over sockets, data over IB: only the decisive lines count.
MIXED_CHANNELS_ONLY = """\
server3:15223:15223 [7] NCCL INFO NET/Socket : Using [0]enp41s0f1:<0> [1]virbr0:<0>
server3:15221:15221 [5] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB ; OOB enp41s0f1:<0>
server3:15221:15221 [5] NCCL INFO Channel 00/0 : 0[5] -> 1[5] [receive] via NET/IB/0
"""


def result(backend: str = "nccl", correct: bool = True) -> dict[str, Any]:
    return {"backend": backend, "world_size": 2, "rows": [
        {"bytes": 1 << 20, "ms": 0.5, "algbw_GBps": 2.0, "busbw_GBps": 2.0, "correct": correct}]}


@pytest.mark.parametrize(("log", "expected"), [
    (IB_LOG, "IB"), (SOCKET_LOG, "Socket"), (MIXED_CHANNELS_ONLY, "IB"), ("no nccl lines", None)])
def test_transport(log: str, expected: str | None) -> None:
    assert transport(log) == expected


def test_ib_requested_but_sockets_used_fails_with_a_hint() -> None:
    with pytest.raises(ClusterError, match=r"asks for InfiniBand but NCCL used NET/Socket.*/dev/infiniband"):
        verdict(result(), SOCKET_LOG, ib_requested=True)
    assert verdict(result(), IB_LOG, ib_requested=True).transport == "NET/IB"
    assert verdict(result(), SOCKET_LOG, ib_requested=False).transport == "NET/Socket"


def test_wrong_sums_fail_and_gloo_is_reported() -> None:
    with pytest.raises(ClusterError, match="wrong sums"):
        verdict(result(correct=False), IB_LOG, ib_requested=False)
    checked = verdict(result("gloo"), "", ib_requested=False)
    assert checked.transport.startswith("gloo over TCP")
    assert "busbw GB/s" in table(checked) and "1 MiB" in table(checked)


def test_ray_report_reads_the_nodes_and_the_times_after_the_start(tmp_path: Path) -> None:
    from slurm_vllm.core.jobdir import JobDir
    from slurm_vllm.core.preflight import ray_report
    from slurm_vllm.core.records import RayNode, RayNodes

    jd = JobDir(tmp_path / "job")
    jd.create("name: x\n", "{}", api_key=False)
    jd.write(jd.ray_nodes, RayNodes((RayNode("10.78.0.11", 1.0), RayNode("10.78.0.12", 1.0))))
    with open(jd.stage_log, "a") as f:
        f.write("100.000 STARTING 2 nodes\n102.500 RAY_HEAD 10.78.0.11:20064\n104.000 RAY_JOINED 1/2\n"
                "110.250 RAY_JOINED 2/2\n111.000 DONE Ray: 2 nodes\n")
    report = ray_report(jd, "42")
    nodes = [{"ip": "10.78.0.11", "gpus": 1.0}, {"ip": "10.78.0.12", "gpus": 1.0}]
    assert report == {"job_id": "42", "nodes": nodes, "ray_head_s": 2.5, "all_joined_s": 10.25}
