"""The test bed is a real multi-node Slurm cluster: distinct nodes, accounting, per-node containers."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from .support.slurm import sacct_state, sbatch_wait
from .support.testbed import TESTBED

pytestmark = pytest.mark.slurm


def test_three_node_job_has_distinct_hostnames_and_ips(job_dir: Path) -> None:
    script = job_dir / "hosts.sbatch"
    script.write_text(
        "#!/bin/bash\n#SBATCH --nodes=3 --ntasks-per-node=1 --gpus-per-node=2 --output=out-%j.txt\n"
        "srun bash -c 'echo \"$SLURM_PROCID $(hostname) $(hostname -I | cut -d\" \" -f1) "
        "$CUDA_VISIBLE_DEVICES\"'\n"
    )
    job = sbatch_wait(script, timeout=60)
    rows = [line.split() for line in (job_dir / f"out-{job}.txt").read_text().splitlines()]
    assert len(rows) == 3, rows
    assert len({r[1] for r in rows}) == 3, f"hostnames not distinct: {rows}"
    assert len({r[2] for r in rows}) == 3, f"IPs not distinct: {rows}"
    assert {r[1] for r in rows} == {"node1", "node2", "node3"}
    assert all(r[3] == "0,1" for r in rows), f"2 fake GPUs per node expected: {rows}"
    assert sacct_state(job) == "COMPLETED"


@pytest.mark.parametrize("engine", ["docker", "podman"])
def test_container_started_from_node2_sees_node2_ip(
    job_dir: Path, testbed: dict[str, str], engine: str
) -> None:
    script = job_dir / f"{engine}.sbatch"
    script.write_text(
        f"#!/bin/bash\n#SBATCH --nodes=1 --nodelist=node2 --output=out-%j.txt\nset -e\n"
        f"hostname -I\n"
        f"{engine} run --rm --pull never --network host {testbed['SLURM_VLLM_TEST_IMAGE']} hostname -I\n"
    )
    job = sbatch_wait(script, timeout=60)
    outside, inside = (job_dir / f"out-{job}.txt").read_text().split("\n")[:2]
    assert inside.split()[0] == "10.77.0.12", f"the {engine} container saw {inside!r}"
    assert inside.split() == outside.split()
    assert sacct_state(job) == "COMPLETED"


def _our_processes() -> list[str]:
    """Processes whose command line names the test bed's state or cache folders, or its daemons."""
    ours = re.compile(
        r"slurm-vllm-testbed|slurmctld|slurmd|slurmdbd|munged|mariadbd|dockerd|raylet|gcs_server"
    )
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if ours.search(cmd) and "pytest" not in cmd:
                found.append(f"{entry.name} {cmd[:120]}")
    return found


def test_down_leaves_nothing_then_up_restores(testbed: dict[str, str]) -> None:
    hosts_before = Path("/etc/hosts").read_text()
    subprocess.run([str(TESTBED), "down"], check=True, capture_output=True)
    try:
        status = subprocess.run([str(TESTBED), "status"], capture_output=True, text=True)
        assert status.returncode != 0 and "not up" in status.stdout
        assert _our_processes() == []
        netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
        assert not [n for n in netns if n.startswith("svt-")]
        assert "slurm_vllm testbed" not in Path("/etc/hosts").read_text()
        assert not Path("/etc/slurm/slurm.conf").exists()
        assert not Path("/sys/class/net/svtbr0").exists()
    finally:
        subprocess.run([str(TESTBED), "up", "--nodes", testbed["SLURM_VLLM_TESTBED_NODES"],
                        "--gpus-per-node", testbed["SLURM_VLLM_TESTBED_GPUS_PER_NODE"]],
                       check=True, capture_output=True)
    assert Path("/etc/hosts").read_text() == hosts_before
    assert subprocess.run([str(TESTBED), "status"], capture_output=True).returncode == 0
