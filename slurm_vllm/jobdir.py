"""The job folder on the shared file system: layout, atomic writes, 0600 secrets, the stage."""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SlurmVllmError

# A job's stages, in order: PENDING, STARTING, PREFLIGHT (if asked), RAY_HEAD, RAY_JOINED k/N,
# LOADING, READY; then one of the final ones.
FINAL = ("DONE", "FAILED", "CANCELLED", "TIMEOUT")


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write TEXT to PATH so that readers see the old or the new file, never a partial one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Stage:
    stage: str
    detail: str = ""
    time: float = 0.0

    def __str__(self) -> str:
        return f"{self.stage}{': ' + self.detail if self.detail else ''}"


@dataclass(frozen=True)
class JobDir:
    """Paths of one job's folder; every rank and the CLI agree on them."""

    path: Path

    spec = property(lambda self: self.path / "spec.yaml")
    plan = property(lambda self: self.path / "plan.json")
    sbatch = property(lambda self: self.path / "job.sbatch")
    job_id_file = property(lambda self: self.path / "job_id")
    stage_file = property(lambda self: self.path / "stage")
    stage_log = property(lambda self: self.path / "stage.log")
    head = property(lambda self: self.path / "head.json")
    endpoint = property(lambda self: self.path / "endpoint.json")
    api_key = property(lambda self: self.path / "api_key")
    ray_token = property(lambda self: self.path / "ray_token")
    env_dir = property(lambda self: self.path / "env")
    logs = property(lambda self: self.path / "logs")
    submitit = property(lambda self: self.path / "submitit")
    done = property(lambda self: self.path / "done")
    preflight = property(lambda self: self.path / "preflight.json")
    preflight_addr = property(lambda self: self.path / "preflight-addr.json")

    def rank_log(self, role: str, rank: int) -> Path:
        return self.path / "logs" / f"{role}-{rank}.log"

    def create(self, spec_yaml: str, plan_json: str, api_key: bool) -> None:
        """Make the folder with the resolved spec, the plan and fresh per-job secrets (0600)."""
        self.path.mkdir(parents=True, exist_ok=False)
        for sub in (self.env_dir, self.logs, self.submitit):
            sub.mkdir(mode=0o700)
        atomic_write(self.spec, spec_yaml)
        atomic_write(self.plan, plan_json)
        write_secret(self.ray_token, secrets.token_hex(32))
        if api_key:
            write_secret(self.api_key, "sk-" + secrets.token_urlsafe(32))
        self.write_stage("PENDING")

    def write_json(self, path: Path, data: Any) -> None:
        atomic_write(path, json.dumps(data, indent=1) + "\n")

    def read_json(self, path: Path) -> Any:
        return json.loads(path.read_text())

    def write_stage(self, stage: str, detail: str = "") -> None:
        now = time.time()
        self.write_json(self.stage_file, {"stage": stage, "detail": detail, "time": now})
        with open(self.stage_log, "a") as log:
            log.write(f"{now:.3f} {stage}{' ' + detail if detail else ''}\n")

    def read_stage(self) -> Stage:
        try:
            data = self.read_json(self.stage_file)
        except (OSError, ValueError):
            return Stage("PENDING")
        return Stage(data["stage"], data.get("detail", ""), data.get("time", 0.0))

    def job_id(self) -> str | None:
        try:
            return self.job_id_file.read_text().strip() or None
        except OSError:
            return None


def write_secret(path: Path, value: str) -> None:
    """A secret file: created 0600, never world- or group-readable, even for an instant."""
    atomic_write(path, value + "\n", mode=0o600)


def read_secret(path: Path) -> str:
    return path.read_text().strip()


def find(job: str, jobs_root: Path) -> JobDir:
    """JOB is a job folder, or a Slurm job id looked up in JOBS_ROOT/by-id."""
    candidate = Path(job).expanduser()
    if candidate.is_dir() and (candidate / "plan.json").exists():
        return JobDir(candidate.resolve())
    if job.isdigit():
        link = jobs_root / "by-id" / job
        if link.exists():
            return JobDir(link.resolve())
        raise SlurmVllmError(f"job {job}: no job folder in {jobs_root}/by-id "
                             f"(give the job folder instead, or --jobs-root)")
    raise SlurmVllmError(f"{job}: neither a job folder (with plan.json) nor a Slurm job id")


def link_job_id(jobs_root: Path, job_id: str, folder: Path) -> None:
    by_id = jobs_root / "by-id"
    by_id.mkdir(parents=True, exist_ok=True)
    tmp = by_id / f".{job_id}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(folder)
    os.replace(tmp, by_id / job_id)
