"""Claims on this node's port blocks, so that two jobs starting together never pick the same block.

Probing a port (bind, close) says it is free now, not that it stays free until Ray binds it: two
jobs that probe at the same moment could both choose it. A rank therefore claims the block it
chooses with a file created atomically (O_EXCL) in /dev/shm/slurm_vllm-ports (node-local, emptied
at boot, shared by every user: mode 1777), holding the job id and the rank's pid. A claim whose
process is gone is stale and taken over; the rank removes its claim at teardown.
"""

from __future__ import annotations

import os
from pathlib import Path

CLAIMS = Path("/dev/shm/slurm_vllm-ports")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True               # another user's live process
    return True


class PortClaims:
    """This rank's claim (at most one block at a time) in FOLDER."""

    def __init__(self, job_id: int, folder: Path = CLAIMS) -> None:
        self.job_id = job_id
        self.folder = folder
        self.held: Path | None = None

    def claim(self, first_port: int) -> bool:
        """Claim the block starting at FIRST_PORT; False if another live job holds it."""
        self.folder.mkdir(mode=0o1777, parents=True, exist_ok=True)
        if self.folder.stat().st_mode & 0o1777 != 0o1777 and self.folder.stat().st_uid == os.geteuid():
            self.folder.chmod(0o1777)
        path = self.folder / f"block-{first_port}"
        mine = f"{self.job_id} {os.getpid()}\n"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    job, pid = path.read_text().split()
                except (OSError, ValueError):
                    return False      # being written, or unreadable: not ours
                if int(job) == self.job_id:
                    break             # another rank of this job on a node that shares /dev/shm
                if _alive(int(pid)):
                    return False
                try:
                    path.unlink()     # stale: its rank is gone; try once more
                except OSError:
                    return False
                continue
            with os.fdopen(fd, "w") as f:
                f.write(mine)
            break
        else:
            return False
        self.release()
        self.held = path
        return True

    def release(self) -> None:
        """Remove this rank's claim, if it holds one it wrote."""
        if self.held is not None:
            try:
                if self.held.read_text().split()[1] == str(os.getpid()):
                    self.held.unlink()
            except (OSError, IndexError):
                pass
            self.held = None
