"""The job folder on the shared file system: its layout, atomic typed writes, 0600 secrets, the stage."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from slurm_vllm.core import safefile
from slurm_vllm.core.errors import JobFolderError, SlurmVllmError
from slurm_vllm.core.records import Record, Stage, StageInfo
from slurm_vllm.core.safefile import owner_name

if TYPE_CHECKING:
    from slurm_vllm.core.spec import JobSpec

R = TypeVar("R", bound=Record)


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write TEXT to PATH so that readers see the old or the new file, never a partial one. The
    temporary file has an unpredictable name and is created new (O_EXCL, no link followed): in a
    shared folder (a batch output's) a name planted in advance cannot redirect the write."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def verify(path: Path, kind: str = "job folder") -> None:
    """PATH (not followed if a link) is this user's, and neither group nor others can write it:
    else JobFolderError. In a shared jobs_root, anything else may have been planted."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise JobFolderError(f"{path}: no such {kind}") from None
    if st.st_uid != os.geteuid():
        raise JobFolderError(f"{path}: this {kind} belongs to {owner_name(st.st_uid)}, not to you: refused")
    if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022:
        raise JobFolderError(f"{path}: this {kind} is writable by group or others (mode "
                             f"{stat.S_IMODE(st.st_mode):o}): refused (chmod go-w it if it is yours)")


def make_private_dir(path: Path) -> None:
    """PATH as a 0700 folder (whatever the umask), or an existing one that verify() accepts."""
    try:
        path.mkdir(mode=0o700)
        path.chmod(0o700)
    except FileExistsError:
        if path.is_symlink() or not path.is_dir():
            raise JobFolderError(f"{path}: not a folder (a link or a file is refused)") from None
        verify(path, "folder")


