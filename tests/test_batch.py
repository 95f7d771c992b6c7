"""Batch mode's file side and driver: input validation, output repair, resume, concurrency, stops.

The driver talks real HTTP to a small local server that answers like vLLM's OpenAI endpoints (the
e2e tier runs it against real vLLM); it counts requests in flight, refuses what it is told to, and
can be stopped mid-run.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from slurm_vllm.batch.driver import BatchError, Driver
from slurm_vllm.batch.merge import merge, part_path, shard_of
from slurm_vllm.batch.order import prompt_text
from slurm_vllm.batch.output import input_digest, write_record
from slurm_vllm.batch.reader import BatchInputError, done_ids, repair, validate
from slurm_vllm.core.errors import ServeError
from slurm_vllm.core.slurm import array_ids

pytestmark = pytest.mark.unit


def request(i: int, url: str = "/v1/completions", **body: Any) -> dict[str, Any]:
    if url == "/v1/chat/completions":
        payload: dict[str, Any] = {"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 4}
    else:
        payload = {"prompt": f"p{i}", "max_tokens": 4}
    return {"custom_id": f"req-{i}", "method": "POST", "url": url, "body": {**payload, **body}}


def write_input(path: Path, reqs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    return path


def answers(inp: Path, *outputs: Path) -> None:
    """Record that the result files OUTPUTS (written by hand) answer the input INP, as a run would."""
    for out in outputs:
        write_record(out, inp, input_digest(inp))


def results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- validation ---------------------------------------------------------------------------------

def test_a_valid_input_is_counted_by_url(tmp_path: Path) -> None:
    reqs = [request(i, "/v1/chat/completions" if i % 2 else "/v1/completions") for i in range(10)]
    reqs.append({**request(99, "/v1/embeddings"), "body": {"input": "x", "model": "tiny"}})
    summary = validate(write_input(tmp_path / "in.jsonl", reqs), "tiny")
    assert summary.requests == 11
    assert summary.by_url == {"/v1/completions": 5, "/v1/chat/completions": 5, "/v1/embeddings": 1}


C = '{"custom_id": "a", "url": "/v1/completions",'      # the start of a bad line


@pytest.mark.parametrize(("line", "says"), [
    ("{not json", "line 2: not JSON"),
    ("[1, 2]", "line 2: a JSON list, not an object"),
    ('{"method": "POST", "url": "/v1/completions", "body": {}}', "line 2: custom_id is missing"),
    ('{"custom_id": "a", "url": "/v1/images", "body": {}}', "line 2: url '/v1/images'"),
    ('{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}', "line 2: method 'GET'"),
    ('{"custom_id": "a", "url": "/v1/completions"}', "line 2: body is missing"),
    ('{"custom_id": "a", "url": "/v1/completions", "body": {"model": "gpt-4"}}',
     "line 2: body.model 'gpt-4' is not the served model 'tiny'"),
    (json.dumps(request(0)), "line 2: custom_id 'req-0' repeats line 1"),
    ('{"custom_id": "\\ud800", "url": "/v1/completions", "body": {}}',
     "line 2: custom_id is not valid Unicode"),
    (f'{C} "body": {{"temperature": NaN}}}}', "line 2: not JSON (NaN is not"),
    (f'{C} "body": {{"top_p": -Infinity}}}}', "line 2: not JSON (-Infinity"),
    (f'{C} "body": {{"seed": {"9" * 5000}}}}}', "line 2: not JSON (Exceeds"),
    ('{"custom_id": "a", "x": ' + "[" * 100000 + "]" * 100000 + "}", "line 2: not JSON (nested too deeply)"),
    ('{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "p", "stream": true}}',
     "line 2: body.stream: a streamed answer is not a batch result"),
])
def test_each_bad_line_is_named(line: str, says: str, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(request(0)) + "\n" + line + "\n")
    with pytest.raises(BatchInputError) as info:
        validate(path, "tiny")
    assert str(info.value).startswith(f"batch.input: {path} {says}"), info.value
    assert len(str(info.value).splitlines()) == 1


def test_beyond_ten_errors_only_a_count(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("".join("{bad\n" for _ in range(25)))
    with pytest.raises(BatchInputError) as info:
        validate(path, "tiny")
    shown = str(info.value).splitlines()
    assert len(shown) == 11 and shown[-1] == "… and 15 more errors"
    assert shown[0].endswith("line 1: not JSON (Expecting property name enclosed in double quotes)")


def test_an_empty_or_missing_input_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(BatchInputError, match="no requests"):
        validate(tmp_path / "empty.jsonl", "tiny")
    with pytest.raises(BatchInputError, match="not a file"):
        validate(tmp_path / "missing.jsonl", "tiny")


# -- the output ---------------------------------------------------------------------------------

def test_repair_cuts_only_a_half_written_last_line(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    good = '{"custom_id": "a", "response": {}}\n{"custom_id": "b", "response": {}}\n'
    out.write_text(good)
    assert repair(out) == 0 and out.read_text() == good
    out.write_text(good + '{"custom_id": "c", "resp')
    assert repair(out) == len('{"custom_id": "c", "resp') and out.read_text() == good
    out.write_text('{"custom_id": "c"')                          # the only line, half written
    assert repair(out) > 0 and out.read_text() == ""
    with done_ids(out) as done:
        assert len(done) == 0


# -- the driver against a real HTTP server --------------------------------------------------------

class Listener(ThreadingHTTPServer):
    """vLLM's server (uvicorn) listens with a backlog of 2048; socketserver's default of 5 drops or
    resets the connections of a driver that opens 64 at once when the host is loaded."""

    request_queue_size = 2048


class FakeVllm:
    """A threaded HTTP server answering /v1/completions and /v1/chat/completions like vLLM: 200
    with usage; 400 for prompts holding "bad"; counts the most requests ever in flight."""

    def __init__(self, delay: float = 0.01) -> None:
        self.delay, self.in_flight, self.most, self.seen = delay, 0, 0, 0
        self.lock = threading.Lock()
        self.hold = threading.Event()
        self.hold.set()
        self.dead = threading.Event()              # set: answer nothing, drop the connection
        self.fail_next = 0                         # answer this many requests 500 (a passing fault)
        self.failing = ""                          # answer 500 to every prompt holding this
        self.aborting = ""                         # answer 200 cut short (finish_reason abort) to those
        self.capacity = 0                          # > 0: at most this many run at once, the rest
        self.gate = threading.Semaphore(1)         # wait (and GET /metrics says so, as vLLM's)
        self.prompts: list[str] = []               # each request's prompt text, in arrival order
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:                 # /metrics: what vLLM says of its load
                with fake.lock:
                    running = min(fake.in_flight, fake.capacity)
                    waiting = fake.in_flight - running
                data = (f'vllm:num_requests_running{{engine="0",model_name="tiny"}} {running:.1f}\n'
                        f'vllm:num_requests_waiting{{engine="0",model_name="tiny"}} {waiting:.1f}\n'
                        f'vllm:kv_cache_usage_perc{{engine="0",model_name="tiny"}} 0.1\n').encode()
                self.send_response(200 if fake.capacity else 404)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.prompts.append(prompt_text(body))
                    fake.in_flight += 1
                    fake.seen += 1
                    fake.most = max(fake.most, fake.in_flight)
                fake.hold.wait()
                if fake.capacity:
                    with fake.gate:
                        time.sleep(fake.delay)
                else:
                    time.sleep(fake.delay)
                with fake.lock:
                    fake.in_flight -= 1
                if fake.dead.is_set():
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                text = json.dumps(body)
                with fake.lock:
                    passing_fault = fake.fail_next > 0
                    fake.fail_next -= passing_fault
                if passing_fault or (fake.failing and fake.failing in text):
                    status, answer = 500, {"error": {"message": "EngineCore encountered an issue"}}
                elif fake.aborting and fake.aborting in text:    # vLLM stopping: a partial answer
                    status, answer = 200, {"choices": [{"text": "o", "finish_reason": "abort"}],
                                           "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
                elif "weird-usage" in text:
                    status, answer = 200, {"choices": [{"text": "ok"}], "usage": {"prompt_tokens": "many"}}
                elif "surrogate" in text:
                    status, answer = 200, {"choices": [{"text": "half \ud800 a pair"}]}
                elif "bad" in text:
                    status, answer = 400, {"error": {"message": "bad request: bad prompt", "code": 400}}
                elif self.headers.get("Authorization") != "Bearer sk-test":
                    status, answer = 401, {"error": {"message": "unauthorized"}}
                else:
                    status, answer = 200, {"model": body["model"], "choices": [{"text": "ok"}],
                                           "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = Listener(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def run_at_most(self, capacity: int) -> None:
        self.capacity, self.gate = capacity, threading.Semaphore(capacity)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server() -> Any:
    fake = FakeVllm()
    yield fake
    fake.close()


def driver(fake: FakeVllm, tmp_path: Path, reqs: int | list[dict[str, Any]], concurrency: int | None = 8,
           stop: threading.Event | None = None, **kw: Any) -> Driver:
    items = [request(i, "/v1/chat/completions" if i % 3 == 0 else "/v1/completions")
             for i in range(reqs)] if isinstance(reqs, int) else reqs
    inp = write_input(tmp_path / "in.jsonl", items)
    return Driver(fake.url, "sk-test", inp, tmp_path / "out.jsonl", "tiny", concurrency,
                  stop or threading.Event(), **kw)


def test_every_request_gets_exactly_one_line_with_concurrency_bounded(server: FakeVllm,
                                                                     tmp_path: Path) -> None:
    reqs = [request(i) for i in range(300)] + [request(300, prompt="a bad one"), request(301, prompt="bad")]
    reports: list[Any] = []
    progress = driver(server, tmp_path, reqs, concurrency=8, report=reports.append, report_every=0.0).run()
    lines = results(tmp_path / "out.jsonl")
    assert sorted(r["custom_id"] for r in lines) == sorted(r["custom_id"] for r in reqs)
    assert 2 <= server.most <= 8                                  # in flight, as the server saw it
    refused = [r for r in lines if r["error"]]
    assert {r["custom_id"] for r in refused} == {"req-300", "req-301"}
    assert refused[0]["response"]["status_code"] == 400 and "bad prompt" in refused[0]["error"]["message"]
    ok = next(r for r in lines if r["custom_id"] == "req-0")
    assert ok["error"] is None and ok["response"]["status_code"] == 200 and ok["id"].startswith("batch_req_")
    assert ok["response"]["body"]["model"] == "tiny"              # the served name filled in
    counts = (progress.total, progress.done, progress.ok, progress.refused, progress.lost)
    assert counts == (302, 302, 300, 2, 0)
    assert progress.finished and progress.tokens_in == 900 and progress.tokens_out == 600
    assert reports and reports[-1].done == 302 and all(r.in_flight <= 8 for r in reports)
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o777 == 0o600


def test_resume_skips_what_is_done_and_repairs_a_half_line(server: FakeVllm, tmp_path: Path) -> None:
    first = driver(server, tmp_path, 120)
    first.run()
    out = tmp_path / "out.jsonl"
    kept = out.read_text().splitlines()[:50]
    out.write_text("\n".join(kept) + "\n" + kept[-1][:30])       # 50 results and a crash mid-line
    seen_before = server.seen
    progress = driver(server, tmp_path, 120).run()
    assert server.seen - seen_before == 70                         # only the 70 missing were sent
    ids = [r["custom_id"] for r in results(out)]
    assert len(ids) == len(set(ids)) == 120
    assert (progress.resumed, progress.done, progress.ok) == (50, 120, 70)


def test_a_stop_drains_what_is_in_flight_and_a_resume_finishes(server: FakeVllm, tmp_path: Path) -> None:
    stop = threading.Event()
    server.delay = 0.02

    def stop_after_some(p: Any) -> None:
        if p.done >= 30:
            stop.set()

    progress = driver(server, tmp_path, 150, concurrency=4, stop=stop, report=stop_after_some,
                      report_every=0.0).run(drain=lambda: 30)
    assert not progress.finished and 30 <= progress.done < 150 and progress.in_flight == 0
    ids = [r["custom_id"] for r in results(tmp_path / "out.jsonl")]
    assert len(ids) == len(set(ids)) == progress.done                # every sent request has its line
    final = driver(server, tmp_path, 150, concurrency=4).run()
    ids = [r["custom_id"] for r in results(tmp_path / "out.jsonl")]
    assert final.finished and len(ids) == len(set(ids)) == 150


def test_requests_without_an_answer_get_no_line_and_fail_the_run(tmp_path: Path) -> None:
    fake = FakeVllm()
    fake.hold.clear()                                              # every request waits...
    d = driver(fake, tmp_path, 50, concurrency=4)
    threading.Timer(0.5, lambda: (fake.dead.set(), fake.hold.set(), fake.close())).start()  # ...then it dies
    with pytest.raises(BatchError, match="requests got no answer"):
        d.run()
    ids = [r["custom_id"] for r in results(tmp_path / "out.jsonl")]
    assert len(ids) == len(set(ids)) and len(ids) < 50              # lost ones run again on resume


def test_one_output_is_written_by_one_job_at_a_time(server: FakeVllm, tmp_path: Path) -> None:
    import fcntl
    import os

    out = tmp_path / "out.jsonl"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(BatchError, match="being written by another job"):
            driver(server, tmp_path, 3).run()
    finally:
        os.close(fd)


def test_submit_and_validate_refuse_a_bad_input_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 2, the line named, nothing submitted (no sbatch runs: the check comes first)."""
    import yaml

    from slurm_vllm.login import cli

    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(request(0)) + "\n" + json.dumps(request(0)) + "\n")
    spec = tmp_path / "b.yaml"
    spec.write_text(yaml.safe_dump({"name": "b", "model": {"path": "/m", "served_name": "tiny"},
                                    "jobs_root": str(tmp_path / "jobs"), "mode": "batch",
                                    "batch": {"input": str(inp)}}))
    for verb in ("validate", "submit"):
        assert cli.main([verb, str(spec)]) == 2
        err = capsys.readouterr().err
        said = f"slurm_vllm: error: batch.input: {inp} line 2: custom_id 'req-0' repeats line 1"
        assert err.strip() == said
    assert not (tmp_path / "jobs").exists()


