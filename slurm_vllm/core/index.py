"""This user's index of Slurm job ids → job folders, so a job id works whatever jobs_root the spec used.

`~/.slurm_vllm/index/<job id>.json` (or under $SLURM_VLLM_INDEX) is an IndexEntry: the job folder,
which exists once the job starts, and the job's plan, so that `list` can show a pending job. It is
written by `submit` on the login node and by the `init` step of a rendered script. Job ids are unique
per cluster; after a cluster's ids restart, the newest job wins.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from slurm_vllm.core.errors import JobFolderError
from slurm_vllm.core.jobdir import atomic_write, is_job_id
from slurm_vllm.core.plan import Plan
from slurm_vllm.core.records import Record


@dataclass(frozen=True)
class IndexEntry(Record):
    """`<index>/<job id>.json`: where a job's folder is (or will be, while it is pending), and its plan."""

    KIND: ClassVar[str] = "index_entry"
    job_id: str
    job_dir: str
    plan: Plan
    submitted: float


def root() -> Path:
    return Path(os.path.expandvars(os.environ.get("SLURM_VLLM_INDEX") or "~/.slurm_vllm/index")).expanduser()


def record(job_id: str, folder: Path, plan: Plan) -> None:
    """Index JOB_ID → FOLDER, atomically. The job runs either way: a failure is a warning (the
    folder path still works everywhere, the id only through --jobs-root)."""
    base = root()
    entry = IndexEntry(job_id, str(folder.resolve()), plan, time.time())
    try:
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(base / f"{job_id}.json", entry.to_json(), mode=0o600)
    except OSError as exc:
        warnings.warn(f"cannot index job {job_id} in {base}: {exc.strerror}", stacklevel=2)


def _read(path: Path) -> IndexEntry | None:
    """The entry at PATH when it is one: a job id as Slurm writes them, named by its own file (an
    entry naming another job would make `cancel` hit that one); else None (skipped)."""
    try:
        entry = IndexEntry.read(path)
    except (FileNotFoundError, JobFolderError):
        return None
    if not is_job_id(entry.job_id) or path.name != f"{entry.job_id}.json":
        return None
    return entry


def lookup(job_id: str) -> IndexEntry | None:
    if not is_job_id(job_id):
        return None
    return _read(root() / f"{job_id}.json")


def entries() -> list[IndexEntry]:
    """Every valid entry (a foreign, broken or misnamed file is skipped)."""
    base = root()
    found = (_read(path) for path in sorted(base.glob("*.json"))) if base.is_dir() else iter(())
    return [entry for entry in found if entry is not None]


def forget(job_id: str) -> None:
    """Drop JOB_ID's entry (only a job id: never a path that leads elsewhere)."""
    if is_job_id(job_id):
        (root() / f"{job_id}.json").unlink(missing_ok=True)
