"""jobs_root, the folder of job folders (often shared scratch): its checks, and the by-id links."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from slurm_vllm.core.errors import JobFolderError, SlurmVllmError, SpecError
from slurm_vllm.core.jobdir import JobDir, is_job_id, make_private_dir, verify


def folder_problem(path: Path) -> str | None:
    """Why PATH cannot hold this user's files safely (it is missing, not a folder, or others can
    rename or remove its entries: writable by them without the sticky bit), or None. A shared folder
    with the sticky bit (1777, as /tmp) is fine: there only an entry's owner may move it."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a folder"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return (f"{path} is writable by group or others without the sticky bit (mode "
                f"{stat.S_IMODE(st.st_mode):o}): others could replace your files there")
    return None


def prepare_jobs_root(root: Path) -> None:
    """Make ROOT (0700) if missing; refuse one that others could rearrange (folder_problem): there
    anyone could move your folders away and put their own in place between a check and a use."""
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise SpecError(f"jobs_root: cannot create {root}: {exc.strerror}") from None
    problem = folder_problem(root)
    if problem:
        raise SpecError(f"jobs_root: {problem}; use a folder of your own in it, or ask for chmod +t")


def find(job: str, jobs_root: Path) -> JobDir:
    """JOB is a job folder, or a Slurm job id looked up in JOBS_ROOT/by-id; either way verified:
    the folder, the by-id folder and the link are this user's and not writable by others."""
    candidate = Path(job).expanduser()
    if candidate.is_dir() and (candidate / "plan.json").exists():
        return JobDir(candidate.resolve()).verified()
    if is_job_id(job):
        by_id = jobs_root / "by-id"
        link = by_id / job
        if link.is_symlink():
            if by_id.is_symlink():
                raise JobFolderError(f"{by_id}: a link, not a folder: refused")
            verify(by_id, "by-id folder")
            verify(link, "by-id link")
            return JobDir(link.resolve()).verified()
        raise SlurmVllmError(f"job {job}: no job folder in {jobs_root}/by-id "
                             f"(give the job folder instead, or --jobs-root)")
    raise SlurmVllmError(f"{job}: neither a job folder (with plan.json) nor a Slurm job id")


def link_job_id(jobs_root: Path, job_id: str, folder: Path) -> None:
    """JOBS_ROOT/by-id/JOB_ID → FOLDER, replaced atomically; by-id is a 0700 folder of this user's."""
    by_id = jobs_root / "by-id"
    make_private_dir(by_id)
    tmp = by_id / f".{job_id}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(folder)
    os.replace(tmp, by_id / job_id)
