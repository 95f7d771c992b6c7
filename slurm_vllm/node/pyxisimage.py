"""The squashfs file a Pyxis rank starts from: the spec's own, or a registry image imported once by rank 0.

A registry image (`nvcr.io#nvidia/vllm:…`, `docker://…`, `dockerd://…`) is imported by rank 0 alone,
with `enroot import`, into the job folder (image.sqsh, on the shared file system); the workers start
only after the head published its address, so the file is there for them: N nodes never pull the
image at once. The file stays for a requeued run of the same job and is removed at the job's end.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from slurm_vllm.core import proc, pyxis
from slurm_vllm.core.errors import ClusterError

if TYPE_CHECKING:
    from slurm_vllm.node.rank import Rank

POLL = 0.5


def imported_path(rank: Rank) -> Path:
    return rank.jd.own / pyxis.IMPORTED          # a replica's own (each replica's first node imports)


def prepare(rank: Rank) -> str:
    """The squashfs file this rank's containers start from; ClusterError naming the image when it
    cannot be had (a missing file fails here, before any step starts)."""
    image = rank.spec.container.image or ""
    host = socket.gethostname()
    if pyxis.is_file(image):
        path = Path(image).expanduser()
        if not path.is_file() or not os.access(path, os.R_OK):
            raise ClusterError(f"container.image: {image}: no such readable squashfs file on {host}")
        return str(path)
    target = imported_path(rank)
    if target.is_file():                      # imported by rank 0 (or by this job's earlier run)
        return str(target)
    if rank.rank != 0:
        raise ClusterError(f"container.image: {image}: rank 0 did not import it to {target}")
    if shutil.which("enroot") is None:
        raise ClusterError(f"container.image: {image}: importing it needs enroot, not found on {host} "
                           f"(Pyxis nodes have it; or give the path of a .sqsh file made with enroot import)")
    part = target.with_name(target.name + ".part")
    part.unlink(missing_ok=True)              # a killed run's
    child = proc.spawn("enroot-import", pyxis.import_argv(image, str(part)),
                       rank.jd.rank_log("enroot-import", rank.rank), env=None)
    rank.watchdog.watch(child.popen.pid)
    try:
        rank.wait_for(f"enroot to import {image}", lambda: not child.alive(), rank.plan.ready_timeout)
    finally:
        if child.alive():
            proc.terminate_all([child], timeout=5)
            part.unlink(missing_ok=True)
    if child.returncode() != 0 or not part.is_file():
        part.unlink(missing_ok=True)
        raise ClusterError(f"container.image: {image}: enroot import failed on {host} "
                           f"(code {child.returncode()}): {child.tail(4)}")
    part.rename(target)
    return str(target)


def discard(rank: Rank) -> None:
    """Rank 0 at its end: remove the imported image unless the job goes on in a requeued run."""
    if rank.rank == 0 and not rank.jd.requeue_mark.exists():
        imported_path(rank).unlink(missing_ok=True)
