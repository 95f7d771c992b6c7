"""e2e: batch mode on the test bed (real Slurm, Ray, vLLM): a JSONL of requests in, results out,
the job ends by itself; cancel and resume; the time limit continued in a requeued run."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from slurm_vllm.batch.merge import shard_of

from .support.cli import cli, status, wait_stage
from .support.reference import greedy_chat, greedy_completion
from .support.slurm import SLURM_PERIOD, end_soon
from .support.specs import derive
from .test_failures_e2e import wait_final, wait_released
from .test_serve_e2e import logs

pytestmark = pytest.mark.e2e
QUESTION = "What is a slurm node?"
# The time-limit test makes Slurm's SIGUSR2 come at its next periodic check (every 30 s) once the batch
# is sending: run 1 sends for at most ~35 s, whatever the host's speed. This input outlasts that on a
# host twice as fast as the fastest one seen (~175 req/s at max_tokens 16, concurrency 8: 8,000 took
# 46 s); a slow host (~50 req/s) sends it in about 4 minutes over both runs.
TIME_LIMIT_REQUESTS = 12000
# The cancel test stops a batch at its 30th line; lines still come while the cancel takes effect
# (~1 s: about 40 here at concurrency 4, max_tokens 32).
CANCEL_REQUESTS = 600


def chat(i: int, max_tokens: int = 8) -> dict[str, Any]:
    return {"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": f"{QUESTION} ({i})"}], "max_tokens": max_tokens,
                     "temperature": 0}}


def completion(i: int, max_tokens: int = 8) -> dict[str, Any]:
    return {"custom_id": f"text-{i}", "method": "POST", "url": "/v1/completions",
            "body": {"prompt": f"The number {i} is", "max_tokens": max_tokens, "temperature": 0}}


BAD = [  # valid batch lines that the server refuses: each must get a line with its status and error
    {"custom_id": "bad-max-tokens", "method": "POST", "url": "/v1/chat/completions",
     "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}},
    {"custom_id": "bad-too-long", "method": "POST", "url": "/v1/completions",
     "body": {"prompt": "word " * 400, "max_tokens": 4}},
    {"custom_id": "bad-messages", "method": "POST", "url": "/v1/chat/completions",
     "body": {"messages": "not a list", "max_tokens": 4}},
]


def batch_spec(folder: Path, name: str, requests: list[dict[str, Any]], **changes: Any) -> Path:
    """The batch test config as NAME, its input (REQUESTS) and output in FOLDER (on the shared file
    system), with CHANGES ({"slurm.time": "3"})."""
    (folder / "input.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    return derive(folder, "test-batch-tp2.yaml", name, **{"batch.input": str(folder / "input.jsonl"),
                                                         "batch.output": str(folder / "results.jsonl"),
                                                         **changes})


def requeue_time(job_id: str, deadline: float, run: int = 1) -> float:
    """When RUN ended by its requeue (sacct's End of that REQUEUED run; accounting is asynchronous)."""
    while True:
        rows = subprocess.run(["sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", "State,End"],
                              capture_output=True, text=True).stdout.split()
        ends = [row.split("|")[1] for row in rows if row.startswith("REQUEUED|")]
        if len(ends) >= run and ends[run - 1] not in ("Unknown", "None"):
            return datetime.datetime.fromisoformat(ends[run - 1]).timestamp()
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)


def start_requeued_now(job_id: str, deadline: float, run: int) -> None:
    """Test-bed shortcut (as the admin): once the requeued job is pending, make it eligible at once
    (Slurm holds a requeued job about 2 minutes) with 30 minutes. slurmd revokes the ended run's
    credential to the second: a start within that same second is refused ("Job credential revoked",
    the job FAILED), so the shortcut waits until the clock is past that second."""
    while subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                         text=True).stdout.strip() != "PENDING":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    requeued = requeue_time(job_id, deadline, run)
    while time.time() < requeued + 1.5:
        time.sleep(0.1)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now", "TimeLimit=30"], check=True)


