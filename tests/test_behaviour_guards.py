"""Behaviours a one-line change could break with no other unit test noticing (issue 27): secrets kept
out of failure lines, private folders under a loose umask, another user's port claim, the time-limit
signal, an array's worst end, sharded progress, one writer per output, a keep-alive the server
closed, a task death that is no cancel, replicated KV heads, Podman's removal, the watchdog's kill."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from slurm_vllm.batch.driver import BatchError, Driver
from slurm_vllm.core import plan, spec
from slurm_vllm.core.errors import ClusterError
from slurm_vllm.core.jobdir import JobDir
from slurm_vllm.core.jobsroot import link_job_id
from slurm_vllm.core.plan import Plan
from slurm_vllm.core.records import BatchProgress, Stage
from slurm_vllm.login import api
from slurm_vllm.node import portclaim
from slurm_vllm.node.container import Runtime
from slurm_vllm.node.jobenv import JobEnv
from slurm_vllm.node.rankenv import cancel_or_task_death, redact
from slurm_vllm.node.watchdog import reap

pytestmark = pytest.mark.unit
NOBODY = 65534
PLAN = Plan(name="j", nodes=2, gpus_per_node=1, tp=2, pp=1, served_name="m", model_path="/m", vllm_args=(),
            gcs_port=None, api_port=None, ready_timeout=60, api_key=True)


RANKS: list[Any] = []          # every Head made here: its watchdog (a process) is disarmed after the test


@pytest.fixture(autouse=True)
def _disarm_watchdogs() -> Iterator[None]:
    yield
    while RANKS:
        RANKS.pop().watchdog.done()


def head_rank(tmp_path: Path) -> Any:
    """Rank 0 of a job whose spec has a secret_env file, in a real job folder."""
    from slurm_vllm.node.head import Head

    tmp_path.mkdir(parents=True, exist_ok=True)
    secret = tmp_path / "hf_token"
    secret.write_text("hf_secretvalue123\n")
    data = {"name": "j", "model": {"path": "/m"}, "slurm": {"nodes": 2, "gpus_per_node": 1},
            "container": {"runtime": "none"}, "secret_env": {"HF_TOKEN": str(secret)}}
    jd = JobDir(tmp_path / "j-1")
    jd.create(yaml.safe_dump(data), PLAN.to_json(), api_key=True)
    job = JobEnv(rank=0, job_id=1, hosts=("node1", "node2"), cpus=2, gpus=("0",))
    rank = Head(jd, job)
    RANKS.append(rank)
    return rank


def test_a_failure_line_never_carries_the_api_key_the_ray_token_or_a_secret_env_value(tmp_path: Path) -> None:
    from slurm_vllm.core.plan import ports
    from slurm_vllm.node.netid import Identity

    rank = head_rank(tmp_path)
    rank.env = rank.environment(Identity("node1", "10.0.0.1", "eth0", "10.0.0.1"), ports(rank.plan, 1))
    key = rank.jd.api_key.read_text().strip()
    token = rank.jd.ray_token.read_text().strip()
    found = rank.secret_values()
    assert {key, token, "hf_secretvalue123"} <= set(found)
    said = redact(f"vllm exited: 401 for Bearer {key}; token {token}; HF hf_secretvalue123", found)
    assert key not in said and token not in said and "hf_secretvalue123" not in said
    assert said.count("***") == 3


def test_the_by_id_folder_is_private_under_a_loose_umask(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    old = os.umask(0o022)
    try:
        link_job_id(tmp_path / "jobs", "77", tmp_path / "jobs" / "j-77")
    finally:
        os.umask(old)
    assert (tmp_path / "jobs" / "by-id").stat().st_mode & 0o777 == 0o700


def test_another_users_live_claim_is_never_taken() -> None:
    """A rank run as `nobody` finds a claim held by a live process of root's (this test): os.kill(pid,
    0) raises PermissionError there, which means alive. The claim is not taken, even where nothing
    else would stop it (a claims folder without the sticky bit, so the file could be removed)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="svt-claims-", dir="/tmp"))
    folder.chmod(0o777)
    try:
        (folder / "block-20000").write_text(f"999 {os.getpid()}\n")       # root's live process
        lib = folder / "lib"             # the module itself (stdlib only), where `nobody` can read it
        lib.mkdir(mode=0o755)
        shutil.copy(portclaim.__file__, lib / "portclaim.py")
        code = ("import sys; from pathlib import Path; from portclaim import PortClaims; "
                "print(PortClaims(1, Path(sys.argv[1])).claim(20000))")
        out = subprocess.run(["/usr/bin/python3", "-c", code, str(folder)], user=NOBODY, group=NOBODY,
                             capture_output=True, text=True, env={"PYTHONPATH": str(lib)}, cwd="/")
        assert out.stdout.strip() == "False", out
        assert (folder / "block-20000").read_text() == f"999 {os.getpid()}\n"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_time_limit_signal_reads_as_timeout_and_scancel_as_cancelled(tmp_path: Path) -> None:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)}
    try:
        for sig, reason in ((signal.SIGUSR2, "TIMEOUT"), (signal.SIGTERM, "CANCELLED")):
            rank = head_rank(tmp_path / reason)
            rank.install_signals()
            os.kill(os.getpid(), sig)
            assert rank.stop.wait(5) and rank.stop_reason == reason
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def shard(tmp_path: Path, name: str, stage: Stage, progress: BatchProgress | None = None) -> api.Job:
    jd = JobDir(tmp_path / name)
    jd.create("name: j\n", PLAN.to_json(), api_key=False)
    jd.write_stage(stage, f"{stage.value.lower()} detail")
    if progress is not None:
        jd.write(jd.batch, progress)
    return api.Job(jd)


