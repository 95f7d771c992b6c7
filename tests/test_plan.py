"""TP×PP planning, vLLM flags and port blocks (pure)."""

from __future__ import annotations

import dataclasses

import pytest

from slurm_vllm.core import plan, spec
from slurm_vllm.core.errors import PlanError, SpecError

pytestmark = pytest.mark.unit
LLAMA_70B = {"num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80}


def make_spec(nodes: int, gpus: int, tensor: object = "auto", pipeline: object = "auto") -> spec.JobSpec:
    return spec.parse({"name": "t", "model": {"path": "/nonexistent"}, "slurm": {"nodes": nodes,
                       "gpus_per_node": gpus}, "parallelism": {"tensor": tensor, "pipeline": pipeline}})


@pytest.mark.parametrize(("nodes", "gpus", "tensor", "pipeline", "tp", "pp"), [
    (1, 8, "auto", "auto", 8, 1),
    (2, 8, "auto", "auto", 8, 2),       # vLLM's documented option: TP = GPUs per node, PP = nodes
    (2, 8, 16, 1, 16, 1),               # the other one: TP across both nodes
    (2, 8, 16, "auto", 16, 1),
    (2, 8, "auto", 1, 16, 1),
    (4, 4, "auto", "auto", 4, 4),
    (4, 4, 8, "auto", 8, 2),
    (2, 1, "auto", "auto", 1, 2),
    (2, 1, 2, 1, 2, 1),
])
def test_tp_pp_table(nodes: int, gpus: int, tensor: object, pipeline: object, tp: int, pp: int) -> None:
    assert plan.choose_parallel(make_spec(nodes, gpus, tensor, pipeline)) == plan.Parallel(tp, pp)


def test_bad_product_lists_valid_factorizations() -> None:
    with pytest.raises(PlanError) as info:
        plan.choose_parallel(make_spec(2, 4, 4, 4))
    text = str(info.value)
    assert "= 2x4 = 8 GPUs, got tensor=4, pipeline=4" in text
    assert "valid choices: TP1xPP8, TP2xPP4, TP4xPP2, TP8xPP1" in text
    with pytest.raises(PlanError, match="valid choices"):
        plan.choose_parallel(make_spec(2, 4, 3))


def test_model_config_checks_heads_and_layers() -> None:
    assert plan.choose_parallel(make_spec(2, 8), LLAMA_70B) == plan.Parallel(8, 2)
    with pytest.raises(PlanError, match=r"6 attention heads do not divide by 4.*TP1xPP4, TP2xPP2"):
        plan.choose_parallel(make_spec(1, 4), {"num_attention_heads": 6, "num_hidden_layers": 30})
    with pytest.raises(PlanError, match="the model has only 2 layers"):
        plan.choose_parallel(make_spec(4, 1), {"num_attention_heads": 4, "num_hidden_layers": 2})


def test_vllm_flags_and_managed_keys() -> None:
    assert plan.vllm_flags({"max_model_len": 256, "enforce_eager": True, "trust_remote_code": False}) == (
        "--max-model-len", "256", "--enforce-eager")
    # a batch's API server logs no line per request, unless the spec says otherwise
    assert plan.vllm_flags({"max-model-len": 256}, "batch") == (
        "--disable-uvicorn-access-log", "--max-model-len", "256")
    assert plan.vllm_flags({"disable-uvicorn-access-log": False}, "batch") == ()
    assert plan.vllm_flags({"disable_uvicorn_access_log": True}, "batch") == ("--disable-uvicorn-access-log",)
    for key in ("tensor_parallel_size", "api_key", "port", "host"):     # refused at load, by spec
        with pytest.raises(SpecError, match=f"vllm.args.{key}: set by slurm_vllm"):
            spec.parse({"name": "t", "model": {"path": "/m"}, "vllm": {"args": {key: 1}}})


def test_port_blocks_do_not_overlap_and_avoid_ray_and_ephemeral_ranges() -> None:
    p = plan.make(make_spec(2, 1))
    blocks = [set(plan.ports(p, job).all()) for job in range(plan.SLOTS)]
    assert all(not (a & b) for i, a in enumerate(blocks) for b in blocks[i + 1:])
    everything = set().union(*blocks)
    assert min(everything) >= 20000 and max(everything) < 32768
    assert plan.ports(p, 7, attempt=1) == plan.ports(p, 8)


def test_ray_and_vllm_argv() -> None:
    p = plan.make(make_spec(2, 1))
    ports = plan.ports(p, 3)
    head = plan.ray_argv(p, ports, "10.0.0.1", None, 4)
    assert "--head" in head and f"--port={ports.gcs}" in head and "--include-dashboard=false" in head
    worker = plan.ray_argv(p, ports, "10.0.0.2", "10.0.0.1:20192", 4)
    assert "--address=10.0.0.1:20192" in worker and "--head" not in worker
    assert "--node-ip-address=10.0.0.2" in worker and "--num-gpus=1" in worker
    serve = plan.vllm_argv(p, "10.0.0.1", ports.api)
    assert serve[:3] == ["vllm", "serve", "/nonexistent"]
    assert serve[serve.index("--pipeline-parallel-size") + 1] == "2"
    assert "--api-key" not in serve
    assert serve[serve.index("--distributed-executor-backend") + 1] == "ray" and "--nnodes" not in serve


def test_the_mp_backend_runs_vllms_own_launcher_on_every_node() -> None:
    """backend mp: node rank 0 serves the API with --nnodes/--node-rank/--master-addr/--master-port;
    the other nodes run the same headless (no --host/--port: they serve no API)."""
    s = spec.parse({"name": "t", "model": {"path": "/m"}, "slurm": {"nodes": 2, "gpus_per_node": 1},
                    "parallelism": {"tensor": 2, "pipeline": 1}, "backend": "mp",
                    "vllm": {"args": {"max_model_len": 256}}})
    p = plan.make(s)
    assert p.backend == "mp"
    head = plan.vllm_argv(p, "10.0.0.1", 8000, master=("10.0.0.1", 20100), node_rank=0)
    assert head[head.index("--distributed-executor-backend") + 1] == "mp"
    assert " ".join(head).endswith("--nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 20100 "
                                   "--host 10.0.0.1 --port 8000 --max-model-len 256")
    worker = plan.vllm_argv(p, "10.0.0.2", 0, master=("10.0.0.1", 20100), node_rank=1)
    assert " ".join(worker).endswith("--node-rank 1 --master-addr 10.0.0.1 --master-port 20100 --headless "
                                     "--max-model-len 256")
    assert "--host" not in worker and "--port" not in worker
    with pytest.raises(ValueError, match="master"):
        plan.vllm_argv(p, "10.0.0.1", 8000)


@pytest.mark.parametrize(("nodes", "data", "given", "chosen"), [
    (1, 1, {}, "mp"),                 # a server within one node: vLLM's own executor
    (2, 1, {}, "ray"),                # across nodes: Ray
    (2, 2, {}, "mp"),                 # two replicas of one node each
    (4, 2, {}, "ray"),                # two replicas of two nodes each
    (1, 1, {"backend": "ray"}, "ray"),
    (2, 1, {"backend": "mp"}, "mp"),
])
def test_backend_auto_is_vllms_own_executor_within_one_node_and_ray_across(
        nodes: int, data: int, given: dict[str, str], chosen: str) -> None:
    s = spec.parse({"name": "t", "model": {"path": "/nonexistent"}, "parallelism": {"data": data},
                    "slurm": {"nodes": nodes, "gpus_per_node": 2}, **given})
    assert s.backend == given.get("backend", "auto")
    p = plan.make(s, {})
    assert p.backend == chosen
    serve = plan.vllm_argv(p, "10.0.0.1", 8000, master=("10.0.0.1", 9000), node_rank=0)
    assert serve[serve.index("--distributed-executor-backend") + 1] == chosen


def replicas_spec(nodes: int, gpus: int, data: int, **par: object) -> spec.JobSpec:
    return spec.parse({"name": "t", "model": {"path": "/nonexistent"}, "slurm": {"nodes": nodes,
                       "gpus_per_node": gpus}, "parallelism": {"data": data, **par}})


@pytest.mark.parametrize(("nodes", "gpus", "data", "par", "tp", "pp", "per"), [
    (2, 1, 2, {}, 1, 1, 1),                       # R=2 x TP1 on a node each
    (3, 1, 3, {}, 1, 1, 1),
    (4, 2, 2, {}, 2, 2, 2),                       # R=2 x (TP2 x PP2 over 2 nodes)
    (4, 2, 2, {"tensor": 4}, 4, 1, 2),            # R=2 x TP4 over 2 nodes
    (4, 8, 4, {}, 8, 1, 1),
])
def test_replicas_split_the_allocation_into_servers_of_whole_nodes(
        nodes: int, gpus: int, data: int, par: dict[str, object], tp: int, pp: int, per: int) -> None:
    p = plan.make(replicas_spec(nodes, gpus, data, **par), {})
    assert (p.replicas, p.replica_nodes, p.tp, p.pp) == (data, per, tp, pp)
    # rank r of the allocation is rank r % per of replica r // per
    assert [p.replica_of(r) for r in range(nodes)] == [divmod(r, per) for r in range(nodes)]
    mp = dataclasses.replace(p, backend=plan.Backend.MP)     # vLLM's own launcher spans one replica
    argv = plan.vllm_argv(mp, "10.0.0.1", 8000, master=("10.0.0.1", 9000), node_rank=0)
    assert argv[argv.index("--nnodes") + 1] == str(per)


def test_replicas_that_do_not_divide_list_the_valid_choices() -> None:
    with pytest.raises(PlanError) as info:
        plan.make(replicas_spec(4, 8, 3), {})
    assert "parallelism.data=3: each replica needs whole nodes of its own" in str(info.value)
    assert "valid choices: 1, 2, 4" in str(info.value)
    with pytest.raises(PlanError) as info:
        plan.make(replicas_spec(4, 2, 2, tensor=8), {})      # one replica has 2 nodes x 2 GPUs = 4
    assert "one replica's GPUs" in str(info.value) and "= 2x2 = 4 GPUs" in str(info.value)
    assert "valid choices: TP1xPP4, TP2xPP2, TP4xPP1" in str(info.value)
    with pytest.raises(PlanError, match=r"parallelism\.data: must be >= 1"):
        plan.make(replicas_spec(2, 1, 0), {})


def test_replicas_refuse_what_they_do_not_run_yet() -> None:
    data = {"name": "t", "model": {"path": "/m"}, "slurm": {"nodes": 2}, "parallelism": {"data": 2}}
    with pytest.raises(PlanError, match=r"with batch\.shards=2: choose one"):
        plan.make(spec.parse({**data, "mode": "batch", "batch": {"input": "/in.jsonl", "shards": 2}}), {})
    batch = plan.make(spec.parse({**data, "mode": "batch", "batch": {"input": "/in.jsonl"}}), {})
    assert (batch.replicas, batch.mode) == (2, plan.Mode.BATCH)
    with pytest.raises(PlanError, match="run the preflight with one replica's nodes"):
        plan.make(spec.parse({**data, "preflight": True}), {})
