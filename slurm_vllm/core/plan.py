"""JobSpec (+ the model's config.json when readable) → Plan: TP×PP, ports, Ray and vLLM argv."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from slurm_vllm.core.errors import PlanError
from slurm_vllm.core.modelcheck import check_model, factorizations, read_model_config
from slurm_vllm.core.records import Record
from slurm_vllm.core.spec import JobSpec, Scalar

# Ports: one block of BLOCK ports per job, below Linux's ephemeral range (32768-60999) and above
# Ray's default worker range (10002-19999); the block is chosen from the job id and probed on
# every node, moving to the next block on a collision.
PORT_BASE = 20000
BLOCK = 64
SLOTS = (32768 - PORT_BASE) // BLOCK


class Mode(str, enum.Enum):
    """What a job runs: an endpoint, a batch, the all-reduce alone, or the Ray cluster alone."""

    SERVE = "serve"
    BATCH = "batch"
    PREFLIGHT = "preflight"        # `preflight`: the cross-node all-reduce, then DONE
    RAY = "ray"                    # `preflight --ray`: the Ray cluster and its barrier, then DONE


class Backend(str, enum.Enum):
    """How vLLM's processes span the nodes (node/launchers.py has one launcher for each)."""

    RAY = "ray"                    # a Ray cluster and vLLM's Ray executor
    MP = "mp"                      # vLLM's own launcher (--nnodes/--node-rank/--headless)


@dataclass(frozen=True)
class Parallel:
    tp: int
    pp: int


@dataclass(frozen=True)
class Ports:
    """All the ports one node of one job listens on."""

    gcs: int
    client: int
    node_manager: int
    object_manager: int
    runtime_env_agent: int
    metrics: int
    dashboard_agent_grpc: int
    dashboard_agent_listen: int
    api: int
    autoscaler_metrics: int     # Ray's autoscaler monitor on the head (Ray's fixed default 44217 collides)
    heartbeat: int              # the node program's own: other ranks probe it (node/heartbeat.py)
    replica_api: int            # replicas: each replica head's door (the router's upstream)
    router: int                 # replicas: the router on the job's head (loopback, behind the endpoint)
    router_metrics: int         # replicas: the router's Prometheus metrics (loopback)
    min_worker: int
    max_worker: int

    def all(self) -> list[int]:
        fixed = [v for k, v in asdict(self).items() if k not in ("min_worker", "max_worker")]
        return fixed + list(range(self.min_worker, self.max_worker + 1))


@dataclass(frozen=True)
class Plan(Record):
    """`plan.json`: everything a rank needs to run its part, decided once where the script is made
    (spec → plan); the nodes read it and never plan again."""

    KIND: ClassVar[str] = "plan"
    name: str
    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    served_name: str
    model_path: str
    vllm_args: tuple[str, ...]
    gcs_port: int | None
    api_port: int | None
    ready_timeout: int
    api_key: bool
    preflight: bool = False        # run the cross-node all-reduce before Ray and vLLM
    mode: Mode = Mode.SERVE
    shards: int = 1                # a sharded batch: the job array's size (each task one shard)
    backend: Backend = Backend.RAY
    replicas: int = 1              # parallelism.data: servers of TP x PP, each on nodes of its own

    @property
    def replica_nodes(self) -> int:
        """The nodes of one replica (one server of TP x PP)."""
        return self.nodes // self.replicas

    def replica_of(self, rank: int) -> tuple[int, int]:
        """(replica, rank inside it) of the allocation's RANK: replica k holds ranks k*n .. k*n+n-1."""
        return divmod(rank, self.replica_nodes)


def _choices(total: int) -> str:
    return ", ".join(f"TP{tp}xPP{pp}" for tp, pp in factorizations(total))


