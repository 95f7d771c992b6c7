"""Container engines per node: a dockerd inside each node's namespaces, podman configured per node."""

from __future__ import annotations

import shutil
from pathlib import Path

from . import procs
from .config import IMAGE, IMAGE_VAR, ROOTFS_TAR, node_cache, node_dir, node_name
from .procs import run
from .slurm import in_node
from .testenv import rootfs_digest

HOST_CONTAINERS = Path("/etc/containers")


def _containers_conf() -> str:
    init = shutil.which("catatonit") or "/usr/libexec/podman/catatonit"
    return f"""# podman settings for this test-bed node (no systemd, cgroup v1, root)
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
init_path = "{init}"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
"""


def write_podman_conf(i: int) -> None:
    """The node's /etc/containers (bind-mounted there by the node's mount namespace)."""
    etc = node_dir(i) / "etc-containers"
    etc.mkdir(parents=True, exist_ok=True)
    for name in ("policy.json", "registries.conf"):
        if (HOST_CONTAINERS / name).exists():
            shutil.copy2(HOST_CONTAINERS / name, etc / name)
    (etc / "containers.conf").write_text(_containers_conf())
    graphroot = node_cache(i) / "containers"
    graphroot.mkdir(parents=True, exist_ok=True)
    (etc / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\nrunroot = "/run/containers/storage"\ngraphroot = "{graphroot}"\n'
    )


def start_dockerd(i: int) -> None:
    data = node_cache(i) / "docker"
    data.mkdir(parents=True, exist_ok=True)
    procs.spawn(f"dockerd-{node_name(i)}", in_node(i, [
        "dockerd", f"--data-root={data}", "--exec-root=/run/docker", "--pidfile=/run/docker.pid",
        "-H", "unix:///run/docker.sock", "--iptables=false", "--ip6tables=false", "--ip-forward=false",
        "--ip-masq=false", "--bridge=none", "--userland-proxy=false", "--storage-driver=overlay2",
        "--exec-opt", "native.cgroupdriver=cgroupfs", f"--cgroup-parent=/svt-{node_name(i)}",
        "--log-level=warn",
    ]))


def docker_ready(i: int) -> bool:
    probe = run(in_node(i, ["docker", "version", "--format", "{{.Server.Version}}"]), check=False)
    return probe.returncode == 0


def wait_dockerd(i: int) -> None:
    name = f"dockerd-{node_name(i)}"
    procs.wait_for(f"{name} to answer", lambda: docker_ready(i), 60, dead=lambda: procs.pid_of(name) is None)


def import_images(i: int) -> None:
    """Import the test image into the node's docker and podman unless that very rootfs is there."""
    # With a default command (enroot's dockerd:// import needs one) and a variable of the image's own
    # (a test's env sets it too: the spec's value must win inside the container).
    digest = rootfs_digest() + "-cmd-env"
    label = "{{ index .Config.Labels \"slurm-vllm-rootfs\" }}"
    for engine in ("docker", "podman"):
        have = run(in_node(i, [engine, "image", "inspect", "--format", label, IMAGE]), check=False)
        if have.returncode != 0 or have.stdout.strip() != digest:
            run(in_node(i, [engine, "import", "--change", f"LABEL slurm-vllm-rootfs={digest}",
                            "--change", 'CMD ["/bin/sh"]', "--change", f"ENV {IMAGE_VAR}=from-the-image",
                            str(ROOTFS_TAR), IMAGE]))
