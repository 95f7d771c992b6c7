"""What runs on the node, its pure parts: the Slurm environment, a rank's env, ports, the final stage."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from slurm_vllm.core import plan, spec
from slurm_vllm.core.errors import ClusterError, ServeError
from slurm_vllm.core.records import RankFailure, RayNode, Stage
from slurm_vllm.node.container import env_file_text
from slurm_vllm.node.jobenv import JobEnv
from slurm_vllm.node.netid import Identity, identity
from slurm_vllm.node.portclaim import PortClaims
from slurm_vllm.node.probes import parse_ray_nodes, port_free
from slurm_vllm.node.rankenv import (
    Stopped,
    choose_ports,
    environment,
    final_stage,
    outcome,
    redact,
    server_environment,
    task_death,
)

pytestmark = pytest.mark.unit
IDENT = Identity("node2", "10.78.0.12", "eth1", "10.78.0.11")


def make_spec(runtime: str = "docker", **extra: object) -> spec.JobSpec:
    data: dict[str, object] = {
        "name": "t", "model": {"path": "/m"}, "slurm": {"nodes": 2, "gpus_per_node": 1},
        "container": {"runtime": runtime, "image": "img" if runtime != "none" else None},
        "env": {"OMP_NUM_THREADS": "4", "QUOTED": "a 'b' $c"},
        "nccl": {"ib_hca": "mlx5_0", "debug": "WARN"}, **extra}
    return spec.parse(data)


SLURM_VARS = ("SLURM_PROCID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_CPUS_PER_TASK",
              "CUDA_VISIBLE_DEVICES",
              "SLURM_RESTART_COUNT", "SLURM_ARRAY_TASK_ID")


def job_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> JobEnv:
    """JobEnv.from_environ() in a process environment holding just VALUES of Slurm's variables."""
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return JobEnv.from_environ()


def test_job_env_reads_slurm_once(monkeypatch: pytest.MonkeyPatch) -> None:
    job = job_env(monkeypatch, SLURM_PROCID="1", SLURM_JOB_ID="77", SLURM_JOB_NODELIST="gpu[07-08],login2",
                  SLURM_CPUS_PER_TASK="16", CUDA_VISIBLE_DEVICES="0,1")
    assert job == JobEnv(rank=1, job_id=77, hosts=("gpu07", "gpu08", "login2"), cpus=16, gpus=("0", "1"))
    assert job.head_host == "gpu07"
    requeued = job_env(monkeypatch, SLURM_JOB_ID="77", SLURM_JOB_NODELIST="gpu07", SLURM_RESTART_COUNT="2")
    assert requeued.restart_count == 2 and job.restart_count == 0
    with pytest.raises(ClusterError, match="not inside a Slurm job: SLURM_JOB_ID, SLURM_JOB_NODELIST unset"):
        job_env(monkeypatch)
    with pytest.raises(ClusterError, match="SLURM_JOB_NODELIST 'gpu\\[07-': not a hostlist"):
        job_env(monkeypatch, SLURM_JOB_ID="77", SLURM_JOB_NODELIST="gpu[07-")


