"""The job spec: YAML → typed frozen dataclasses, with defaults; every error names the key path."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from slurm_vllm.core import safefile
from slurm_vllm.core.decode import Decoder
from slurm_vllm.core.errors import SpecError
from slurm_vllm.core.specrules import check
from slurm_vllm.core.yamlspec import loads as loads  # spec.loads: the YAML side, re-exported

Auto = Literal["auto"]
Scalar = Union[str, int, float, bool]  # noqa: UP007  (a runtime alias used by the loader)
DEFAULT_JOBS_ROOT = "~/.slurm_vllm/jobs"
MAX_SPEC_BYTES = 1 << 20
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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
    """Tensor × pipeline parallel sizes of one server (`auto`: TP = gpus_per_node, PP = its nodes),
    and `data`: how many such servers (replicas, each on nodes of its own) serve behind one endpoint."""

    tensor: int | Auto = "auto"
    pipeline: int | Auto = "auto"
    data: int = 1


@dataclass(frozen=True)
class ContainerSpec:
    """Where Ray and vLLM run: a container runtime and image, or `none` (the node's environment)."""

    runtime: Literal["apptainer", "docker", "podman", "pyxis", "none"] = "none"
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
    concurrency: int | Literal["auto"] = "auto"   # requests in flight (auto: from the server's load)
    prefix_window: int = 10_000     # requests read ahead and sent sorted by prompt (0: input order)
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
    backend: Literal["auto", "ray", "mp"] = "auto"   # auto: mp for a one-node server, else ray
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

def _spec_value(tp: Any, value: Any, path: str) -> Any:
    """The spec's own rules for a value before it is decoded: env values may be numbers (as text,
    finite); an unquoted time that YAML read as a number is named as such."""
    if tp is str and isinstance(value, int | float) and not isinstance(value, bool):
        if path.startswith("env."):                # env: {OMP_NUM_THREADS: 4}
            if not math.isfinite(value):
                raise SpecError(f"{path}: {value} is not a finite number")
            return str(value)
        if path == "slurm.time" and isinstance(value, int):
            raise SpecError(f"{path}: YAML read the unquoted value as the number {value} (1:00:00 "
                            f"unquoted is 3600 there): quote it, e.g. time: \"1:00:00\"")
    return value


def _no_control(value: str, path: str) -> None:
    if path.startswith("slurm.setup["):            # setup lines are shell by design
        return
    found = CONTROL.search(value)
    if found:
        raise SpecError(f"{path}: control character {found.group()!r} not allowed (only slurm.setup "
                        f"lines may hold shell)")


DECODER = Decoder(SpecError, hook=_spec_value, text=_no_control, root="the spec")


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
    spec = DECODER.build(JobSpec, _expand(data, "") if expand else data)
    check(spec)
    return spec


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
