"""e2e: batch mode on the test bed (real Slurm, Ray, vLLM): a JSONL of requests in, results out,
the job ends by itself; stopped by its time limit, a requeue and a cancel, then resumed; shards."""

from __future__ import annotations

import datetime
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from slurm_vllm.batch.merge import shard_of

from .support.cli import cli, logs, status, wait_stage
from .support.failures import wait_final, wait_released
from .support.reference import greedy_chat, greedy_completion
from .support.slurm import SLURM_PERIOD, end_soon
from .support.specs import derive

pytestmark = pytest.mark.e2e
QUESTION = "What is a slurm node?"
# The stopped-three-ways test sends one request at a time, each LONG tokens: ~5 s a request on a
# 2-CPU AVX2 host (the tiny model's steps cost vLLM's own overhead, ~25 ms), so STOP_REQUESTS outlast
# Slurm's 30 s signal check on a host ten times faster; the resubmit answers the rest together (392 in
# 59 s on that host).
STOP_REQUESTS = 200
LONG = 200                      # + the prompt, within the test model's max_model_len (256)
FINAL = ("FAILED", "DONE", "CANCELLED", "TIMEOUT")


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


def wait_restarts(log: Path, runs: int, deadline: float) -> None:
    """Until the job's stage log says it started again RUNS times after a requeue."""
    while log.read_text().count("requeued: starting again") < runs:
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.5)


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