@dataclass(frozen=True)
class JobDir:
    """Paths of one job's folder, and its typed files; every rank and the login node agree on them."""

    path: Path

    @property
    def own(self) -> Path:
        """The folder of this server's own files (the job folder; a replica's: replicadir.py)."""
        return self.path

    @property
    def spec(self) -> Path:
        return self.path / "spec.yaml"

    @property
    def plan(self) -> Path:
        return self.path / "plan.json"

    @property
    def sbatch(self) -> Path:
        return self.path / "job.sbatch"

    @property
    def job_id_file(self) -> Path:
        return self.path / "job_id"

    @property
    def stage_file(self) -> Path:
        return self.path / "stage"

    @property
    def stage_log(self) -> Path:
        return self.path / "stage.log"

    @property
    def head(self) -> Path:
        return self.path / "head.json"

    @property
    def endpoint(self) -> Path:
        return self.path / "endpoint.json"

    @property
    def api_key(self) -> Path:
        return self.path / "api_key"

    @property
    def router_key(self) -> Path:
        """The key the replicas' router checks when the job has no API key (vllm.api_key: none)."""
        return self.path / "router_key"

    @property
    def ray_token(self) -> Path:
        return self.path / "ray_token"

    @property
    def env_dir(self) -> Path:
        return self.path / "env"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def done(self) -> Path:
        return self.path / "done"

    @property
    def ray_nodes(self) -> Path:
        return self.path / "ray_nodes.json"

    @property
    def preflight(self) -> Path:
        return self.path / "preflight.json"

    @property
    def batch(self) -> Path:
        return self.path / "batch.json"

    @property
    def results(self) -> Path:
        """results.jsonl: a batch job's output, or a link to it when batch.output is elsewhere."""
        return self.path / "results.jsonl"

    @property
    def batch_log(self) -> Path:
        """The batch step's own output, beside the folder in jobs_root (`<name>-<id>.out`: the
        `#SBATCH --output` pattern render.batch_log gives Slurm)."""
        return self.path.parent / f"{self.path.name}.out"

    @property
    def requeue_mark(self) -> Path:
        return self.path / "requeue"

    @property
    def preflight_addr(self) -> Path:
        return self.path / "preflight-addr.json"

    def rank_log(self, role: str, rank: int) -> Path:
        return self.logs / f"{role}-{rank}.log"

    def heartbeat(self, rank: int) -> Path:
        """Where worker RANK answers heartbeat probes (a Rendezvous record: its address, its port)."""
        return self.path / f"rank-{rank}.heartbeat.json"

    def rank_failed(self, rank: int) -> Path:
        return self.path / f"rank-{rank}.failed"

    def failed_ranks(self) -> list[Path]:
        return sorted(self.path.glob("rank-*.failed"))

    def read_spec(self) -> JobSpec:
        """spec.yaml: the resolved spec, read as the user's is (the hardened loader: no aliases, no
        duplicate keys, bounded; a regular file of this user's, not a link); not expanded again."""
        from slurm_vllm.core import spec as spec_mod

        try:
            text = safefile.read_text(self.spec, spec_mod.MAX_SPEC_BYTES)
        except FileNotFoundError:
            raise JobFolderError(f"{self.spec}: no such file (has the job started?)") from None
        try:
            return spec_mod.parse(spec_mod.loads(text), expand=False)
        except SlurmVllmError as exc:
            raise JobFolderError(f"{self.spec}: {exc}") from None

    def verified(self) -> JobDir:
        """This folder, once verify() accepts it (this user's, not writable by others)."""
        verify(self.path)
        if not self.path.is_dir():
            raise JobFolderError(f"{self.path}: not a job folder")
        return self

    def create(self, spec_yaml: str, plan_json: str, api_key: bool) -> None:
        """Make the folder (0700) with the resolved spec, the plan and fresh per-job secrets (0600)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path.mkdir(mode=0o700)
        self.path.chmod(0o700)                # whatever the umask: no one else reads or replaces a file
        for sub in (self.env_dir, self.logs):
            sub.mkdir(mode=0o700)
        atomic_write(self.spec, spec_yaml)
        atomic_write(self.plan, plan_json)
        write_secret(self.ray_token, secrets.token_hex(32))
        if api_key:
            write_secret(self.api_key, "sk-" + secrets.token_urlsafe(32))
        self.write_stage(Stage.PENDING)

    def restart(self) -> None:
        """A requeued job's second run: what the first run left (done, rank failures, endpoint, head,
        the workers' heartbeat addresses, Ray's nodes, preflight) is removed, the stage goes back to
        PENDING; logs and secrets stay."""
        stale = [self.done, self.endpoint, self.head, self.ray_nodes, self.preflight, self.preflight_addr,
                 self.path / "preflight-raw.json", self.path / "replicas.json", self.requeue_mark,
                 *self.failed_ranks(), *self.path.glob("rank-*.heartbeat.json")]
        for path in stale:
            path.unlink(missing_ok=True)
        for replica in self.path.glob("replica-*"):      # the other replicas' (replicadir.py)
            shutil.rmtree(replica, ignore_errors=True)
        self.write_stage(Stage.PENDING, "requeued: starting again")

    def write(self, path: Path, record: Record) -> None:
        """RECORD as PATH's typed JSON, atomically."""
        atomic_write(path, record.to_json())

    def read(self, path: Path, kind: type[R]) -> R:
        """PATH as a KIND record; JobFolderError (one line) if missing, malformed or foreign."""
        return kind.read(path)

    def write_stage(self, stage: Stage, detail: str = "", log: bool = True) -> None:
        """The current stage, and a line in stage.log (unless LOG is false: progress updates)."""
        now = time.time()
        self.write(self.stage_file, StageInfo(stage, detail, now))
        if log:
            with open(self.stage_log, "a") as f:
                f.write(f"{now:.3f} {stage.value}{' ' + detail if detail else ''}\n")

    def stage_times(self) -> dict[Stage, float]:
        """When each stage was last written (stage.log; after a requeue: the last run's)."""
        times: dict[Stage, float] = {}
        try:
            lines = safefile.tail(self.stage_log, 10_000)
        except FileNotFoundError:
            return times
        for line in lines:
            t, _, rest = line.partition(" ")
            try:
                times[Stage(rest.split(" ", 1)[0])] = float(t)
            except ValueError:
                continue          # not a stage line: left out
        return times

    def read_stage(self) -> StageInfo:
        """The current stage; PENDING before the first write (the job has not started yet)."""
        if not self.stage_file.exists():
            return StageInfo(Stage.PENDING)
        return StageInfo.read(self.stage_file)

    def write_job_id(self, job_id: str) -> None:
        atomic_write(self.job_id_file, job_id + "\n")

    def job_id(self) -> str | None:
        try:
            found = safefile.read_text(self.job_id_file, 64).strip()
        except (OSError, JobFolderError):
            return None
        return found if is_job_id(found) else None


def write_secret(path: Path, value: str) -> None:
    """A secret file: created 0600, never world- or group-readable, even for an instant."""
    atomic_write(path, value + "\n", mode=0o600)


def read_secret(path: Path) -> str:
    """A secret file's value: a regular 0600 file of this user's, not a link."""
    return safefile.read_text(path, 1 << 16, secret=True).strip()


def is_job_id(ref: str) -> bool:
    """Is REF a Slurm job id: `123`, or a job array's task `123_4`?"""
    return re.fullmatch(r"[0-9]+(_[0-9]+)?", ref, re.ASCII) is not None


