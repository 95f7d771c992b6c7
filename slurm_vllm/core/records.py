"""The job folder's typed files: the stage enum and one frozen dataclass per JSON file, with a schema.

Ranks, the login node and users talk through these files. Each record has one serialiser
(`to_json`) and one reader (`from_json`), a `kind` and a schema version in the file, and is read
strictly: a malformed, foreign or newer file is one JobFolderError naming the file, never a
KeyError or a JSONDecodeError traceback. jobdir.py writes them atomically.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from slurm_vllm.core import safefile
from slurm_vllm.core.decode import Decoder
from slurm_vllm.core.errors import JobFolderError

SCHEMA = 1


class Stage(str, enum.Enum):
    """A job's stages, in order; the last four are final."""

    PENDING = "PENDING"
    STARTING = "STARTING"
    PREFLIGHT = "PREFLIGHT"
    RAY_HEAD = "RAY_HEAD"
    RAY_JOINED = "RAY_JOINED"
    LOADING = "LOADING"
    READY = "READY"
    BATCH = "BATCH"           # batch mode: the requests are being sent (detail: k/N, rate, ETA)
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"

    @property
    def final(self) -> bool:
        return self in FINAL

    def __str__(self) -> str:
        return self.value


FINAL = frozenset({Stage.DONE, Stage.FAILED, Stage.CANCELLED, Stage.TIMEOUT})

R = TypeVar("R", bound="Record")


class Malformed(Exception):
    """A record file's content does not fit its record (from_json names the file)."""


DECODER = Decoder(Malformed, root="the record")