def line_count(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
    except FileNotFoundError:
        return 0


def wait_lines(job_id: str, output: Path, more_than: int, within: float) -> int:
    """Until OUTPUT has more than MORE_THAN lines (read directly: a line is flushed as it is written);
    the job must not end meanwhile. The count."""
    deadline = time.monotonic() + within
    while (n := line_count(output)) <= more_than:
        st = status(job_id)
        assert st["stage"] not in FINAL, st
        assert time.monotonic() < deadline, st
        time.sleep(0.2)
    return n


def server_errors(lines: list[dict[str, Any]]) -> list[str]:
    """The custom_ids of lines that are an HTTP 5xx: an engine that stopped is not a result."""
    return [line["custom_id"] for line in lines if line["response"]["status_code"] >= 500]


def test_a_batch_stopped_three_ways_keeps_each_line_once_and_a_resubmit_finishes_it(
        testbed: dict[str, str], job_dir: Path) -> None:
    """One batch (1 node, so backend auto runs vLLM's own executor) stopped three ways while it sends,
    each keeping its lines once: (1) its time limit — at SIGUSR2 run 1 stops sending, keeps its lines
    and requeues the job (same job id, same folder); (2) an administrator's `scontrol requeue` in run 2
    (SIGTERM to every process; the requests in flight as the engine stops are not results: no 5xx
    line); (3) the user's `cancel` in run 3: CANCELLED. Then a resubmit of the same input and output,
    at the default concurrency (as a user raises it), sends only the rest and ends DONE, every
    custom_id once.

    Independent of the host's speed: the job sends one request at a time, each LONG tokens
    (ignore_eos), so its input outlasts Slurm's 30 s signal check many times over however fast the
    host, while the resubmit answers the rest together in a few rounds however slow. Each stop comes
    once its run has written a line. Test-bed shortcuts, as the cluster's admin (the tests run as
    root): the time limit is cut once the batch sends (end_soon), and a requeued job, once pending,
    is made eligible at once (Slurm holds it about 2 minutes) with 30 minutes."""
    requests = [completion(i, max_tokens=LONG) for i in range(STOP_REQUESTS)]
    for r in requests:
        r["body"]["ignore_eos"] = True
    one_node = {"slurm.nodes": 1, "parallelism.tensor": 1}
    spec = batch_spec(job_dir, "batch-stops", requests, **one_node, **{"batch.max_jobs": 3,
                                                                      "batch.concurrency": 1})
    out = cli("submit", str(spec), "--json")
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    job_id, folder = job["job_id"], Path(job["job_dir"])
    log, output = folder / "stage.log", job_dir / "results.jsonl"
    wait_stage(job_id, ("BATCH",), 600)
    wait_lines(job_id, output, 0, 300)
    limit = end_soon(job_id)                                    # (1) the time limit
    cut = time.monotonic()
    deadline = cut + 4 * SLURM_PERIOD + 120
    while not log.exists() or "PENDING time limit: " not in log.read_text():
        st = status(job_id)
        assert st["stage"] not in FINAL, (
            f"{st}: the batch was not sending when the time limit came (TimeLimit cut to {limit} min "
            f"{time.monotonic() - cut:.0f} s ago); on a host this fast, raise STOP_REQUESTS")
        assert time.monotonic() < deadline, st
        time.sleep(1)
    first_run = line_count(output)
    assert 0 < first_run < STOP_REQUESTS
    start_requeued_now(job_id, deadline, run=1)
    deadline = time.monotonic() + 900
    wait_restarts(log, 1, deadline)
    wait_lines(job_id, output, first_run, 600)
    subprocess.run(["scontrol", "requeue", job_id], check=True)     # (2) the admin's requeue
    start_requeued_now(job_id, deadline, run=2)
    wait_restarts(log, 2, deadline)
    second_run = line_count(output)                                 # run 3 has not sent yet
    wait_lines(job_id, output, second_run, 600)
    assert cli("cancel", job_id).returncode == 0                    # (3) the user's cancel
    st, _ = wait_final(job_id, 120)
    assert st["stage"] == "CANCELLED", st
    wait_released(job_id)
    lines = results(job_dir)
    kept = [line["custom_id"] for line in lines]
    assert second_run < len(kept) < STOP_REQUESTS and len(kept) == len(set(kept)), (second_run, len(kept))
    assert server_errors(lines) == [], "an engine that stopped became a result"
    said = log.read_text()
    assert "goes on in run 2 of up to 3 (requeued)" in said and said.count("requeued: starting again") == 2
    runs = subprocess.run(["sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", "State"],
                          capture_output=True, text=True).stdout.split()
    assert runs[:2] == ["REQUEUED", "REQUEUED"] and runs[2].startswith("CANCELLED"), runs
    # the resubmit: same input (same bytes) and output, the default concurrency
    out = cli("submit", str(batch_spec(job_dir, "batch-stops", requests, **one_node)), "--wait", "--json",
              timeout=900)
    again = json.loads(out.stdout.splitlines()[0])
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n" + logs(again["job_dir"])
    lines = results(job_dir)
    ids = [line["custom_id"] for line in lines]
    assert len(ids) == len(set(ids)) == STOP_REQUESTS and server_errors(lines) == []
    assert all(line["response"]["body"]["usage"]["completion_tokens"] == LONG for line in lines)
    st = status(again["job_id"])
    assert st["stage"] == "DONE" and st["batch"]["resumed"] == len(kept), st
    assert st["batch"]["ok"] == STOP_REQUESTS - len(kept), st
    wait_released(again["job_id"])
    print(f"stopped three ways: run 1 (time limit cut to {limit} min) {first_run} lines, run 2 (scontrol "
          f"requeue) to {second_run}, run 3 (cancel) to {len(kept)} of {STOP_REQUESTS}; sacct {runs}; the "
          f"resubmit sent the rest at {st['batch']['rate']} req/s")


def test_a_sharded_batch_runs_as_a_job_array_and_merges_one_output(testbed: dict[str, str],
                                                                   job_dir: Path) -> None:
    """batch.shards 2: a job array of two 1-node servers (each a task of its own, on a node of its own
    or sharing one on ports of their own), each over its stable half of the input by custom_id; the
    last to end merges the parts into one output, every custom_id once, and removes them. `status` of
    the array id is the batch as one; `merge` afterwards adds nothing."""
    requests = [chat(i) for i in range(60)] + [completion(i) for i in range(60)]
    spec = batch_spec(job_dir, "batch-shards", requests, **{"batch.shards": 2, "batch.concurrency": 8,
                                                          "slurm.nodes": 1, "parallelism.tensor": 1})
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
    for k, folder in enumerate(shards):                             # each shard: its half
        progress = json.loads((folder / "batch.json").read_text())
        mine = [r for r in requests if shard_of(r["custom_id"], 2) == k]
        assert progress["total"] == progress["done"] == len(mine), progress
        assert (folder / "job_id").read_text().strip() == f"{array_id}_{k}"
    st = status(array_id)
    assert st["stage"] == "DONE" and st["batch"]["total"] == 120 and st["batch"]["finished"], st
    merged = cli("merge", array_id, "--json")
    assert merged.returncode == 0, merged.stderr
    said = json.loads(merged.stdout)
    assert (said["added"], said["present"], said["total"], said["complete"]) == (0, 120, 120, True), said
    states = subprocess.run(["sacct", "-j", array_id, "-X", "-n", "-P", "-o", "JobID,State,NodeList"],
                            capture_output=True, text=True).stdout.split()
    assert sorted(s.rsplit("|", 1)[0] for s in states) == [f"{array_id}_0|COMPLETED",
                                                          f"{array_id}_1|COMPLETED"], states
    nodelists = [s.rsplit("|", 1)[1] for s in states]
    assert all(n.startswith("node") and "," not in n and "[" not in n for n in nodelists), states
    wait_released(array_id)
    print(f"2 shards x 1 node, 120 requests: {time.monotonic() - t0:.0f} s from submit to DONE")