def replica_nodes(spec: JobSpec) -> int:
    """The nodes of one replica: slurm.nodes / parallelism.data (PlanError when it does not divide)."""
    data, nodes = spec.parallelism.data, spec.slurm.nodes
    if data < 1:
        raise PlanError(f"parallelism.data: must be >= 1, got {data}")
    if nodes % data:
        valid = ", ".join(str(d) for d in range(1, nodes + 1) if nodes % d == 0)
        raise PlanError(f"parallelism.data={data}: each replica needs whole nodes of its own, and "
                        f"slurm.nodes={nodes} does not divide by {data}; valid choices: {valid} "
                        f"(or slurm.nodes = {data} x the nodes of one replica)")
    return nodes // data


def choose_parallel(spec: JobSpec, model_config: dict[str, Any] | None = None) -> Parallel:
    """TP×PP of one replica from the spec (auto: TP = gpus_per_node, PP = the replica's nodes),
    checked against the model."""
    nodes, gpn = replica_nodes(spec), max(spec.slurm.gpus_per_node, 1)
    total = nodes * gpn
    tensor, pipeline = spec.parallelism.tensor, spec.parallelism.pipeline
    if tensor == "auto" and pipeline == "auto":
        tp, pp = gpn, nodes
    elif tensor == "auto":
        assert pipeline != "auto"
        tp, pp = total // pipeline if total % pipeline == 0 else 0, pipeline
    elif pipeline == "auto":
        tp, pp = tensor, total // tensor if total % tensor == 0 else 0
    else:
        tp, pp = tensor, pipeline
    if tp * pp != total:
        per = ("slurm.nodes x slurm.gpus_per_node" if spec.parallelism.data == 1 else
               "one replica's GPUs: slurm.nodes / parallelism.data x slurm.gpus_per_node")
        raise PlanError(
            f"parallelism.tensor x parallelism.pipeline must equal {per} "
            f"= {nodes}x{gpn} = {total} GPUs, got tensor={tensor}, pipeline={pipeline}; "
            f"valid choices: {_choices(total)}")
    if model_config:
        check_model(model_config, tp, pp, total)
    return Parallel(tp, pp)


def _flag(key: str, value: Scalar) -> list[str]:
    name = "--" + key.replace("_", "-")
    if value is True:
        return [name]
    if value is False:
        return []
    return [name, str(value)]


def vllm_flags(args: dict[str, Scalar], mode: str = "serve") -> tuple[str, ...]:
    """vllm.args (checked in spec) as `vllm serve` flags. A batch's API server logs no line per
    request unless the args say (uvicorn's access log: ~8% of a batch's rate on 2 CPUs, RESULTS.md)."""
    given = {key.replace("-", "_"): value for key, value in args.items()}
    if mode == "batch":
        given = {"disable_uvicorn_access_log": True, **given}
    return tuple(flag for key, value in given.items() for flag in _flag(key, value))


def backend(spec: JobSpec) -> Backend:
    """The spec's backend; auto is vLLM's own executor for a server within one node (Ray's costs
    ~12% of a batch's rate there and spans nothing, RESULTS.md), Ray for a server across nodes."""
    if spec.backend != "auto":
        return Backend(spec.backend)
    return Backend.MP if replica_nodes(spec) == 1 else Backend.RAY


def make(spec: JobSpec, model_config: dict[str, Any] | None = None) -> Plan:
    """The plan for SPEC; MODEL_CONFIG defaults to the model's config.json if readable here."""
    config = model_config if model_config is not None else read_model_config(spec.model.path)
    par = choose_parallel(spec, config)
    if spec.parallelism.data > 1 and spec.mode == "batch" and spec.batch.shards > 1:
        raise PlanError(f"parallelism.data={spec.parallelism.data} with batch.shards={spec.batch.shards}: "
                        f"choose one (replicas share one input through their router; shards are jobs)")
    if spec.parallelism.data > 1 and spec.preflight:
        raise PlanError(f"parallelism.data={spec.parallelism.data} with preflight: not supported yet; "
                        f"run the preflight with one replica's nodes (parallelism.data: 1)")
    return Plan(
        name=spec.name, nodes=spec.slurm.nodes, gpus_per_node=spec.slurm.gpus_per_node,
        tp=par.tp, pp=par.pp, served_name=spec.model.name, model_path=spec.model.path,
        vllm_args=vllm_flags(spec.vllm.args, spec.mode),
        gcs_port=None if spec.ray.port == "auto" else spec.ray.port,
        api_port=None if spec.vllm.port == "auto" else spec.vllm.port,
        ready_timeout=spec.ready_timeout, api_key=spec.vllm.api_key == "auto", preflight=spec.preflight,
        mode=Mode(spec.mode), shards=spec.batch.shards if spec.mode == "batch" else 1,
        backend=backend(spec), replicas=spec.parallelism.data,
    )


