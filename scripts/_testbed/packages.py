"""Debian packages the test bed needs: installed when missing, with no service started by apt."""

from __future__ import annotations

import os
from pathlib import Path

from .procs import run

PACKAGES = (
    "slurmctld", "slurmd", "slurm-client", "slurmdbd", "munge", "mariadb-server", "mariadb-client",
    "docker.io", "runc", "podman", "catatonit", "tini", "iproute2", "util-linux", "procps",
    "debootstrap", "patchelf",
    # Pyxis and enroot (scripts/_testbed/pyxis.py): their build and what enroot runs
    "libslurm-dev", "slurm-wlm-plugins-dev", "gcc", "make", "libc6-dev", "libbsd-dev", "makeself",
    "squashfs-tools", "squashfuse", "fuse-overlayfs", "jq", "parallel", "zstd", "pigz", "libcap2-bin",
)
POLICY = Path("/usr/sbin/policy-rc.d")


def missing() -> list[str]:
    out = run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n", *PACKAGES], check=False).stdout
    installed = {line.split()[0] for line in out.splitlines() if line.endswith(" installed")}
    return [p for p in PACKAGES if p not in installed]


def ensure() -> None:
    todo = missing()
    if not todo:
        return
    print(f"testbed: installing {' '.join(todo)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Keep apt from starting munge, MariaDB, docker… as system services: the test bed starts its own.
    had_policy = POLICY.exists()
    if not had_policy:
        POLICY.write_text("#!/bin/sh\nexit 101\n")
        POLICY.chmod(0o755)
    try:
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *todo], env=env)
    finally:
        if not had_policy:
            POLICY.unlink(missing_ok=True)
