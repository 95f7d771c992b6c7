"""A rank's pure decisions: the environment Ray and vLLM get, the port block, and the job's final stage."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

from slurm_vllm.core.errors import ClusterError, SlurmVllmError
from slurm_vllm.core.plan import Backend, Plan, Ports, ports
from slurm_vllm.core.records import RankFailure, Stage
from slurm_vllm.core.spec import JobSpec
from slurm_vllm.node.netid import Identity

PORT_ATTEMPTS = 16


class Stopped(SlurmVllmError):
    """This rank was told to stop (a signal), or the job ended elsewhere; DETAIL: what it left
    (a batch's counts), for the final stage."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


LOOPBACK = ("127.0.0.1", "lo")


def loopback_only(plan: Plan) -> bool:
    """A 1-node job without Ray keeps vLLM's own traffic (torch's store, gloo, its ZeroMQ queues) on
    the loopback interface: nothing but the front door on the node's address (Ray binds its servers
    to every interface whatever it is told, so a Ray job cannot)."""
    return plan.replica_nodes == 1 and plan.backend is Backend.MP


def environment(spec: JobSpec, ident: Identity, ray_token: Path, secrets: Mapping[str, str],
                head_gcs: int | None = None, autoscaler_metrics: int | None = None,
                loopback: bool = False) -> dict[str, str]:
    """What Ray and vLLM see on this node (inside the container): the spec's env, the node's one
    identity (LOOPBACK: 127.0.0.1 on lo), Ray's token auth and SECRETS. The head (HEAD_GCS set) also
    gets RAY_ADDRESS, so that `vllm serve` joins this job's Ray and never starts its own."""
    ip, interface = LOOPBACK if loopback else (ident.ip, ident.interface)
    # Ray >= 2.5x drains a node for up to 30 s on SIGTERM (for Ray Serve); the rank stops vLLM
    # itself, so the drain would only hold the job's end (and the next job's start). The raylet
    # starts idle workers for the first driver, which is the head's barrier watch, not vLLM: wasted
    # CPU while vLLM imports. The spec's env may set either.
    env = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_prestart_worker_first_driver": "0",
           **spec.env, **secrets}
    env.update({                   # last: neither env nor a secret file sets what these decide
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(ray_token),
        **spec.nccl.env(),
        "RAY_USAGE_STATS_ENABLED": "0",
        "VLLM_HOST_IP": ip,
        "GLOO_SOCKET_IFNAME": interface,
        "NCCL_SOCKET_IFNAME": interface,
    })
    if head_gcs is not None:
        env["RAY_ADDRESS"] = f"{ident.ip}:{head_gcs}"
    if autoscaler_metrics is not None:   # the job's own port, not Ray's fixed 44217 on every head
        env["AUTOSCALER_METRIC_PORT"] = str(autoscaler_metrics)
    return env


# vLLM copies every VLLM_* variable from its driver to its Ray workers on all nodes, unless a file
# ray_non_carry_over_env_vars.json in $VLLM_CONFIG_ROOT names it: the API key stays in the server.
NON_CARRY_OVER = "ray_non_carry_over_env_vars.json"


def server_environment(env: Mapping[str, str], api_key: str | None, config_root: Path) -> dict[str, str]:
    """The environment of `vllm serve` alone: ENV and the API key. Ray's raylets never get the key,
    and with VLLM_CONFIG_ROOT=CONFIG_ROOT (holding NON_CARRY_OVER) vLLM does not pass it to its
    Ray workers either."""
    if api_key is None:
        return dict(env)
    return {**env, "VLLM_API_KEY": api_key, "VLLM_CONFIG_ROOT": str(config_root)}


def choose_ports(plan: Plan, job_id: int, is_free: Callable[[int], bool], host: str = "this node",
                 claim: Callable[[int], bool] = lambda first: True) -> Ports:
    """The job's port block (from its id), moved to the next block while any port of it is taken
    on this node, a port the spec fixed (ray.port, vllm.port) falls inside it, or another job has
    claimed it (CLAIM(block's first worker port) is False). A fixed port is never moved: taken is
    an error."""
    fixed = {p for p in (plan.gcs_port, plan.api_port) if p}
    for attempt in range(PORT_ATTEMPTS):
        block = ports(plan, job_id, attempt)
        values = block.all()
        if len(values) != len(set(values)):
            continue                       # vllm.port/ray.port on another port of this block
        taken = [p for p in values if not is_free(p)]
        if fixed & set(taken):
            raise ClusterError(f"{host}: port {min(fixed & set(taken))} is taken (ray.port/vllm.port fix "
                               f"this job's ports: choose others, or auto)")
        if not taken and claim(block.min_worker):
            return block
    raise ClusterError(f"{host}: no free port block (tried {PORT_ATTEMPTS} from "
                       f"{ports(plan, job_id).gcs}); is another job holding them?")


def outcome(exc: BaseException | None, stop_reason: str) -> tuple[Stage, str]:
    """How a rank's run ended: None (its work ended by itself) is DONE; a stop is its reason
    (CANCELLED, or TIMEOUT on the time-limit signal); an error is FAILED with its one line."""
    if exc is None:
        return Stage.DONE, ""
    if isinstance(exc, Stopped):
        return Stage(stop_reason or "CANCELLED"), exc.detail
    if isinstance(exc, SlurmVllmError):
        return Stage.FAILED, str(exc)
    return Stage.FAILED, f"{type(exc).__name__}: {exc}"


SRUN_TASK_DEATH = re.compile(r"^srun: error: (\S+): task (\d+): (.+)$", re.M)


def task_death(batch_output: str) -> str:
    """Why srun stopped this task when no one cancelled the job: the task that died first, as srun
    reported it in the batch step's output (`srun: error: node2: task 1: Killed`)."""
    found = SRUN_TASK_DEATH.search(batch_output)
    if found:
        node, task, what = found.groups()
        return (f"{node}: the node program of rank {task} ended ({what.strip()}); srun stopped the job "
                f"step (killed by the OOM killer or a signal? see logs/task-{task}.out)")
    return "a task of the job step ended and srun stopped the others: see logs/task-*.out"


def redact(text: str, secrets: list[str]) -> str:
    """TEXT with every one of SECRETS (values of 4 characters or more) replaced by `***`: a log tail
    copied into the stage or a failure file never carries a secret the job was given."""
    for value in sorted(secrets, key=len, reverse=True):
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def cancel_or_task_death(stage: Stage, detail: str, job_running: bool,
                         output: Callable[[], str]) -> tuple[Stage, str]:
    """The head heard a stop (CANCELLED). If Slurm still runs the job, it was no scancel: srun ended
    the step because a task died (the OOM killer, a node program killed): FAILED, with what srun
    said in the batch step's OUTPUT (read only then)."""
    if stage == Stage.CANCELLED and job_running:
        return Stage.FAILED, task_death(output())
    return stage, detail


def final_stage(stage: Stage, detail: str, failures: list[RankFailure]) -> tuple[Stage, str]:
    """The job's final stage, as the head writes it: a worker rank's failure wins over the head's
    own outcome (the head then only saw its consequence), unless the head failed itself."""
    if failures and stage != Stage.FAILED:
        return Stage.FAILED, str(failures[0])
    return stage, detail