# -- sharding: K drivers over a stable 1/K each, parts merged into one output --------------------

def test_a_requests_shard_is_the_same_in_every_process(tmp_path: Path) -> None:
    """The hash is not Python's salted hash(): another interpreter with another seed agrees."""
    import subprocess
    import sys

    ids = [f"req-{i}" for i in range(2000)]
    here = [shard_of(i, 4) for i in ids]
    code = ("import sys, json; from slurm_vllm.batch.merge import shard_of; "
            "print(json.dumps([shard_of(i, 4) for i in json.load(sys.stdin)]))")
    there = subprocess.run([sys.executable, "-c", code], input=json.dumps(ids), capture_output=True,
                           text=True, check=True, env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin"})
    assert json.loads(there.stdout) == here
    sizes = [here.count(k) for k in range(4)]
    assert all(400 <= n <= 600 for n in sizes), sizes                # about 1/4 each


def test_shards_cover_the_input_once_and_the_merge_completes_it(server: FakeVllm, tmp_path: Path) -> None:
    reqs = [request(i) for i in range(200)]
    inp = write_input(tmp_path / "in.jsonl", reqs)
    out, parts = tmp_path / "out.jsonl", tmp_path / "out.jsonl.parts"
    parts.mkdir()
    totals = []
    for k in range(3):
        d = Driver(server.url, "sk", inp, part_path(parts, k, 3), "tiny", 4, threading.Event(),
                   shard=(k, 3), also_done=(out,))
        progress = d.run()
        totals.append(progress.total)
        ids = {r["custom_id"] for r in results(part_path(parts, k, 3))}
        assert ids == {r["custom_id"] for r in reqs if shard_of(r["custom_id"], 3) == k}
        merged = merge(out, parts, inp)
        assert merged.complete == (k == 2) and merged.removed == (k == 2)
    assert sum(totals) == 200 and server.seen == 200                 # each request sent once, by its shard
    ids = [r["custom_id"] for r in results(out)]
    assert len(ids) == len(set(ids)) == 200
    assert not parts.exists()                                        # complete: the parts are gone
    assert out.stat().st_mode & 0o777 == 0o600
    again = merge(out, parts, inp)                                   # idempotent
    assert (again.added, again.present, again.total) == (0, 200, 200)


def test_a_merge_skips_a_half_written_line_and_never_duplicates(tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", [request(i) for i in range(4)])
    out, parts = tmp_path / "out.jsonl", tmp_path / "parts"
    parts.mkdir()

    def line(i: int) -> str:
        return json.dumps({"id": f"b{i}", "custom_id": f"req-{i}", "response": {"status_code": 200},
                           "error": None})

    (parts / "part-0-of-2.jsonl").write_text(line(0) + "\n" + line(1)[:20])     # its shard is writing
    (parts / "part-1-of-2.jsonl").write_text(line(2) + "\n" + line(3) + "\n")
    answers(inp, parts / "part-0-of-2.jsonl", parts / "part-1-of-2.jsonl")
    first = merge(out, parts, inp)
    assert (first.added, first.present, first.removed) == (3, 3, False)
    assert "1 requests without a result yet; parts kept" in first.line()
    (parts / "part-0-of-2.jsonl").write_text(line(0) + "\n" + line(1) + "\n")     # the line finished
    second = merge(out, parts, inp)
    assert (second.added, second.present, second.removed) == (1, 4, True)
    ids = [r["custom_id"] for r in results(out)]
    assert sorted(ids) == ["req-0", "req-1", "req-2", "req-3"]


def test_a_shard_resumes_from_the_merged_output_and_its_part(server: FakeVllm, tmp_path: Path) -> None:
    reqs = [request(i) for i in range(60)]
    inp = write_input(tmp_path / "in.jsonl", reqs)
    mine = [r for r in reqs if shard_of(r["custom_id"], 2) == 0]
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps({"custom_id": r["custom_id"], "response": {}, "error": None}) + "\n"
                           for r in mine[:5]))                         # merged earlier
    answers(inp, out)
    parts = tmp_path / "parts"
    parts.mkdir()
    progress = Driver(server.url, "sk", inp, part_path(parts, 0, 2), "tiny", 4, threading.Event(),
                      shard=(0, 2), also_done=(out,)).run()
    assert (progress.total, progress.resumed, progress.done) == (len(mine), 5, len(mine))
    assert server.seen == len(mine) - 5


