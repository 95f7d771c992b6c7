"""Which ranks of a torch.distributed group share one /dev/shm (torch only: no vLLM import)."""

from __future__ import annotations

import os
import socket

import torch


def shm_identity() -> str:
    """Names the /dev/shm this process sees: the kernel's boot id and the file system's device.

    Two processes share shared memory exactly when both agree: other machines have other boot
    ids, and on one machine (test-bed nodes are namespaces of one kernel) each private /dev/shm is
    its own mount. Containers started with --ipc host see the host's.
    """
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    return f"{boot}:{os.stat('/dev/shm').st_dev}"


def group_shares_shm(group: torch.distributed.ProcessGroup, size: int, name: str) -> tuple[bool, list[str]]:
    """One all-gather over GROUP: do all SIZE ranks agree on NAME and see one /dev/shm?

    Returns the answer and every rank's host name (in rank order), for the log line.
    """
    mine = (name, shm_identity(), socket.gethostname())
    gathered: list[tuple[str, str, str] | None] = [None] * size
    torch.distributed.all_gather_object(gathered, mine, group=group)
    rows = [g for g in gathered if g is not None]
    same = len(rows) == size and len({r[0] for r in rows}) == 1 and len({r[1] for r in rows}) == 1
    return same, [r[2] for r in rows]
