"""Paths, names and addresses of the test bed, in one place."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]          # the project checkout
STATE = Path(os.environ.get("SLURM_VLLM_TESTBED_STATE", "/var/lib/slurm-vllm-testbed"))
CACHE = Path(os.environ.get("SLURM_VLLM_TESTBED_CACHE", "/var/cache/slurm-vllm-testbed"))

CLUSTER_NAME = "testbed"
PARTITION = "debug"
# Two networks, like Ethernet next to a high-speed fabric: every node has eth0 on the first
# (default route, Slurm traffic) and eth1 on the second.
NETWORKS = (("svtbr0", "10.77.0"), ("svtbr1", "10.78.0"))
NODE_IFNAMES = ("eth0", "eth1")
NETNS_PREFIX = "svt-"
HOSTS_BEGIN = "# BEGIN slurm_vllm testbed"
HOSTS_END = "# END slurm_vllm testbed"
MANAGED_MARK = "# managed by slurm_vllm scripts/testbed; removed by 'scripts/testbed down'"
MYSQL_PORT = 3307
SLURMDBD_PORT = 6819

VENV = CACHE / "venv"
MODEL = CACHE / "model" / "tiny-llama"
COMPILE_CACHE = CACHE / "compile-cache"
ROOTFS_TAR = CACHE / "image" / "rootfs.tar"
IMAGE = "localhost/slurm-vllm-test:latest"
IMAGE_VAR = "SLURM_VLLM_IMAGE_SET"          # set by the image (ENV), and by the test configs' env
APPTAINER = CACHE / "apptainer"                      # real Apptainer, unpacked (see testenv.py)
NODE_BIN = CACHE / "node-bin"       # the nodes' /usr/local/sbin (on root's PATH): apptainer, enroot
APPTAINER_IMAGE = CACHE / "image" / "sandbox"          # the test image as an Apptainer sandbox folder
JOBS_ROOT = STATE / "jobs"            # shared by every node, like a cluster's home/scratch
TEST_SECRET = STATE / "test-secret"   # the secret_env value of the container test configs (0600)


def node_name(i: int) -> str:
    return f"node{i}"


def node_ip(i: int, net: int = 0) -> str:
    return f"{NETWORKS[net][1]}.{10 + i}"


def host_ip(net: int = 0) -> str:
    return f"{NETWORKS[net][1]}.1"


def netns(i: int) -> str:
    return f"{NETNS_PREFIX}{node_name(i)}"


def node_dir(i: int) -> Path:
    """Per-node runtime state (wiped by down)."""
    return STATE / "nodes" / node_name(i)


def node_cache(i: int) -> Path:
    """Per-node engine storage (images survive down/up)."""
    return CACHE / "nodes" / node_name(i)


@dataclass(frozen=True)
class Shape:
    """What `up` was asked for; recorded so that a second `up` can tell if it is a no-op."""

    nodes: int
    gpus_per_node: int
    cpus_per_node: int

    def save(self) -> None:
        (STATE / "shape.json").write_text(json.dumps(asdict(self)))

    @staticmethod
    def load() -> Shape | None:
        try:
            return Shape(**json.loads((STATE / "shape.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None
