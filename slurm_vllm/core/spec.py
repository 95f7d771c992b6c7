"""The job spec: YAML → typed frozen dataclasses, with defaults; every error names the key path."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from slurm_vllm.core import safefile
from slurm_vllm.core.errors import SpecError

Auto = Literal["auto"]
Scalar = Union[str, int, float, bool]  # noqa: UP007  (a runtime alias used by the loader)
DEFAULT_JOBS_ROOT = "~/.slurm_vllm/jobs"
# Bounds that keep a typo from turning into a hang (the plan factors nodes x GPUs) or a monster job.
MAX_NODES = 4096
MAX_GPUS_PER_NODE = 64
MAX_CPUS_PER_TASK = 4096
MAX_SPEC_BYTES = 1 << 20
SLURM_TIME = r"UNLIMITED|INFINITE|-1|\d{1,7}(:\d{1,2}){0,2}|\d{1,4}-\d{1,2}(:\d{1,2}){0,2}"   # sbatch --time
MAX_DEPTH = 16                     # YAML nesting (a spec needs 4)
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Names of `env` variables that hold secrets, by their words (HF_TOKEN, AWS_ACCESS_KEY_ID, DB_PASS):
# refused there (env values land in spec.yaml and job.sbatch) and sent to secret_env.
SECRET_LAST_WORDS = {"TOKEN", "SECRET", "PASSWORD", "PASSWD", "PASS", "PASSPHRASE", "KEY", "APIKEY", "PAT",
                     "CREDENTIAL", "CREDENTIALS", "CREDS", "AUTH", "COOKIE", "PWD", "DSN", "WEBHOOK"}
SECRET_WORD_ENDS = ("PASSWORD", "PASSWD", "TOKEN", "SECRET", "APIKEY")     # PGPASSWORD, GHTOKEN
# A value holding a password in a URL (HTTPS_PROXY=http://user:pass@proxy:3128) is a secret too.
URL_CREDENTIALS = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
# Variables slurm_vllm sets for Ray and vLLM on every node (rankenv.environment): env and secret_env
# may not set them (a secret_env file could otherwise switch Ray's token auth off).
MANAGED_ENV = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_USAGE_STATS_ENABLED", "RAY_ADDRESS",
               "VLLM_HOST_IP", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "AUTOSCALER_METRIC_PORT"}
SECRET_PAIRS = {("ACCESS", "KEY"), ("SECRET", "KEY"), ("PRIVATE", "KEY"), ("API", "KEY"),
                ("CONNECTION", "STRING"), ("SESSION", "TOKEN")}
SECRET_URL_OWNERS = {"DATABASE", "DB", "POSTGRES", "POSTGRESQL", "MYSQL", "REDIS", "MONGO", "MONGODB", "AMQP",
                     "BROKER", "SQLALCHEMY", "WEBHOOK", "SLACK"}
SWITCH_WORDS = {"DISABLE", "ENABLE", "NO", "USE", "SKIP", "ALLOW"}     # HF_HUB_DISABLE_IMPLICIT_TOKEN


def looks_secret(name: str) -> bool:
    """Does the environment variable NAME hold a secret? Decided by its words, not substrings:
    HF_TOKEN, OPENAI_KEY, AWS_ACCESS_KEY_ID, DATABASE_URL are; TOKENIZERS_PARALLELISM, MAX_TOKENS,
    HF_TOKEN_PATH, HF_HUB_DISABLE_IMPLICIT_TOKEN are not."""
    words = [w for w in name.upper().split("_") if w]
    while words and words[-1].isdigit():          # HF_TOKEN_2, CLIENT_SECRET_1
        words.pop()
    if not words or SWITCH_WORDS & set(words):
        return False
    if words[-1] in SECRET_LAST_WORDS or any(p in SECRET_PAIRS for p in itertools.pairwise(words)):
        return True
    if words[-1].endswith(SECRET_WORD_ENDS):
        return True
    return words[-1] in ("URL", "URI", "DSN") and bool(SECRET_URL_OWNERS & set(words[:-1]))

# vllm.args keys that slurm_vllm sets itself (the plan decides them, or they carry secrets).
MANAGED_VLLM_ARGS = {
    "model": "model.path", "served_model_name": "model.served_name",
    "tensor_parallel_size": "parallelism.tensor", "pipeline_parallel_size": "parallelism.pipeline",
    "distributed_executor_backend": "backend (ray or mp)", "host": "(the node's address)",
    "nnodes": "slurm.nodes", "node_rank": "(each node's rank in the allocation)",
    "master_addr": "(the head node's address)", "master_port": "(planned per job)",
    "headless": "backend: mp (the nodes other than the head run headless)",
    "port": "vllm.port", "api_key": "vllm.api_key (the key reaches vLLM through a 0600 env file)",
    "hf_token": "secret_env: {HF_TOKEN: /path/to/file} (a flag's value is seen by ps and kept in job.sbatch)",
    "config": "vllm.args (a config file could set the options slurm_vllm manages)",
}

# sbatch flags slurm_vllm sets itself; slurm.extra_directives may not set them.
MANAGED_DIRECTIVES = {
    "job-name": "name", "nodes": "slurm.nodes", "ntasks": "(one task per node)",
    "ntasks-per-node": "(one task per node)", "gpus-per-node": "slurm.gpus_per_node",
    "gpus": "slurm.gpus_per_node", "cpus-per-task": "slurm.cpus_per_task", "mem": "slurm.mem",
    "partition": "slurm.partition", "account": "slurm.account", "qos": "slurm.qos",
    "time": "slurm.time", "constraint": "slurm.constraint", "exclusive": "slurm.exclusive",
    "output": "(logs live in jobs_root and the job folder)", "error": "(logs live in the job folder)",
    "signal": "(slurm_vllm handles the time limit)", "array": "(batch.shards)",
    "wrap": "(the script is slurm_vllm's)", "open-mode": "(set by slurm_vllm)",
    "export": "env / secret_env (the job's environment)", "export-file": "env / secret_env",
    "parsable": "(set by slurm_vllm's submit)", "wait": "(submit returns; use `wait`)",
    "help": "(not a job option)", "usage": "(not a job option)", "version": "(not a job option)",
}
# sbatch's long options (Slurm 22.05, `sbatch --help`): a key that only abbreviates one of them is
# refused, since sbatch's getopt would take it for that option; other unknown names pass to sbatch.
_SBATCH_HELP = """
account array bb bbf begin chdir cluster-constraint clusters comment constraint container contiguous
core-spec cores-per-socket cpu-freq cpus-per-gpu cpus-per-task deadline delay-boot dependency
distribution error exclude exclusive export export-file extra-node-info get-user-env gid gpu-bind
gpu-freq gpus gpus-per-node gpus-per-socket gpus-per-task gres gres-flags help hold ignore-pbs input
job-name licenses mail-type mail-user mcs-label mem mem-per-cpu mem-per-gpu mincpus nice no-kill
no-requeue nodefile nodelist nodes ntasks ntasks-per-core ntasks-per-node ntasks-per-socket output
overcommit oversubscribe parsable partition power priority profile propagate qos quiet reboot requeue
reservation signal sockets-per-node spread-job switches thread-spec threads-per-core time time-min tmp
uid usage use-min-nodes verbose version wait wckey wrap open-mode
"""
SBATCH_OPTIONS = frozenset(_SBATCH_HELP.split())
# container.options that set the container's environment: the job's environment is env / secret_env
# (a value in options would be on the command line, in spec.yaml and in `docker inspect`).
ENV_OPTIONS = ("-e", "--env", "--env-file", "--secret", "--environment")


@dataclass(frozen=True)
class ModelSpec:
    """What to serve: `path` as seen where vLLM runs (inside the container)."""

    path: str
    served_name: str | None = None

    @property
    def name(self) -> str:
        return self.served_name or Path(self.path.rstrip("/")).name


@dataclass(frozen=True)
class SlurmSpec:
    """The allocation: one task per node, `gpus_per_node` GPUs each."""

    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int | None = None
    mem: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "01:00:00"
    constraint: str | None = None
    exclusive: bool = False
    extra_directives: dict[str, Scalar] = field(default_factory=dict)
    setup: tuple[str, ...] = ()
    python: str | None = None
    template: str | None = None     # a jinja2 file extending job.sbatch.j2 (relative: to the spec file)


@dataclass(frozen=True)
class ParallelismSpec:
    """Tensor × pipeline parallel sizes: `auto` gives TP = gpus_per_node and PP = nodes."""

    tensor: int | Auto = "auto"
    pipeline: int | Auto = "auto"


@dataclass(frozen=True)
class ContainerSpec:
    """Where Ray and vLLM run: a container runtime and image, or `none` (the node's environment)."""

    runtime: Literal["apptainer", "docker", "podman", "none"] = "none"
    image: str | None = None
    binds: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    gpus: bool = True


@dataclass(frozen=True)
class NetworkSpec:
    """The one interface per node that Ray, vLLM, NCCL and Gloo use (null: the route to the head), and
    whether other users share that network (`trusted: false`: a multi-node job is refused, since
    vLLM's traffic between nodes carries no authentication or encryption)."""

    interface: str | None = None
    trusted: bool = True


@dataclass(frozen=True)
class NcclSpec:
    """NCCL settings for the containers; `ib_hca` set means InfiniBand is requested."""

    ib_hca: str | None = None
    ib_gid_index: int | None = None
    debug: Literal["VERSION", "WARN", "INFO", "TRACE"] | None = None

    def env(self) -> dict[str, str]:
        values = {"NCCL_IB_HCA": self.ib_hca, "NCCL_IB_GID_INDEX": self.ib_gid_index,
                  "NCCL_DEBUG": self.debug}
        return {k: str(v) for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class VllmSpec:
    """`vllm serve` options: `args` become flags (`max_model_len: 256` → `--max-model-len 256`)."""

    args: dict[str, Scalar] = field(default_factory=dict)
    port: int | Auto = "auto"
    api_key: Literal["auto", "none"] = "auto"


@dataclass(frozen=True)
class RaySpec:
    """The Ray cluster: the head's GCS port (`auto`: planned per job) and optional extra flags."""

    port: int | Auto = "auto"


@dataclass(frozen=True)
class BatchSpec:
    """Batch mode: an OpenAI batch input (JSONL) in, results out, and the job ends by itself."""

    input: str | None = None
    output: str | None = None       # default <jobs_root>/<name>.results.jsonl: a re-submit resumes it
    concurrency: int = 64           # requests in flight against the job's server
    max_jobs: int = 1               # on the time limit, go on in up to this many runs (requeued)
    shards: int = 1                 # K > 1: a Slurm job array of K servers, each over 1/K of the input


@dataclass(frozen=True)
class JobSpec:
    """One slurm_vllm job: everything `submit` and `render` need."""

    name: str
    model: ModelSpec
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    parallelism: ParallelismSpec = field(default_factory=ParallelismSpec)
    container: ContainerSpec = field(default_factory=ContainerSpec)
    network: NetworkSpec = field(default_factory=NetworkSpec)
    nccl: NcclSpec = field(default_factory=NcclSpec)
    env: dict[str, str] = field(default_factory=dict)
    secret_env: dict[str, str] = field(default_factory=dict)
    vllm: VllmSpec = field(default_factory=VllmSpec)
    ray: RaySpec = field(default_factory=RaySpec)
    backend: Literal["ray", "mp"] = "ray"   # mp: vLLM's own multi-node launcher, no Ray
    mode: Literal["serve", "batch"] = "serve"
    batch: BatchSpec = field(default_factory=BatchSpec)
    jobs_root: str = DEFAULT_JOBS_ROOT
    ready_timeout: int = 1800
    preflight: bool = False

    @property
    def jobs_root_path(self) -> Path:
        return Path(self.jobs_root).expanduser()

    @property
    def batch_output(self) -> Path:
        """Where a batch job's results go (batch.output, else beside the job folders)."""
        return Path(self.batch.output or f"{self.jobs_root}/{self.name}.results.jsonl").expanduser()

    @property
    def batch_parts(self) -> Path:
        """Where the shards of a sharded batch write their parts before the merge: <output>.parts/."""
        return self.batch_output.with_name(self.batch_output.name + ".parts")


# --- loading ---------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) if not isinstance(a, str) else a for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is dict:
        return "a mapping"
    if origin is tuple:
        return "a list of strings"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _convert(option, value, path)
            except SpecError:
                if option in (str, float) and type(value) is option:
                    raise                  # the right type with a wrong value: say why
                continue
        raise SpecError(f"{path}: expected {_type_name(tp)}, got {_show(value)}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise SpecError(f"{path}: expected one of {', '.join(map(str, get_args(tp)))}, got {_show(value)}")
    if tp is type(None):
        if value is None:
            return None
        raise SpecError(f"{path}: expected null, got {_show(value)}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{path}: expected a mapping, got {_show(value)}")
        _, value_tp = get_args(tp)
        for k in value:
            if not isinstance(k, str):     # `~:`, `true:`, `1:` are YAML null/bool/int, not names
                raise SpecError(f"{path}: key {_show(k)} is not a string (YAML reads ~, true, 1 "
                                f"unquoted as null, boolean, number): quote it")
            _no_control(k, f"{path} key")
        return {str(k): _convert(value_tp, v, f"{path}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SpecError(f"{path}: expected a list of strings, got {_show(value)}")
        if path != "slurm.setup":          # setup lines are shell by design
            for i, v in enumerate(value):
                _no_control(v, f"{path}[{i}]")
        return tuple(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):   # .nan/.inf: no setting means that
                raise SpecError(f"{path}: {value} is not a finite number")
            return value
    elif tp is str:
        if isinstance(value, int | float) and not isinstance(value, bool) and path.startswith("env."):
            if not math.isfinite(value):
                raise SpecError(f"{path}: {value} is not a finite number")
            value = str(value)             # env: {OMP_NUM_THREADS: 4}
        if isinstance(value, int) and not isinstance(value, bool) and path == "slurm.time":
            raise SpecError(f"{path}: YAML read the unquoted value as the number {value} (1:00:00 "
                            f"unquoted is 3600 there): quote it, e.g. time: \"1:00:00\"")
        if isinstance(value, str):
            _no_control(value, path)
            return value
    else:  # pragma: no cover - a schema bug, not user input
        raise TypeError(f"unsupported spec type {tp!r} at {path}")
    raise SpecError(f"{path}: expected {_type_name(tp)}, got {_show(value)}")


def _no_control(value: str, path: str) -> None:
    found = CONTROL.search(value)
    if found:
        raise SpecError(f"{path}: control character {found.group()!r} not allowed (only slurm.setup "
                        f"lines may hold shell)")


def _default_text(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        return f"{f.name} (default {f.default!r})" if f.default is not None else f"{f.name} (default null)"
    if f.default_factory is not dataclasses.MISSING:
        if dataclasses.is_dataclass(f.default_factory):
            return f"{f.name} (a section)"
        return f"{f.name} (default {f.default_factory()!r})"
    return f"{f.name} (required)"


def _build(cls: Any, data: Any, path: str) -> Any:
    where = path or "the spec"
    if data is None and path:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls, globalns=globals())
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            valid = ", ".join(_default_text(f) for f in fields.values())
            raise SpecError(f"{path + '.' if path else ''}{key}: unknown key; valid keys: {valid}")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(f"{sub}: required key is missing")
    return cls(**kwargs)


def _check(spec: JobSpec) -> None:
    """Rules across keys that a type alone cannot say."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", spec.name):
        raise SpecError(f"name: {spec.name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    s = spec.slurm
    if not 1 <= s.nodes <= MAX_NODES:
        raise SpecError(f"slurm.nodes: must be 1-{MAX_NODES}, got {s.nodes}")
    if not 0 <= s.gpus_per_node <= MAX_GPUS_PER_NODE:
        raise SpecError(f"slurm.gpus_per_node: must be 0-{MAX_GPUS_PER_NODE}, got {s.gpus_per_node}")
    if s.cpus_per_task is not None and not 1 <= s.cpus_per_task <= MAX_CPUS_PER_TASK:
        raise SpecError(f"slurm.cpus_per_task: must be 1-{MAX_CPUS_PER_TASK}, got {s.cpus_per_task}")
    if not re.fullmatch(SLURM_TIME, s.time, re.ASCII | re.IGNORECASE):
        raise SpecError(f"slurm.time: {_show(s.time)}: use Slurm's minutes, [D-]HH:MM:SS, MM:SS, "
                        f"D-HH or UNLIMITED")
    if s.mem is not None and not re.fullmatch(r"\d{1,12}[KMGTkmgt]?", s.mem, re.ASCII):
        raise SpecError(f"slurm.mem: {_show(s.mem)}: use Slurm's size, e.g. 0 (all), 500G, 64000M")
    if not spec.model.path.strip():
        raise SpecError("model.path: must not be empty")
    if not spec.jobs_root.strip():
        raise SpecError("jobs_root: must not be empty")
    if not spec.jobs_root_path.is_absolute():
        raise SpecError(f"jobs_root: {_show(spec.jobs_root)} must be an absolute path (or start with ~): "
                        f"the nodes resolve it in their own working directory")
    if "%" in spec.jobs_root:
        raise SpecError(f"jobs_root: {_show(spec.jobs_root)}: '%' is not allowed: Slurm expands %j, %u, … "
                        f"in the job's log path there, so the log would land elsewhere")
    if spec.nccl.ib_gid_index is not None and not 0 <= spec.nccl.ib_gid_index <= 255:
        raise SpecError(f"nccl.ib_gid_index: must be 0-255, got {spec.nccl.ib_gid_index}")
    for key in ("tensor", "pipeline"):
        value = getattr(spec.parallelism, key)
        if value != "auto" and value < 1:
            raise SpecError(f"parallelism.{key}: must be >= 1 or auto, got {value}")
    c = spec.container
    if c.runtime != "none" and not c.image:
        raise SpecError(f"container.image: required when container.runtime is {c.runtime}")
    for i, bind in enumerate(c.binds):
        parts = bind.split(":")
        bad_mode = len(parts) == 3 and parts[2] not in ("ro", "rw")
        if len(parts) not in (2, 3) or not all(parts[:2]) or bad_mode:
            raise SpecError(f"container.binds[{i}]: {bind!r}: use host:container or host:container:ro")
    for key, env_value in spec.env.items():
        if looks_secret(key) or URL_CREDENTIALS.search(str(env_value)):
            raise SpecError(f"env.{key}: looks like a secret; put it in secret_env as "
                            f"{key}: /path/to/file (read on the node, never written into scripts)")
    for table, keys in (("env", spec.env), ("secret_env", spec.secret_env)):
        for key in keys:
            if key in MANAGED_ENV:
                raise SpecError(f"{table}.{key}: set by slurm_vllm on every node (the node's network "
                                f"identity, Ray's token auth); it may not be set here")
    for key, value in spec.secret_env.items():
        if not value.startswith(("/", "~")):
            raise SpecError(f"secret_env.{key}: must be the absolute path of a file holding the value "
                            f"(or start with ~), got {_show(value)}")
    for key in list(spec.env) + list(spec.secret_env):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise SpecError(f"env.{key}: not a valid environment variable name")
    for key in ("port",):
        for section in (spec.vllm, spec.ray):
            value = getattr(section, key)
            if value != "auto" and not 1024 <= value <= 65535:
                raise SpecError(f"{'vllm' if section is spec.vllm else 'ray'}.port: must be 1024-65535 "
                                f"or auto, got {value}")
    for key in spec.slurm.extra_directives:
        _check_directive(key)
    for key in spec.vllm.args:
        _check_vllm_arg(key)
    _check_argv_values(spec)
    if c.runtime != "none" and re.search(r"[:,]", str(spec.jobs_root_path)):
        raise SpecError(f"jobs_root: {_show(spec.jobs_root)}: ':' and ',' are not allowed with a container "
                        f"runtime (they separate the parts of a bind)")
    for i, bind in enumerate(c.binds):
        if "," in bind:
            raise SpecError(f"container.binds[{i}]: {bind!r}: one bind per entry (no ',')")
    for i, option in enumerate(c.options):
        name = option.split("=", 1)[0]
        short_e = re.fullmatch(r"-[A-Za-z]*e\S*", option)      # -e X, -eX, -ie X (a cluster of short flags)
        if name in ENV_OPTIONS or name in ("--env-host", "--env-merge") or short_e:
            raise SpecError(f"container.options[{i}]: {_show(option)}: the container's environment comes "
                            f"from env (values) and secret_env (files), never from the command line")
        if name == "--name":
            raise SpecError(f"container.options[{i}]: --name is set by slurm_vllm (cleanup finds the "
                            f"containers by it)")
    _check_batch(spec)
    if not spec.network.trusted and spec.slurm.nodes > 1:
        raise SpecError(f"network.trusted: false, and slurm.nodes is {spec.slurm.nodes}: vLLM's traffic "
                        f"between nodes (every prompt's tokens) would be readable by other users on that "
                        f"network; use 1 node, or an interface only your job's nodes share "
                        f"(README: 'Multi-node traffic')")
    iface = spec.network.interface
    if iface is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,14}", iface):
        raise SpecError(f"network.interface: {iface!r} is not an interface name (e.g. ib0, eth1)")
    if not 10 <= spec.ready_timeout <= 7 * 86400:
        raise SpecError(f"ready_timeout: must be 10-604800 seconds, got {spec.ready_timeout}")


def _check_batch(spec: JobSpec) -> None:
    b = spec.batch
    if spec.mode != "batch":
        if b != BatchSpec():
            raise SpecError("batch: only with mode: batch (mode is serve)")
        return
    if not b.input:
        raise SpecError("batch.input: required with mode: batch (the OpenAI batch file, JSONL)")
    for key in ("input", "output"):
        value = getattr(b, key)
        if value is not None and not Path(value).expanduser().is_absolute():
            raise SpecError(f"batch.{key}: {_show(value)} must be an absolute path (or start with ~)")
    if not 1 <= b.concurrency <= 4096:
        raise SpecError(f"batch.concurrency: must be 1-4096, got {b.concurrency}")
    if not 1 <= b.max_jobs <= 100:
        raise SpecError(f"batch.max_jobs: must be 1-100, got {b.max_jobs}")
    if not 1 <= b.shards <= 1000:
        raise SpecError(f"batch.shards: must be 1-1000 (the job array's size), got {b.shards}")


def _check_directive(key: str) -> None:
    """An extra_directives key: a full sbatch option name that slurm_vllm does not manage."""
    flag = key.replace("_", "-").removeprefix("--")
    where = f"slurm.extra_directives.{key}"
    if not re.fullmatch(r"[a-z][a-z0-9-]*", flag):
        raise SpecError(f"{where}: not an sbatch option name (e.g. gres, mail-type, reservation)")
    if flag in MANAGED_DIRECTIVES:
        raise SpecError(f"{where}: managed by slurm_vllm; use {MANAGED_DIRECTIVES[flag]}")
    if flag not in SBATCH_OPTIONS:
        longer = sorted(o for o in SBATCH_OPTIONS if o.startswith(flag))
        if longer:
            managed = [o for o in longer if o in MANAGED_DIRECTIVES]
            why = (f", which is managed by slurm_vllm (use {MANAGED_DIRECTIVES[managed[0]]})"
                   if managed else "")
            raise SpecError(f"{where}: sbatch reads an abbreviation as --{longer[0]}{why}; write the "
                            f"full option name")


def _check_vllm_arg(key: str) -> None:
    """A vllm.args key: a vLLM option name that is not managed, not secret, not an abbreviation of
    a managed one (vLLM's argparse expands `api-k` to --api-key)."""
    where = f"vllm.args.{key}"
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", key):
        raise SpecError(f"{where}: not a vLLM option name (use snake_case, e.g. max_model_len)")
    canonical = key.replace("-", "_")
    if canonical in MANAGED_VLLM_ARGS:
        raise SpecError(f"{where}: set by slurm_vllm; use {MANAGED_VLLM_ARGS[canonical]}")
    longer = sorted(m for m in MANAGED_VLLM_ARGS if m.startswith(canonical))
    if longer:
        raise SpecError(f"{where}: vLLM reads an abbreviation as --{longer[0].replace('_', '-')}, which "
                        f"slurm_vllm sets; use {MANAGED_VLLM_ARGS[longer[0]]}")
    if looks_secret(canonical):
        raise SpecError(f"{where}: a secret on vLLM's command line (seen by ps, kept in job.sbatch); "
                        f"use secret_env with the variable vLLM reads")


def _check_argv_values(spec: JobSpec) -> None:
    """Values that land in an argv position alone may not start with '-' (they would be options)."""
    values: dict[str, Scalar | None] = {
        "model.path": spec.model.path, "model.served_name": spec.model.served_name,
        "container.image": spec.container.image, "slurm.python": spec.slurm.python,
        **{f"container.binds[{i}]": bind for i, bind in enumerate(spec.container.binds)},
        **{f"vllm.args.{key}": arg for key, arg in spec.vllm.args.items()}}
    for where, value in values.items():
        if isinstance(value, str) and value.startswith("-"):
            raise SpecError(f"{where}: {_show(value)} may not start with '-' (it would be read as an option)")


def _expand(value: Any, path: str) -> Any:
    """${NAME} in string values → the login node's environment (slurm.setup lines stay shell)."""
    if isinstance(value, dict):
        return {k: v if f"{path}.{k}".lstrip(".") == "slurm.setup" else _expand(v, f"{path}.{k}")
                for k, v in value.items()}
    if isinstance(value, list):
        out: list[Any] = []
        for i, v in enumerate(value):
            expanded = _expand(v, f"{path}[{i}]")
            # A bind entry may name a variable holding several binds, comma-separated.
            if path == ".container.binds" and isinstance(v, str) and "${" in v:
                out += [b for b in expanded.split(",") if b]
            else:
                out.append(expanded)
        return out
    if isinstance(value, str) and "${" in value:
        def var(match: re.Match[str]) -> str:
            if match.group() == "$${":
                return "${"               # the escape: a literal ${
            name = match.group(1)
            if name is None:
                raise SpecError(f"{path.lstrip('.')}: '${{' must start ${{NAME}}; "
                                f"write $${{ for a literal ${{")
            if name not in os.environ:
                raise SpecError(f"{path.lstrip('.')}: ${{{name}}} is not set in the environment")
            return os.environ[name]
        return EXPANSION.sub(var, value)
    return value


# ${NAME} → the login node's environment, once; $${ is a literal ${ (never expanded again).
EXPANSION = re.compile(r"\$\$\{|\$\{(?:([A-Za-z_][A-Za-z0-9_]*)\})?")


def parse(data: Any, expand: bool = True) -> JobSpec:
    """Build and check a JobSpec from already-parsed YAML data: a user's spec (${NAME} expanded
    first), or with EXPAND false one already resolved (spec.yaml, the script's embedded spec)."""
    spec: JobSpec = _build(JobSpec, _expand(data, "") if expand else data, "")
    _check(spec)
    return spec


class _Loader(yaml.SafeLoader):
    """YAML for specs: no aliases (an alias bomb expands to gigabytes), no duplicate keys (the last
    would silently win), nesting at most MAX_DEPTH (no RecursionError)."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise SpecError(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not "
                            f"allowed in a spec: write the value out")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise SpecError(f"line {mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise SpecError(f"line {key_node.start_mark.line + 1}: duplicate key {_show(key)}")
            seen.add(key if isinstance(key, str | int | float | bool) else id(key_node))
        return super().construct_mapping(node, deep=deep)


def _show(value: Any, limit: int = 60) -> str:
    """VALUE's repr, cut to LIMIT characters (an error message stays one short line)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def loads(text: str) -> Any:
    """Parse spec YAML text with the spec loader; SpecError (line, what) on any problem."""
    try:
        return yaml.load(text, Loader=_Loader)   # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise SpecError(f"{where}not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except (ValueError, OverflowError) as exc:    # a 5000-digit number: int() refuses it
        raise SpecError(f"a value YAML cannot hold: {str(exc)[:120]}") from None


def load(path: str | Path) -> JobSpec:
    """Read a YAML job spec; SpecError names the file and the key path of any problem."""
    try:
        raw = safefile.read_input(Path(path), MAX_SPEC_BYTES)
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from exc
    except ValueError as exc:
        raise SpecError(f"{path}: {exc}; a spec is at most {MAX_SPEC_BYTES} bytes of YAML") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start}): is it the YAML spec?") from None
    if "\0" in text:
        raise SpecError(f"{path}: a NUL byte: not a text file")
    try:
        data = loads(text)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
    try:
        spec = parse(data)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from exc
    template = spec.slurm.template
    if template and not Path(os.path.expanduser(template)).is_absolute():
        resolved = str(Path(path).resolve().parent / template)
        spec = dataclasses.replace(spec, slurm=dataclasses.replace(spec.slurm, template=resolved))
    return spec


def to_dict(spec: JobSpec) -> dict[str, Any]:
    """The resolved spec as plain data (tuples as lists), for spec.yaml in the job folder."""
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(spec))  # type: ignore[no-any-return]


def dump(spec: JobSpec) -> str:
    return yaml.safe_dump(to_dict(spec), sort_keys=False)