def test_an_array_ends_as_its_worst_shard(tmp_path: Path) -> None:
    shards = [shard(tmp_path, f"b_{k}", stage) for k, stage in
              enumerate((Stage.DONE, Stage.CANCELLED, Stage.FAILED))]
    st = api.ArrayJob("9", shards).status()
    assert st.stage == Stage.FAILED and "failed detail" in st.detail, st


def test_sharded_progress_is_not_finished_while_a_shard_has_not_reported(tmp_path: Path) -> None:
    done = BatchProgress(output=str(tmp_path / "o.parts" / "part-0-of-2.jsonl"), total=5, done=5, resumed=0,
                         ok=5, refused=0, lost=0, in_flight=0, tokens_in=0, tokens_out=0, elapsed=1.0,
                         rate=5.0, finished=True)
    shards = [shard(tmp_path, "b_0", Stage.DONE, done), shard(tmp_path, "b_1", Stage.LOADING)]
    st = api.ArrayJob("9", shards).status()
    assert st.batch is not None and not st.batch.finished and st.stage == Stage.LOADING


class Server:
    """A real HTTP server answering every POST with 200 after HOLD is set; CLOSE: it closes each
    kept-alive connection after its answer without saying so (as servers do when idle)."""

    def __init__(self, close: bool = False) -> None:
        self.hold = threading.Event()
        self.hold.set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                server.hold.wait()
                data = b'{"choices": [{"text": "ok"}]}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()
                if close:
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.hold.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def batch_input(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"custom_id": f"c{i}", "url": "/v1/completions",
                                        "body": {"prompt": "p", "max_tokens": 1}}) + "\n" for i in range(n)))
    return path


def test_one_output_has_one_writer(tmp_path: Path) -> None:
    """A second driver on an output a running driver writes is refused: the lock is exclusive."""
    server = Server()
    server.hold.clear()                                  # the first driver's requests wait
    inp, out = batch_input(tmp_path / "in.jsonl", 4), tmp_path / "out.jsonl"
    first = Driver(server.url, None, inp, out, "m", 2, threading.Event())
    runner = threading.Thread(target=first.run)
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while first.counts["in_flight"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(BatchError, match="is being written by another job"):
            Driver(server.url, None, inp, out, "m", 2, threading.Event()).run()
        fd = os.open(out, os.O_RDONLY)
        try:                                             # and it is held exclusively: no shared lock
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    finally:
        server.close()
        runner.join(10)


def test_a_keep_alive_connection_the_server_closed_is_opened_again(tmp_path: Path) -> None:
    server = Server(close=True)
    try:
        progress = Driver(server.url, None, batch_input(tmp_path / "in.jsonl", 20), tmp_path / "out.jsonl",
                          "m", 2, threading.Event()).run()
    finally:
        server.close()
    assert progress.finished and progress.ok == 20 and progress.lost == 0, progress


def test_a_task_killed_while_the_job_runs_is_a_failure_not_a_cancel() -> None:
    said = "srun: error: node2: task 1: Killed"
    assert cancel_or_task_death(Stage.CANCELLED, "stopped", True, lambda: said)[0] == Stage.FAILED
    cancelled = cancel_or_task_death(Stage.CANCELLED, "stopped", False, lambda: said)
    assert cancelled == (Stage.CANCELLED, "stopped")


def test_fewer_kv_heads_than_tensor_parallel_ranks_is_valid_by_replication() -> None:
    s = spec.parse({"name": "t", "model": {"path": "/m"}, "slurm": {"nodes": 1, "gpus_per_node": 4},
                    "parallelism": {"tensor": 4, "pipeline": 1}})
    made = plan.make(s, {"num_attention_heads": 32, "num_key_value_heads": 2, "num_hidden_layers": 8})
    assert made.tp == 4
    with pytest.raises(Exception, match="KV heads"):
        plan.make(s, {"num_attention_heads": 32, "num_key_value_heads": 3, "num_hidden_layers": 8})


def test_podman_removes_without_waiting_for_the_main_program() -> None:
    """By teardown the programs had their SIGTERM and grace: `podman rm` must not wait again (its
    default waits 10 s per container; a headless vLLM outlived 5 s), as `docker rm --force`."""
    c = spec.parse({"name": "t", "model": {"path": "/m"}, "container": {"runtime": "podman", "image": "i"}})
    argv = Runtime(c.container, "slurm-vllm-1-0", Path("/e"), (), ("0",)).remove(("",))
    assert argv is not None and argv[:3] == ["podman", "rm", "--force"]
    assert "--time" in argv and argv[argv.index("--time") + 1] == "0"


def test_the_watchdog_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    child = subprocess.Popen(["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done"],
                             start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"     # the trap is set
        reap([child.pid], [], grace=0.5)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()


def test_a_rank_reads_a_secret_env_file_as_the_user_keeps_it(tmp_path: Path) -> None:
    """A user's own token file (0644 in their home is common) is read; a FIFO is refused, not waited on."""
    rank = head_rank(tmp_path)
    Path(rank.spec.secret_env["HF_TOKEN"]).chmod(0o644)
    assert rank.secrets() == {"HF_TOKEN": "hf_secretvalue123"}
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    rank.spec.secret_env["HF_TOKEN"] = str(fifo)
    with pytest.raises(ClusterError, match="not a regular file"):
        rank.secrets()
