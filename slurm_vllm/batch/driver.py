"""The batch driver (rank 0, batch mode): stream the input to the job's own vLLM server with
`concurrency` requests in flight (fixed, or tuned from the server's load: pace.py), those sharing a
prompt prefix sent together (order.py), and append each result to the output as it completes.

The input is read a line at a time and the output is appended a line at a time (flushed at once,
fsynced every second), so a crash loses at most the requests in flight, and neither file is ever
held in memory. A request with a result line in the output already is skipped (resume); a
half-written last line is cut first (batchio.repair). A request that gets an HTTP answer gets a
line, whatever its status (a refusal is a line with its status and error); one that gets no answer
(the server went away) gets none, so it runs again on resume. On a stop (scancel, the time limit)
the driver sends nothing more, waits up to `drain` seconds for the requests in flight, and ends.

A 5xx is not an answer while it may pass: sent again (RETRY_5XX times, with back-off); while the job
stops, not written (it runs again next run); if it persists, written once the liveness check passed
after it (a dead engine fails the job first). A worker's exception fails the run, naming the request.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from slurm_vllm.batch import order, pace
from slurm_vllm.batch.merge import shard_of
from slurm_vllm.batch.output import check_record, input_digest, open_output, result_line, write_record
from slurm_vllm.batch.reader import done_ids, lines, repair_fd, request_id
from slurm_vllm.core.errors import SlurmVllmError
from slurm_vllm.core.records import BatchProgress
from slurm_vllm.core.unixhttp import UnixHTTPConnection

REQUEST_TIMEOUT = 3600.0          # one request may wait this long for its answer (long generations)
CHECK_EVERY = 0.5                 # the rank's liveness check (children, worker failure files) between sends
RETRY_5XX = (0.5, 1.0, 2.0)       # back-off before each new try of a request that got a 5xx


class BatchError(SlurmVllmError):
    """The batch could not run to its end (the output is locked, the server stopped answering)."""


class Driver:
    """One run of a batch against the server at URL (http://host:port). CONCURRENCY None: tuned
    from the load read at METRICS (URL by default; pace.py); WINDOW: requests read ahead and
    sorted by prompt (order.py; <= 1: input order); SAY: a line for the job's log."""

    def __init__(self, url: str, api_key: str | None, input_path: Path, output_path: Path, served_name: str,
                 concurrency: int | None, stop: threading.Event, check: Callable[[], None] = lambda: None,
                 report: Callable[[BatchProgress], None] = lambda p: None, report_every: float = 2.0,
                 shard: tuple[int, int] | None = None, also_done: tuple[Path, ...] = (),
                 window: int = order.WINDOW, metrics: tuple[str, ...] | None = None,
                 say: Callable[[str], None] = lambda line: None) -> None:
        self.socket_path = url.removeprefix("unix:") if url.startswith("unix:") else None   # vLLM's --uds
        parsed = urlparse(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.input, self.output = input_path, output_path
        self.served_name, self.auto, self.window = served_name, concurrency is None, window
        self.last_sample = 0.0
        self.limit = pace.Limit(concurrency or pace.START)
        self.pacer = pace.Pacer(self.limit, (url,) if metrics is None else metrics, api_key, say)
        self.shard = shard                # (i, K): only the requests of shard i of K (a job array's task)
        self.also_done = also_done        # other outputs whose lines count as done (the merged output)
        self.stop, self.check, self.report, self.report_every = stop, check, report, report_every
        self.local = threading.local()
        self.lock = threading.Lock()
        self.counts = {"ok": 0, "refused": 0, "lost": 0, "in_flight": 0, "tokens_in": 0, "tokens_out": 0,
                       "done": 0, "resumed": 0, "total": 0, "retries": 0}
        self.closed = False
        self.lost_reason = ""
        self.error = ""                   # the first exception inside a request's worker (fails the run)
        self.started = time.monotonic()
        self.last_sync = self.next_report = self.last_check = 0.0

    # -- the run ---------------------------------------------------------------------------------

    def run(self, drain: Callable[[], float] = lambda: 60.0) -> BatchProgress:
        """Send every request not yet in the output; return the final counts (finished: all done).
        After a stop, wait at most DRAIN() seconds (asked then) for the requests in flight."""
        fd = open_output(self.output, self.input)     # this user's own file, never a link or the input
        try:
            digest = input_digest(self.input)     # every file whose lines count as done answers this input
            for path in (self.output, *self.also_done):
                check_record(path, self.input, digest)
            write_record(self.output, self.input, digest)
        except BaseException:
            os.close(fd)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BatchError(f"batch.output: {self.output} is being written by another job") from None
        repair_fd(fd)                        # ours now: a half line can only be from a crash
        self.out = os.fdopen(fd, "ab")
        try:
            with done_ids(self.output, *self.also_done) as done:
                for _, raw in lines(self.input):
                    if raw.strip():
                        cid = request_id(raw)
                        if cid is None or self.mine(cid):
                            self.counts["total"] += 1
                            self.counts["resumed"] += cid in done
                self.counts["done"] = self.counts["resumed"]
                self._send_all(done, drain)
        finally:
            with self.lock:
                self.closed = True
                self.out.flush()
                os.fsync(self.out.fileno())
                self.out.close()
        progress = self.progress()
        self.report(progress)
        if self.counts["lost"] and not self.stop.is_set():    # after a stop: expected, they run again
            raise BatchError(f"{self.counts['lost']} requests got no answer ({self.lost_reason}); "
                             f"{progress.done}/{progress.total} done: submit again to finish")
        return progress

    def mine(self, custom_id: str) -> bool:
        """Is the request with CUSTOM_ID this run's (every one, or those of its shard)?"""
        return self.shard is None or shard_of(custom_id, self.shard[1]) == self.shard[0]

    def _send_all(self, done: Any, drain: Callable[[], float]) -> None:
        pool = ThreadPoolExecutor(pace.CEILING if self.auto else self.limit.size, thread_name_prefix="batch")
        try:
            wanted = lambda cid: self.mine(cid) and cid not in done  # noqa: E731
            for req in order.to_send(self.input, self.served_name, wanted, self.window, BatchError):
                if not self._slot(self.limit):
                    break
                with self.lock:
                    self.counts["in_flight"] += 1
                pool.submit(self._one, req).add_done_callback(lambda _f: self.limit.release())
            deadline = time.monotonic() + (drain() if self.stop.is_set() else REQUEST_TIMEOUT)
            while self.counts["in_flight"] and time.monotonic() < deadline:
                self._tick(check=not self.stop.is_set())
                time.sleep(0.05)
            if self.error:
                raise BatchError(f"the batch driver failed: {self.error}")
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _slot(self, slots: pace.Limit) -> bool:
        """Wait for a free slot within the limit; False when the run must stop sending (a stop, or
        requests that got no answer: the server is going away)."""
        while True:
            self._tick()
            if self.stop.is_set() or self.counts["lost"]:
                return False
            if slots.acquire(timeout=0.5):
                if self.stop.is_set() or self.counts["lost"]:
                    slots.release()
                    return False
                return True

    def _tick(self, check: bool = True) -> None:
        """Between two sends, at most every CHECK_EVERY seconds the rank's check (a dead server or
        worker fails the job); an fsync every second; a progress report every report_every seconds.
        A worker's exception fails the run here, by name."""
        if self.error:
            raise BatchError(f"the batch driver failed: {self.error}")
        now = time.monotonic()
        if check and now - self.last_check >= CHECK_EVERY:
            self.check()
            self.last_check = time.monotonic()
        if now - self.last_sync >= 1.0:
            with self.lock:
                if not self.closed:
                    self.out.flush()
                    os.fsync(self.out.fileno())
            self.last_sync = now
        if now >= self.next_report:
            self.report(self.progress())
            self.next_report = now + self.report_every
        if self.auto and now - self.last_sample >= pace.SAMPLE_EVERY:
            self.last_sample = now
            self.pacer.tick(self.counts["in_flight"])

    def progress(self, finished: bool | None = None) -> BatchProgress:
        c = self.counts
        elapsed = time.monotonic() - self.started
        answered = c["ok"] + c["refused"]
        return BatchProgress(
            output=str(self.output), total=c["total"], done=c["done"], resumed=c["resumed"], ok=c["ok"],
            refused=c["refused"], lost=c["lost"], in_flight=c["in_flight"], tokens_in=c["tokens_in"],
            tokens_out=c["tokens_out"], elapsed=round(elapsed, 3),
            rate=round(answered / elapsed, 3) if elapsed > 0 else 0.0,
            finished=c["done"] == c["total"] if finished is None else finished, retries=c["retries"])

    # -- one request -----------------------------------------------------------------------------

    def _conn(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self.local, "conn", None)
        if conn is None:
            conn = (UnixHTTPConnection(self.socket_path, timeout=REQUEST_TIMEOUT) if self.socket_path
                    else http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT))
            self.local.conn = conn
        return conn

    def _post(self, url: str, body: bytes) -> tuple[int, bytes, str]:
        """(status, body, request id) of one POST; reconnects once (a keep-alive connection the server
        closed); OSError/HTTPException when there is no answer. A Unix socket whose accept queue is
        full refuses a connect at once (EAGAIN) where TCP would wait: that is tried again, with a
        growing pause, until it connects or the run stops (the listener is there: the server is)."""
        attempt, pause = 0, 0.01
        while True:
            conn = self._conn()
            try:
                conn.request("POST", url, body=body, headers=self.headers)
                resp = conn.getresponse()
                return resp.status, resp.read(), resp.getheader("x-request-id") or ""
            except BlockingIOError:
                conn.close()
                self.local.conn = None
                if self.stop.wait(pause):
                    raise
                pause = min(2 * pause, 0.5)
            except (OSError, http.client.HTTPException):
                conn.close()
                self.local.conn = None
                attempt += 1
                if attempt == 2 or self.stop.is_set():
                    raise

    def _one(self, req: dict[str, Any]) -> None:
        """One request, in a worker thread: its exchange, then in_flight down whatever happened; an
        exception is kept (named) for the main loop, which fails the run with it."""
        try:
            self._exchange(req)
        except BaseException as exc:
            with self.lock:
                self.error = self.error or (f"request {req['custom_id'][:80]!r}: {type(exc).__name__}: "
                                            f"{str(exc)[:300]}")
        finally:
            with self.lock:
                self.counts["in_flight"] -= 1

    def _lose(self, reason: str) -> None:
        with self.lock:
            self.counts["lost"] += 1
            self.lost_reason = self.lost_reason or reason

    def _exchange(self, req: dict[str, Any]) -> None:
        body = dict(req["body"])
        body.setdefault("model", self.served_name)
        data = json.dumps(body).encode()
        for backoff in (*RETRY_5XX, None):
            try:
                status, raw, request_id = self._post(req["url"], data)
            except (OSError, http.client.HTTPException) as exc:
                self._lose(f"{type(exc).__name__}: {exc}")
                return
            if status < 500:
                break
            if self.stop.is_set():       # the job is stopping: a dying server's 5xx is not a result
                self._lose(f"HTTP {status} while stopping")
                return
            if backoff is None:          # persistent: a result, once the server is seen alive after it
                if not self._checked_since(time.monotonic()):
                    self._lose(f"HTTP {status}, and the server was not seen alive after it")
                    return
                break
            with self.lock:
                self.counts["retries"] += 1
            if self.stop.wait(backoff):
                self._lose(f"HTTP {status} while stopping")
                return
        line = result_line(req["custom_id"], status, raw, request_id)
        if line.aborted:                 # a 200 with finish_reason abort: vLLM stopped mid-answer
            self._lose("an answer the engine aborted (finish_reason abort)")
            return
        with self.lock:
            if self.closed:
                return                   # after the drain: not written, runs again on resume
            self.out.write(line.data)
            self.out.flush()
            self.counts["done"] += 1
            self.counts["ok" if line.ok else "refused"] += 1
            self.counts["tokens_in"] += line.tokens_in
            self.counts["tokens_out"] += line.tokens_out

    def _checked_since(self, since: float, wait: float = 5.0) -> bool:
        """Has the main loop's liveness check passed after SINCE (waiting up to WAIT s for it)? A
        failed check closes the run instead."""
        deadline = time.monotonic() + wait
        while self.last_check <= since and not self.closed and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.last_check > since and not self.closed