def results(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def text_of(line: dict[str, Any]) -> str:
    choice = line["response"]["body"]["choices"][0]
    return str(choice["message"]["content"] if "message" in choice else choice["text"])


def test_a_batch_runs_to_its_end_with_a_line_for_every_request(testbed: dict[str, str],
                                                               job_dir: Path) -> None:
    """2 nodes, TP2 across them, 240 requests (chat, completions, 3 the server refuses): every
    custom_id once, refusals as lines with their status and error, a sample equal to the greedy
    reference, the job DONE by itself and the nodes idle."""
    requests = [chat(i) for i in range(120)] + [completion(i) for i in range(117)] + BAD
    spec = batch_spec(job_dir, "batch-main", requests, **{"batch.concurrency": "auto"})  # the defaults
    out = cli("validate", str(spec))
    assert out.returncode == 0 and "ok: batch input" in out.stdout and "240 requests" in out.stdout, out
    t0 = time.monotonic()
    out = cli("submit", str(spec), "--wait", "--json", timeout=900)
    job = json.loads(out.stdout.splitlines()[0])
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n" + logs(job["job_dir"])
    assert "batch: 240/240 done (237 ok, 3 refused this run)" in out.stderr, out.stderr
    lines = results(job_dir)
    ids = [line["custom_id"] for line in lines]
    assert len(ids) == len(set(ids)) == 240 and set(ids) == {r["custom_id"] for r in requests}
    refused = {line["custom_id"]: line for line in lines if line["error"] is not None}
    assert set(refused) == {r["custom_id"] for r in BAD}, sorted(refused)
    assert all(400 <= line["response"]["status_code"] < 500 and line["error"]["message"]
               for line in refused.values())
    by_id = {line["custom_id"]: line for line in lines}
    model = testbed["SLURM_VLLM_TEST_MODEL"]
    for i in (0, 57, 116):          # vLLM holds back a last partial UTF-8 character; the reference shows �
        want_chat = greedy_chat(model, f"{QUESTION} ({i})", 8).rstrip("\ufffd")
        want_text = greedy_completion(model, f"The number {i} is", 8).rstrip("\ufffd")
        assert (text_of(by_id[f"chat-{i}"]), text_of(by_id[f"text-{i}"])) == (want_chat, want_text)
    st = status(job["job_id"])
    assert st["stage"] == "DONE" and st["batch"]["finished"] and st["batch"]["total"] == 240, st
    stages = [line.split()[1] for line in (Path(job["job_dir"]) / "stage.log").read_text().splitlines()]
    assert stages[-3:] == ["READY", "BATCH", "DONE"], stages
    # concurrency auto read the server's own load over its Unix socket (vLLM's /metrics)
    said = (Path(job["job_dir"]) / "logs" / "task-0.out").read_text()
    assert "batch: concurrency auto: starting at 64, the server's load read from 1 /metrics" in said, said
    assert "metrics cannot be read" not in said, said
    wait_released(job["job_id"])
    print(f"batch of 240 on TP2 x 2 nodes: {time.monotonic() - t0:.0f} s from submit to DONE; "
          f"{st['batch']['rate']} req/s while sending")


def test_a_cancelled_batch_keeps_its_lines_and_a_resubmit_finishes_it(testbed: dict[str, str],
                                                                      job_dir: Path) -> None:
    """Cancel once 30 lines are written (the output is read directly: a line is flushed as it is
    written, while status reports every 2 s): the lines stay, each once; a resubmit sends only the
    rest. CANCEL_REQUESTS outlasts the cancel's own latency on hosts much faster than this one."""
    requests = [completion(i, max_tokens=32) for i in range(CANCEL_REQUESTS)]
    spec = batch_spec(job_dir, "batch-resume", requests, **{"slurm.nodes": 1, "parallelism.tensor": 1,
                                                          "batch.concurrency": 4})
    out = cli("submit", str(spec), "--json")
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    wait_stage(job["job_id"], ("BATCH",), 600)
    deadline = time.monotonic() + 120
    while (written := line_count(job_dir / "results.jsonl")) < 30:
        assert time.monotonic() < deadline, status(job["job_id"])
        time.sleep(0.1)
    assert cli("cancel", job["job_id"]).returncode == 0
    st, _ = wait_final(job["job_id"], 60)
    assert st["stage"] == "CANCELLED", st
    wait_released(job["job_id"])
    kept = [line["custom_id"] for line in results(job_dir)]
    assert 30 <= len(kept) < CANCEL_REQUESTS and len(kept) == len(set(kept)), (written, len(kept))
    out = cli("submit", str(spec), "--wait", "--json", timeout=900)
    again = json.loads(out.stdout.splitlines()[0])
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n" + logs(again["job_dir"])
    ids = [line["custom_id"] for line in results(job_dir)]
    assert len(ids) == len(set(ids)) == CANCEL_REQUESTS
    st = status(again["job_id"])
    assert st["batch"]["resumed"] == len(kept) and st["batch"]["ok"] == CANCEL_REQUESTS - len(kept), st
    wait_released(again["job_id"])
    print(f"cancel at {written} lines: {len(kept)} kept of {CANCEL_REQUESTS}; the resubmit sent the rest")


def line_count(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
    except FileNotFoundError:
        return 0


def test_a_batch_past_the_time_limit_goes_on_in_a_requeued_run(testbed: dict[str, str],
                                                              job_dir: Path) -> None:
    """A time limit that cannot hold the batch: at SIGUSR2 the first run stops sending, keeps its lines
    and requeues the job; the same job id and folder go on from there. Then an administrator requeues
    run 2 while it sends (`scontrol requeue`): the requests in flight as the engine stops are not
    results; run 3 sends them again and finishes, every custom_id once, no 5xx line.

    Independent of the host's speed: the job starts with room to load (20 minutes), and its limit is
    cut once the batch is sending (end_soon), so the signal comes while requests are still being sent
    however fast the host answers. Two more test-bed shortcuts, as the cluster's admin (the tests run as
    root): once the requeued job is pending, it is made eligible at once (Slurm holds a requeued job
    about 2 minutes) and given 30 minutes, so that the second run finishes whatever this machine's
    speed. SLURM_VLLM_TEST_SLOW_ENGINE=1 runs it with vLLM slowed (max_num_seqs 1), as on a slow host."""
    requests = [completion(i, max_tokens=16) for i in range(TIME_LIMIT_REQUESTS)]
    slow = {"vllm.args.max_num_seqs": 1} if os.environ.get("SLURM_VLLM_TEST_SLOW_ENGINE") == "1" else {}
    spec = batch_spec(job_dir, "batch-requeue", requests, **{
        "slurm.nodes": 1, "parallelism.tensor": 1, "batch.max_jobs": 3, "batch.concurrency": 8, **slow})
    out = cli("submit", str(spec), "--json")
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    job_id, folder = job["job_id"], Path(job["job_dir"])
    st = wait_stage(job_id, ("BATCH",), 600)
    limit = end_soon(job_id)
    cut = time.monotonic()
    deadline = cut + 4 * SLURM_PERIOD + 120
    log = folder / "stage.log"
    while not log.exists() or "PENDING time limit: " not in log.read_text():
        st = status(job_id)
        assert st["stage"] not in ("FAILED", "DONE", "CANCELLED", "TIMEOUT"), (
            f"{st}: the batch was not sending when the time limit came (TimeLimit cut to {limit} min "
            f"{time.monotonic() - cut:.0f} s ago); on a host this fast, raise TIME_LIMIT_REQUESTS")
        assert time.monotonic() < deadline, st
        time.sleep(1)
    first_run = len(results(job_dir))
    assert 0 < first_run < TIME_LIMIT_REQUESTS
    start_requeued_now(job_id, deadline, run=1)
    # An administrator's requeue in the middle of run 2 (`scontrol requeue`: SIGTERM to every process,
    # the engine stops with requests in flight): those are not results (no HTTP 5xx line is written);
    # run 3 sends them again.
    deadline = time.monotonic() + 1200
    while ("requeued: starting again" not in log.read_text()
           or (job_dir / "results.jsonl").read_bytes().count(b"\n") < first_run + 200):
        st = status(job_id)
        assert st["stage"] not in ("FAILED", "DONE", "CANCELLED", "TIMEOUT"), st
        assert time.monotonic() < deadline, st
        time.sleep(0.5)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    start_requeued_now(job_id, deadline, run=2)
    while log.read_text().count("requeued: starting again") < 2:
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.5)
    st, _ = wait_final(job_id, 1800)
    assert st["stage"] == "DONE", st
    lines = results(job_dir)
    ids = [line["custom_id"] for line in lines]
    assert len(ids) == len(set(ids)) == TIME_LIMIT_REQUESTS
    assert not [line for line in lines if line["response"]["status_code"] >= 500], "a 5xx became a result"
    assert st["batch"]["resumed"] > first_run and st["batch"]["done"] == TIME_LIMIT_REQUESTS, st
    said = log.read_text()
    assert "goes on in run 2 of up to 3 (requeued)" in said and "requeued: starting again" in said, said
    runs = subprocess.run(["sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", "State"],
                          capture_output=True, text=True).stdout.split()
    assert runs == ["REQUEUED", "REQUEUED", "COMPLETED"], runs
    wait_released(job_id)
    print(f"time limit{' (engine slowed)' if slow else ''}: run 1 answered {first_run}/"
          f"{TIME_LIMIT_REQUESTS} (limit cut to {limit} min once sending), run 2 until scontrol requeue, "
          f"run 3 the rest ({st['batch']['resumed']} kept); sacct {runs}; "
          f"{st['batch']['rate']} req/s in run 3")


def test_a_sharded_batch_runs_as_a_job_array_and_merges_one_output(testbed: dict[str, str],
                                                                   job_dir: Path) -> None:
    """batch.shards 2: a job array of two 2-node TP2 servers (they share the test bed's nodes, on
    ports of their own), each over its stable half of the input by custom_id; the last to end
    merges the parts into one output, every custom_id once, and removes them. `status` of the array
    id is the batch as one; `merge` afterwards adds nothing."""
    requests = [chat(i) for i in range(60)] + [completion(i) for i in range(60)]
    spec = batch_spec(job_dir, "batch-shards", requests, **{"batch.shards": 2, "batch.concurrency": 8})
    t0 = time.monotonic()
    out = cli("submit", str(spec), "--wait", "--json", timeout=900)
    job = json.loads(out.stdout.splitlines()[0])
    array_id = job["job_id"]
    shards = [Path(job["job_dir"]).with_name(f"batch-shards-{array_id}_{k}") for k in range(2)]
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n" + "\n".join(logs(str(s)) for s in shards)
    assert "batch: 120/120 done" in out.stderr, out.stderr
    lines = results(job_dir)
    ids = [line["custom_id"] for line in lines]
    assert len(ids) == len(set(ids)) == 120 and set(ids) == {r["custom_id"] for r in requests}
    assert all(line["error"] is None for line in lines)
    assert not (job_dir / "results.jsonl.parts").exists()           # merged, complete: parts removed
    by_id = {line["custom_id"]: line for line in lines}
    model = testbed["SLURM_VLLM_TEST_MODEL"]
    want = greedy_chat(model, f"{QUESTION} (7)", 8).rstrip("\ufffd")
    assert text_of(by_id["chat-7"]) == want
    for k, folder in enumerate(shards):                             # each shard: its half, on 2 nodes
        progress = json.loads((folder / "batch.json").read_text())
        mine = [r for r in requests if shard_of(r["custom_id"], 2) == k]
        assert progress["total"] == progress["done"] == len(mine), progress
        nodes = json.loads((folder / "ray_nodes.json").read_text())["nodes"]
        assert len({n["ip"] for n in nodes}) == 2, nodes
        assert (folder / "job_id").read_text().strip() == f"{array_id}_{k}"
    st = status(array_id)
    assert st["stage"] == "DONE" and st["batch"]["total"] == 120 and st["batch"]["finished"], st
    merged = cli("merge", array_id, "--json")
    assert merged.returncode == 0, merged.stderr
    said = json.loads(merged.stdout)
    assert (said["added"], said["present"], said["total"], said["complete"]) == (0, 120, 120, True), said
    states = subprocess.run(["sacct", "-j", array_id, "-X", "-n", "-P", "-o", "JobID,State"],
                            capture_output=True, text=True).stdout.split()
    assert sorted(states) == [f"{array_id}_0|COMPLETED", f"{array_id}_1|COMPLETED"], states
    wait_released(array_id)
    print(f"2 shards x TP2 x 2 nodes, 120 requests: {time.monotonic() - t0:.0f} s from submit to DONE")