def ports(plan: Plan, job_id: int, attempt: int = 0) -> Ports:
    """The port block for JOB_ID (ATTEMPT moves to the next block after a collision)."""
    base = PORT_BASE + ((job_id + attempt) % SLOTS) * BLOCK
    return Ports(
        gcs=plan.gcs_port or base, client=base + 1, node_manager=base + 2, object_manager=base + 3,
        runtime_env_agent=base + 4, metrics=base + 5, dashboard_agent_grpc=base + 6,
        dashboard_agent_listen=base + 7, api=plan.api_port or base + 8, autoscaler_metrics=base + 9,
        heartbeat=base + 10, replica_api=base + 11, router=base + 12, router_metrics=base + 13,
        min_worker=base + 16, max_worker=base + BLOCK - 1,
    )


def ray_argv(plan: Plan, ports: Ports, ip: str, head_address: str | None, cpus: int) -> list[str]:
    """`ray start` for the head (HEAD_ADDRESS None) or a worker joining HEAD_ADDRESS."""
    argv = ["ray", "start", "--block", f"--node-ip-address={ip}", f"--num-cpus={cpus}",
            f"--num-gpus={plan.gpus_per_node}", "--disable-usage-stats",
            f"--node-manager-port={ports.node_manager}", f"--object-manager-port={ports.object_manager}",
            f"--runtime-env-agent-port={ports.runtime_env_agent}", f"--metrics-export-port={ports.metrics}",
            f"--dashboard-agent-grpc-port={ports.dashboard_agent_grpc}",
            f"--dashboard-agent-listen-port={ports.dashboard_agent_listen}",
            f"--min-worker-port={ports.min_worker}", f"--max-worker-port={ports.max_worker}"]
    if head_address is None:
        return [*argv, "--head", f"--port={ports.gcs}", f"--ray-client-server-port={ports.client}",
                "--include-dashboard=false"]
    return [*argv, f"--address={head_address}"]


def vllm_argv(plan: Plan, ip: str, port: int, master: tuple[str, int] | None = None,
              node_rank: int = 0, uds: str | None = None) -> list[str]:
    """`vllm serve` on the head (Ray executor; or, for backend mp, node rank 0 of vLLM's own
    launcher, MASTER: the head's address and the job's master port), or on node NODE_RANK > 0 of
    the mp backend (headless: no API server; IP and PORT are not used). With UDS the API server
    listens on that Unix socket only (the front door faces the network: frontdoor.py)."""
    argv = ["vllm", "serve", plan.model_path, "--served-model-name", plan.served_name,
            "--tensor-parallel-size", str(plan.tp), "--pipeline-parallel-size", str(plan.pp),
            "--distributed-executor-backend", plan.backend.value]
    if plan.backend is Backend.MP:
        if master is None:
            raise ValueError("backend mp: the master address and port are needed")
        argv += ["--nnodes", str(plan.replica_nodes), "--node-rank", str(node_rank),
                 "--master-addr", master[0], "--master-port", str(master[1])]
        if node_rank > 0:
            return [*argv, "--headless", *plan.vllm_args]
    where = ["--uds", uds] if uds else ["--host", ip, "--port", str(port)]
    return [*argv, *where, *plan.vllm_args]