def test_squeue_and_sacct_array_ids_are_expanded() -> None:
    assert array_ids("123") == ["123"]
    assert array_ids("123_4") == ["123_4"]
    assert array_ids("123_[0-2,7%2]") == ["123_0", "123_1", "123_2", "123_7"]


def test_the_merge_verb_merges_on_demand_from_the_spec(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from slurm_vllm.login import cli

    inp = write_input(tmp_path / "in.jsonl", [request(i) for i in range(3)])
    out = tmp_path / "out.jsonl"
    data = {"name": "b", "model": {"path": "/m", "served_name": "tiny"}, "jobs_root": str(tmp_path / "jobs"),
            "mode": "batch", "batch": {"input": str(inp), "output": str(out), "shards": 2}}
    spec = tmp_path / "b.yaml"
    spec.write_text(yaml.safe_dump(data))
    parts = tmp_path / "out.jsonl.parts"
    parts.mkdir()
    (parts / "part-1-of-2.jsonl").write_text("".join(
        json.dumps({"id": f"b{i}", "custom_id": f"req-{i}", "response": {}, "error": None}) + "\n"
        for i in (0, 2)))
    answers(inp, parts / "part-1-of-2.jsonl")
    assert cli.main(["merge", str(spec)]) == 0
    said = capsys.readouterr().out.strip()
    assert said == (f"merged 1 parts into {out}: 2 lines added, 2/3 requests have a result (1 requests "
                    f"without a result yet; parts kept)")
    assert cli.main(["merge", str(spec), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 0
    serve = tmp_path / "s.yaml"
    serve.write_text(yaml.safe_dump({"name": "s", "model": {"path": "/m"}}))
    assert cli.main(["merge", str(serve)]) == 2
    assert capsys.readouterr().err.strip() == "slurm_vllm: error: merge: s is not a batch (mode: serve)"


def test_a_merge_without_its_input_or_output_folder_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BatchInputError, match=r"batch.input: .*/gone.jsonl: not a file"):
        merge(tmp_path / "out.jsonl", tmp_path / "parts", tmp_path / "gone.jsonl")
    inp = write_input(tmp_path / "in.jsonl", [request(0)])
    with pytest.raises(BatchInputError, match=r"batch.output: its folder .*/nowhere: No such file"):
        merge(tmp_path / "nowhere" / "out.jsonl", tmp_path / "parts", inp)


def test_requests_lost_because_the_job_is_stopping_are_not_a_failure(tmp_path: Path) -> None:
    """scancel's SIGTERM reaches vLLM and the rank together: requests the dying server drops after
    the stop get no line (they run again on resume), and the run ends as stopped, not failed."""
    fake = FakeVllm()
    fake.hold.clear()                                              # every request waits...
    stop = threading.Event()
    d = driver(fake, tmp_path, 50, concurrency=4, stop=stop)

    def cancel() -> None:
        stop.set()
        fake.dead.set()
        fake.hold.set()
        fake.close()                                               # ...then the job is cancelled

    threading.Timer(0.5, cancel).start()
    progress = d.run(drain=lambda: 5)
    assert not progress.finished and progress.lost > 0 and progress.done < 50
    ids = [r["custom_id"] for r in results(tmp_path / "out.jsonl")]
    assert len(ids) == len(set(ids)) == progress.done


# -- 5xx answers and worker errors ------------------------------------------------------------------

def test_a_passing_5xx_is_sent_again_and_counted_not_written(server: FakeVllm, tmp_path: Path) -> None:
    server.fail_next = 3
    progress = driver(server, tmp_path, 20, concurrency=4).run()
    lines = results(tmp_path / "out.jsonl")
    assert progress.finished and progress.retries == 3 and progress.ok == 20, progress
    assert [line["response"]["status_code"] for line in lines] == [200] * 20
    assert "3 retried after a 5xx" in progress.summary()


def test_a_5xx_while_the_job_stops_is_not_a_result_and_runs_again(server: FakeVllm, tmp_path: Path) -> None:
    """scontrol requeue, preemption, a cancel: the engine dies and answers 500 to what is in flight.
    Those are not results: no line, and the next run sends them."""
    server.failing = "max_tokens"                      # every request: the engine is dying
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    progress = driver(server, tmp_path, 30, concurrency=4, stop=stop).run(drain=lambda: 10)
    assert not progress.finished and progress.lost > 0 and progress.done == 0, progress
    assert results(tmp_path / "out.jsonl") == []
    server.failing = ""
    again = driver(server, tmp_path, 30, concurrency=4).run()
    assert again.finished and again.ok == 30
    assert {line["response"]["status_code"] for line in results(tmp_path / "out.jsonl")} == {200}


def test_an_answer_the_engine_aborted_is_not_a_result_and_runs_again(server: FakeVllm,
                                                                     tmp_path: Path) -> None:
    """vLLM stopping (SIGTERM: scontrol requeue, a preemption, the time limit's end) answers what is
    in flight 200 with finish_reason "abort" and the text so far: not a result, no line; the next
    run sends it again, whole."""
    server.aborting = "max_tokens"                     # every request: the engine is stopping
    server.hold.clear()                                # 4 in flight as the stop comes
    stop = threading.Event()
    threading.Timer(0.3, lambda: (stop.set(), server.hold.set())).start()
    progress = driver(server, tmp_path, 30, concurrency=4, stop=stop).run(drain=lambda: 10)
    assert not progress.finished and progress.lost == 4 and progress.done == 0, progress
    assert results(tmp_path / "out.jsonl") == []
    server.aborting = ""
    again = driver(server, tmp_path, 30, concurrency=4).run()
    assert again.finished and again.ok == 30
    assert {line["response"]["body"]["choices"][0].get("finish_reason")
            for line in results(tmp_path / "out.jsonl")} == {None}
    server.aborting = '"p3"'                           # outside a stop: lost, and the run says so
    (tmp_path / "x").mkdir()
    with pytest.raises(BatchError, match=r"1 requests got no answer \(an answer the engine aborted"):
        driver(server, tmp_path / "x", [request(i) for i in range(6)], concurrency=2).run()


def test_a_5xx_from_a_dead_engine_is_not_written(server: FakeVllm, tmp_path: Path) -> None:
    """The engine died: its 5xx persist, and the rank's liveness check fails the job before any of
    them could become a line."""
    server.failing = "max_tokens"
    seen: list[int] = []

    def check() -> None:
        seen.append(server.seen)
        if server.seen:
            raise ServeError("vllm exited (code 1) on node1")

    with pytest.raises(ServeError, match="vllm exited"):
        driver(server, tmp_path, 30, concurrency=4, check=check).run()
    assert results(tmp_path / "out.jsonl") == []


def test_a_persistent_5xx_of_a_live_server_is_written_after_retries(server: FakeVllm, tmp_path: Path) -> None:
    server.failing = '"p3"'
    progress = driver(server, tmp_path, [request(i) for i in range(6)], concurrency=2).run()
    by_id = {line["custom_id"]: line for line in results(tmp_path / "out.jsonl")}
    assert progress.finished and progress.retries == 3 and progress.refused == 1, progress
    assert by_id["req-3"]["response"]["status_code"] == 500
    assert by_id["req-3"]["error"]["message"] == "EngineCore encountered an issue"


def test_an_exception_in_a_request_worker_fails_the_run_by_name(server: FakeVllm, tmp_path: Path) -> None:
    """An answer the driver cannot take (usage that is not a number) used to leave its request in
    flight and the run waiting an hour; now the run fails at once naming the request and the error."""
    reqs = [request(i) for i in range(5)] + [request(5, prompt="weird-usage")]
    t0 = time.monotonic()
    with pytest.raises(BatchError, match=r"request 'req-5': ValueError: invalid literal"):
        driver(server, tmp_path, reqs, concurrency=2).run()
    assert time.monotonic() - t0 < 60


def test_an_answer_with_a_lone_surrogate_is_written_as_valid_json(server: FakeVllm, tmp_path: Path) -> None:
    progress = driver(server, tmp_path, [request(0, prompt="surrogate")]).run()
    [line] = results(tmp_path / "out.jsonl")
    assert progress.ok == 1 and line["response"]["body"]["choices"][0]["text"] == "half \ud800 a pair"



# -- concurrency that tunes itself, shared prefixes together ------------------------------------------

def test_auto_concurrency_settles_on_what_the_server_runs_plus_a_little_queue(server: FakeVllm,
                                                                            tmp_path: Path) -> None:
    """concurrency None (auto) against a server that runs 12 at a time (the rest wait, as /metrics
    says): the driver starts at 64, falls to what runs plus a few waiting once two readings a second
    apart saw the queue, and every request gets one line; what it said of each change is in its log."""
    server.delay = 0.05
    server.run_at_most(12)
    said: list[str] = []
    d = driver(server, tmp_path, 800, concurrency=None, say=said.append)     # 240 a second: ~3.3 s
    d.last_sample = 0.0
    progress = d.run()
    assert progress.finished and progress.ok == 800
    assert said[0].startswith("batch: concurrency auto: starting at 64, the server's load read from 1 "
                              "/metrics"), said
    assert said[1].startswith("batch: concurrency 64 -> 16 (running 12, waiting"), said
    # 12 running + 4 waiting behind them (24 for a moment when requests still on their way made the
    # queue look empty)
    assert 16 <= d.limit.size <= 24, said
    with done_ids(tmp_path / "out.jsonl") as done:
        assert len(done) == 800


def test_auto_concurrency_stays_put_when_the_metrics_cannot_be_read(server: FakeVllm,
                                                                   tmp_path: Path) -> None:
    said: list[str] = []
    d = driver(server, tmp_path, 50, concurrency=None, say=said.append)
    assert d.run().ok == 50 and d.limit.size == 64
    assert said == ["batch: concurrency stays 64: the server's metrics cannot be read "
                    f"(HTTPException: GET {server.url}/metrics: HTTP 404)"], said


def prefixed(n_prefixes: int, per: int, seed: int = 7) -> list[dict[str, Any]]:
    """N_PREFIXES long system prompts x PER short questions, shuffled."""
    rng = random.Random(seed)
    reqs = [{"custom_id": f"s{p}-q{q}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"max_tokens": 2, "messages": [
                 {"role": "system", "content": f"system prompt {p}: " + "context " * 200},
                 {"role": "user", "content": f"question {q}"}]}}
            for p in range(n_prefixes) for q in range(per)]
    rng.shuffle(reqs)
    return reqs


