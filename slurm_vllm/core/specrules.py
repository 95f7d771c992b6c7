"""The spec's rules across keys: value ranges, paths, the names of secrets, options slurm_vllm manages.

spec.parse runs `check` on every decoded spec; the type of each key alone is the decoder's (decode.py).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import TYPE_CHECKING

from slurm_vllm.core import pyxis
from slurm_vllm.core.decode import show as _show
from slurm_vllm.core.errors import SpecError

if TYPE_CHECKING:
    from slurm_vllm.core.spec import JobSpec

# Bounds that keep a typo from turning into a hang (the plan factors nodes x GPUs) or a monster job.
MAX_NODES = 4096


MAX_GPUS_PER_NODE = 64


MAX_CPUS_PER_TASK = 4096


SLURM_TIME = r"UNLIMITED|INFINITE|-1|\d{1,7}(:\d{1,2}){0,2}|\d{1,4}-\d{1,2}(:\d{1,2}){0,2}"   # sbatch --time


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
    "data_parallel_size": "parallelism.data (replicas, each its own server, behind one endpoint)",
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


def check(spec: JobSpec) -> None:
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
        if c.runtime == "pyxis" and pyxis.managed(option):
            raise SpecError(f"container.options[{i}]: {_show(option)}: set by slurm_vllm on every Pyxis "
                            f"step (image, name, mounts, environment, the step's node); allowed are srun's "
                            f"and Pyxis's other options, e.g. --container-writable, --container-remap-root")
    if c.runtime == "pyxis" and c.image and c.image.startswith(("./", "../")):
        raise SpecError(f"container.image: {_show(c.image)}: a squashfs file must be an absolute path "
                        f"(the nodes resolve it in their own working directory)")
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
        if b != type(b)():                # anything but the defaults
            raise SpecError("batch: only with mode: batch (mode is serve)")
        return
    if not b.input:
        raise SpecError("batch.input: required with mode: batch (the OpenAI batch file, JSONL)")
    for key in ("input", "output"):
        value = getattr(b, key)
        if value is not None and not Path(value).expanduser().is_absolute():
            raise SpecError(f"batch.{key}: {_show(value)} must be an absolute path (or start with ~)")
    limits = [("concurrency", 1, 4096, " or auto"), ("prefix_window", 0, 1_000_000, " (0: input order)"),
              ("max_jobs", 1, 100, ""), ("shards", 1, 1000, " (the job array's size)")]
    for key, low, high, what in limits[b.concurrency == "auto":]:
        if not low <= getattr(b, key) <= high:
            raise SpecError(f"batch.{key}: must be {low}-{high}{what}, got {getattr(b, key)}")


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
    values: dict[str, object] = {
        "model.path": spec.model.path, "model.served_name": spec.model.served_name,
        "container.image": spec.container.image, "slurm.python": spec.slurm.python,
        **{f"container.binds[{i}]": bind for i, bind in enumerate(spec.container.binds)},
        **{f"vllm.args.{key}": arg for key, arg in spec.vllm.args.items()}}
    for where, value in values.items():
        if isinstance(value, str) and value.startswith("-"):
            raise SpecError(f"{where}: {_show(value)} may not start with '-' (it would be read as an option)")