@dataclass(frozen=True)
class Record:
    """Base of the job folder's JSON records: `kind` + `schema` in the file, strict typed reads."""

    KIND: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                data[f.name] = value.value
        return data

    def to_json(self) -> str:
        return json.dumps({"kind": self.KIND, "schema": SCHEMA, **self.to_dict()}, indent=1) + "\n"

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        """DATA (kind and schema left out) as this record, strictly: Malformed names the key."""
        return DECODER.build(cls, {k: v for k, v in data.items() if k not in ("kind", "schema")})

    @classmethod
    def from_json(cls: type[R], text: str, source: Path | str = "") -> R:
        """Parse TEXT (from SOURCE, named in errors) as this record; JobFolderError if it is not one."""
        where = str(source) or cls.KIND
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise JobFolderError(f"{where}: not JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, dict) or data.get("kind") != cls.KIND:
            found = data.get("kind") if isinstance(data, dict) else type(data).__name__
            raise JobFolderError(f"{where}: not a slurm_vllm {cls.KIND} file (kind {found!r})")
        schema = data.get("schema")
        if schema != SCHEMA:
            raise JobFolderError(f"{where}: schema {schema!r}, this slurm_vllm reads schema {SCHEMA} "
                                 f"(written by another version?)")
        try:
            return cls.from_dict(data)
        except Malformed as exc:
            raise JobFolderError(f"{where}: malformed {cls.KIND} file: {exc}") from None

    @classmethod
    def read(cls: type[R], path: Path) -> R:
        """PATH as this record: a regular file of this user's, not a link, at most MAX_RECORD bytes."""
        try:
            text = safefile.read_text(path)
        except FileNotFoundError:
            raise JobFolderError(f"{path}: cannot read: No such file or directory") from None
        return cls.from_json(text, path)


@dataclass(frozen=True)
class StageInfo(Record):
    """`stage`: where the job is, with a one-line detail and when it got there."""

    KIND: ClassVar[str] = "stage"
    stage: Stage
    detail: str = ""
    time: float = 0.0

    def __str__(self) -> str:
        return f"{self.stage.value}{': ' + self.detail if self.detail else ''}"


@dataclass(frozen=True)
class HeadInfo(Record):
    """`head.json`: the head node's identity and ports, written once its Ray head answers."""

    KIND: ClassVar[str] = "head"
    host: str
    ip: str
    interface: str
    gcs_port: int
    api_port: int
    heartbeat_port: int = 0      # the head's heartbeat (node/heartbeat.py); 0: a 1-node job has none


@dataclass(frozen=True)
class Rendezvous(Record):
    """`preflight-addr.json`: where the preflight's process group meets (the head, before Ray)."""

    KIND: ClassVar[str] = "rendezvous"
    ip: str
    port: int


@dataclass(frozen=True)
class RayNode(Record):
    """One alive Ray node as the head's barrier saw it."""

    KIND: ClassVar[str] = "ray_node"
    ip: str
    gpus: float


@dataclass(frozen=True)
class RayNodes(Record):
    """`ray_nodes.json`: the Ray nodes that joined before vLLM started."""

    KIND: ClassVar[str] = "ray_nodes"
    nodes: tuple[RayNode, ...]


@dataclass(frozen=True)
class Replicas(Record):
    """`replicas.json`: the doors of the replicas behind the job's router (parallelism.data > 1)."""

    KIND: ClassVar[str] = "replicas"
    urls: tuple[str, ...]


@dataclass(frozen=True)
class Endpoint(Record):
    """`endpoint.json`: the OpenAI-compatible endpoint of a READY job."""

    KIND: ClassVar[str] = "endpoint"
    url: str
    model: str
    host: str
    port: int
    api_key_file: str | None
    job_id: str

    def api_key(self) -> str | None:
        """The API key, read from its 0600 file (None when the server takes no key)."""
        if self.api_key_file is None:
            return None
        try:     # never through a link: a planted one would send another file as the Bearer token
            return safefile.read_text(Path(self.api_key_file), 4096, secret=True).strip()
        except FileNotFoundError:
            raise JobFolderError(f"{self.api_key_file}: cannot read the API key: no such file") from None


@dataclass(frozen=True)
class PreflightRow(Record):
    """One message size of the preflight all-reduce."""

    KIND: ClassVar[str] = "preflight_row"
    bytes: int
    ms: float
    algbw_GBps: float
    busbw_GBps: float
    correct: bool


@dataclass(frozen=True)
class PreflightResult(Record):
    """`preflight.json`: the cross-node all-reduce: backend, sizes, bandwidth, NCCL's transport."""

    KIND: ClassVar[str] = "preflight"
    backend: str
    world_size: int
    rows: tuple[PreflightRow, ...]
    transport: str = ""


@dataclass(frozen=True)
class RankFailure(Record):
    """`rank-K.failed`: why a worker rank failed (the head reads it and fails the job)."""

    KIND: ClassVar[str] = "rank_failure"
    rank: int
    host: str
    detail: str

    def __str__(self) -> str:
        return f"rank {self.rank} on {self.host}: {self.detail}"


@dataclass(frozen=True)
class BatchProgress(Record):
    """`batch.json`: a batch job's counts, rewritten every few seconds while it runs and at its end."""

    KIND: ClassVar[str] = "batch"
    output: str
    total: int                   # requests in the input
    done: int                    # with a result line in the output (from earlier runs included)
    resumed: int                 # of those, found in the output when this run started
    ok: int                      # this run: answered 2xx
    refused: int                 # this run: answered with another status (a line with its error)
    lost: int                    # this run: no answer (the server went away); they run again on resume
    in_flight: int
    tokens_in: int
    tokens_out: int
    elapsed: float               # seconds since this run started sending
    rate: float                  # requests answered per second, this run
    finished: bool = False
    retries: int = 0             # this run: 5xx answers sent again (a 5xx is not a result while it may pass)

    @property
    def eta(self) -> float | None:
        left = self.total - self.done
        return left / self.rate if self.rate > 0 else None

    def line(self) -> str:
        """`120/1000 done, 23.4 req/s, ETA 0:00:38` (the BATCH stage's detail)."""
        eta = None if self.eta is None else int(self.eta)
        when = "" if eta is None else f", ETA {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}"
        return f"{self.done}/{self.total} done, {self.rate:.1f} req/s{when}"

    def summary(self) -> str:
        """The final stage's detail: counts, tokens, rate, and where the results are."""
        retried = f", {self.retries} retried after a 5xx" if self.retries else ""
        return (f"{self.done}/{self.total} done ({self.ok} ok, {self.refused} refused{retried} this run), "
                f"{self.tokens_in} tokens in, {self.tokens_out} out, {self.rate:.1f} req/s in "
                f"{self.elapsed:.0f} s → {self.output}")