def switches(prompts: list[str]) -> int:
    """How often the system prompt changes from one request to the next."""
    heads = [p.split(":", 1)[0] for p in prompts]
    return sum(a != b for a, b in pairwise(heads))


def test_requests_sharing_a_prefix_are_sent_together_each_exactly_once(server: FakeVllm,
                                                                      tmp_path: Path) -> None:
    """40 system prompts x 25 questions, shuffled: with the window over the whole input the server
    sees each system prompt's requests in one run (39 changes, against ~975 in input order); each
    custom_id has one line; a stop halfway and a resume keep it so."""
    reqs = prefixed(40, 25)
    server.delay = 0.0
    stop = threading.Event()

    def stop_after_some(p: Any) -> None:
        if p.done >= 300:
            stop.set()

    first = driver(server, tmp_path, reqs, concurrency=4, stop=stop, report=stop_after_some,
                   report_every=0.0).run(drain=lambda: 10)
    assert not first.finished
    rest = driver(server, tmp_path, reqs, concurrency=4).run()
    assert rest.finished and rest.done == 1000
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in lines) == sorted(r["custom_id"] for r in reqs)
    # two runs, each grouped over what it sends: at most 2 x 39 changes (+1 where the runs meet)
    assert switches(server.prompts) <= 2 * 39 + 1, switches(server.prompts)
    server.prompts.clear()
    (tmp_path / "out.jsonl").unlink()
    driver(server, tmp_path, reqs, concurrency=4, window=0).run()
    assert switches(server.prompts) > 900                       # input order: nearly every request