@pytest.mark.parametrize("runtime", ["none", "docker", "podman", "apptainer"])
def test_environment_of_a_worker_and_of_the_head(runtime: str, tmp_path: Path) -> None:
    s = make_spec(runtime)
    worker = environment(s, IDENT, tmp_path / "ray_token", {"HF_TOKEN": "hf_x"})
    assert worker["VLLM_HOST_IP"] == "10.78.0.12"
    assert worker["GLOO_SOCKET_IFNAME"] == worker["NCCL_SOCKET_IFNAME"] == "eth1"
    assert worker["RAY_AUTH_MODE"] == "token" and worker["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "ray_token")
    assert worker["NCCL_IB_HCA"] == "mlx5_0" and worker["OMP_NUM_THREADS"] == "4"
    assert worker["HF_TOKEN"] == "hf_x"
    assert worker["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] == "0"          # teardown does not wait 30 s
    assert worker["RAY_prestart_worker_first_driver"] == "0"       # no idle workers for the barrier watch
    own = environment(replace(s, env={**s.env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5"}), IDENT,
                      tmp_path / "ray_token", {})
    assert own["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] == "5"              # the spec's env wins
    assert "RAY_ADDRESS" not in worker and "VLLM_API_KEY" not in worker      # the key stays on the head
    head = environment(s, IDENT, tmp_path / "ray_token", {}, head_gcs=20064)
    assert head["RAY_ADDRESS"] == "10.78.0.12:20064" and "VLLM_API_KEY" not in head   # not in Ray's
    server = server_environment(head, "sk-1", tmp_path / "cfg")
    assert server == {**head, "VLLM_API_KEY": "sk-1", "VLLM_CONFIG_ROOT": str(tmp_path / "cfg")}
    assert server_environment(head, None, tmp_path / "cfg") == head
    text = env_file_text(worker)
    line = next(x for x in text.splitlines() if x.startswith("QUOTED="))
    # One syntax for every runtime: shell assignments, which the containers' sh wrapper reads.
    assert line == "QUOTED='a '\"'\"'b'\"'\"' $c'"


def test_redact_removes_every_secret_longest_first() -> None:
    text = "vllm exited: bad key sk-abcdef (token sk-abcdef-long) hf_x"
    got = redact(text, ["sk-abcdef", "sk-abcdef-long", "hf_x", "ab"])
    assert got == "vllm exited: bad key *** (token ***) ***"


def make_plan(**changes: object) -> plan.Plan:
    p = plan.make(make_spec(), model_config={})
    return plan.Plan(**{**p.__dict__, **changes})


def test_ports_move_to_the_next_block_while_taken() -> None:
    p = make_plan()
    first = plan.ports(p, 1234)
    taken = {first.gcs, plan.ports(p, 1234, 1).max_worker}     # one port in each of the first two blocks
    got = choose_ports(p, 1234, lambda port: port not in taken)
    assert got == plan.ports(p, 1234, 2)
    assert choose_ports(p, 1234, lambda port: True) == first


def test_ports_wrap_below_the_ephemeral_range() -> None:
    p = make_plan()
    last = plan.ports(p, plan.SLOTS - 1)
    assert last.max_worker < 32768
    assert plan.ports(p, plan.SLOTS) == plan.ports(p, 0)                # job ids wrap around the slots


def test_a_fixed_port_that_is_taken_fails_at_once_and_none_free_fails() -> None:
    fixed = make_plan(gcs_port=6379)
    with pytest.raises(ClusterError, match="port 6379 is taken"):
        choose_ports(fixed, 5, lambda port: port != 6379, "node1")
    with pytest.raises(ClusterError, match="node1: no free port block"):
        choose_ports(make_plan(), 5, lambda port: False, "node1")


def test_port_free_sees_a_bound_port() -> None:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        assert not port_free(s.getsockname()[1])


@pytest.mark.parametrize(("exc", "reason", "stage", "detail"), [
    (None, "", Stage.DONE, ""),
    (Stopped("stop"), "", Stage.CANCELLED, ""),
    (Stopped("stop"), "TIMEOUT", Stage.TIMEOUT, ""),
    (ServeError("/v1/models answered 500: x"), "", Stage.FAILED, "/v1/models answered 500: x"),
    (KeyError("head"), "", Stage.FAILED, "KeyError: 'head'"),
])
def test_outcome(exc: BaseException | None, reason: str, stage: Stage, detail: str) -> None:
    assert outcome(exc, reason) == (stage, detail)


def test_final_stage_a_worker_failure_wins_unless_the_head_failed() -> None:
    failure = RankFailure(1, "node2", "ray-worker exited (code 1)")
    assert final_stage(Stage.CANCELLED, "", [failure]) == (
        Stage.FAILED, "rank 1 on node2: ray-worker exited (code 1)")
    assert final_stage(Stage.FAILED, "vllm exited", [failure]) == (Stage.FAILED, "vllm exited")
    assert final_stage(Stage.READY, "", []) == (Stage.READY, "")


def test_ray_probe_output() -> None:
    out = 'some warning\n[{"ip": "10.77.0.11", "gpus": 1.0}, {"ip": "10.77.0.12", "gpus": 1}]\n'
    assert parse_ray_nodes(out) == (RayNode("10.77.0.11", 1.0), RayNode("10.77.0.12", 1.0))
    assert parse_ray_nodes("") is None and parse_ray_nodes("Traceback ...") is None
    log = ('--- 2026-11-30 00:00:00 ray-watch: sh ...\n[{"ip": "10.77.0.11", "gpus": 1}]\n'
           '[{"ip": "10.77.0.11", "gpus": 1}, {"ip": "10.77.0.12", "gpus": 1}]\n2026 WARNING something\n')
    assert parse_ray_nodes(log) == (RayNode("10.77.0.11", 1.0), RayNode("10.77.0.12", 1.0))  # the last answer


def test_identity_on_an_interface_of_this_host() -> None:
    ident = identity("localhost", "lo")
    assert (ident.ip, ident.interface) == ("127.0.0.1", "lo")
    with pytest.raises(ClusterError, match=r"nosuch0 has no IPv4 address on .*\(interfaces here: "):
        identity("localhost", "nosuch0")


def test_a_fixed_vllm_port_inside_the_block_moves_the_block() -> None:
    first = plan.ports(make_plan(), 1234)
    p = make_plan(api_port=first.min_worker + 3)             # on one of the block's Ray worker ports
    got = choose_ports(p, 1234, lambda port: True)
    assert got.api == first.min_worker + 3 and got.api not in range(got.min_worker, got.max_worker + 1)
    assert len(got.all()) == len(set(got.all()))


def _choose_in_parallel(job_id: int, folder: str, barrier: Any, out: Any) -> None:
    claims = PortClaims(job_id, Path(folder))
    barrier.wait()
    out.put((job_id, choose_ports(make_plan(), job_id, lambda port: True, claim=claims.claim).min_worker))
    barrier.wait()      # alive until both chose, as a rank is: a dead rank's claim may be taken over


def test_two_jobs_starting_together_claim_different_blocks(tmp_path: Path) -> None:
    """Job ids 10 and 10 + SLOTS map to the same block: two real processes choose at the same
    moment; the claim files make them take different blocks."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_choose_in_parallel, args=(j, str(tmp_path), barrier, out))
             for j in (10, 10 + plan.SLOTS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    got = dict(out.get(timeout=5) for _ in procs)
    assert plan.ports(make_plan(), 10).min_worker in got.values()
    assert len(set(got.values())) == 2, got


def test_a_claim_of_a_dead_rank_is_taken_over_and_released_at_the_end(tmp_path: Path) -> None:
    (tmp_path / "block-20016").write_text(f"99 {2**22 + 7}\n")   # above pid_max's default: never alive
    mine = PortClaims(5, tmp_path)
    assert mine.claim(20016) and (tmp_path / "block-20016").read_text().split()[0] == "5"
    other = PortClaims(6, tmp_path)
    assert not other.claim(20016)                                 # held by a live rank (this process)
    mine.release()
    assert not (tmp_path / "block-20016").exists() and other.claim(20016)


def test_task_death_names_the_node_and_rank_srun_reported() -> None:
    out = ("slurmstepd-node1: error: couldn't chdir to `/x': going to /tmp instead\n"
           "srun: error: node2: task 1: Killed\nsrun: launch/slurm: _step_signal: Terminating StepId=8.0\n")
    assert task_death(out).startswith("node2: the node program of rank 1 ended (Killed); srun stopped")
    assert "logs/task-*.out" in task_death("")


def test_log_tails_in_messages_have_no_colour_codes() -> None:
    from slurm_vllm.core.proc import _tail

    text = "a\n\n\x1b[36m(RayWorkerProc pid=1, ip=10.0.0.2)\x1b[0m boom\n"
    assert _tail(text, 5) == "a\n(RayWorkerProc pid=1, ip=10.0.0.2) boom"


def test_teardown_kills_the_orphans_of_a_child_that_died(tmp_path: Path) -> None:
    """A child killed outright (kill -9 of a worker's `vllm serve`) leaves its own children, in its
    process group, as orphans: terminate_all still ends the whole group, at once."""
    import os
    import signal
    import time

    from slurm_vllm.core import proc

    pid_file = tmp_path / "orphan"
    child = proc.spawn("vllm", ["sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], tmp_path / "log")
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text().endswith("\n"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    orphan = int(pid_file.read_text())
    os.kill(child.popen.pid, signal.SIGKILL)
    child.popen.wait(5)
    assert proc.group_alive(child.popen.pid)                    # the orphan lives on in the group
    t0 = time.monotonic()
    proc.terminate_all([child], timeout=10)
    assert time.monotonic() - t0 < 5                            # SIGTERM was enough: no 10 s grace spent

    def gone() -> bool:
        try:
            return Path(f"/proc/{orphan}/stat").read_text().split()[2] == "Z"   # dead, till init reaps it
        except OSError:
            return True

    while not gone():
        assert time.monotonic() - t0 < 9, f"orphan {orphan} still running"
        time.sleep(0.05)


def test_rays_autoscaler_monitor_listens_on_the_jobs_own_port(tmp_path: Path) -> None:
    """Ray's monitor binds 44217 on every head unless told: two jobs' heads on one node collided
    there. Each job gives it a port of its block, probed free with the others."""
    s = make_spec("none")
    p1, p2 = (plan.ports(plan.make(s, {}), job) for job in (1, 2))
    assert p1.autoscaler_metrics != p2.autoscaler_metrics and 44217 not in (p1.autoscaler_metrics,
                                                                           p2.autoscaler_metrics)
    assert p1.autoscaler_metrics in p1.all()
    env = environment(s, IDENT, tmp_path / "t", {}, head_gcs=p1.gcs, autoscaler_metrics=p1.autoscaler_metrics)
    assert env["AUTOSCALER_METRIC_PORT"] == str(p1.autoscaler_metrics)
