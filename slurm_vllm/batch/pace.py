"""How many requests a batch keeps in flight: a fixed number, or one tuned from the server's own load.

`batch.concurrency: auto` (the default): every SAMPLE_EVERY seconds the driver reads vLLM's
Prometheus metrics (`vllm:num_requests_running`, `vllm:num_requests_waiting`,
`vllm:kv_cache_usage_perc`; summed over replicas) and `decide()` moves the limit so that the engine
always has work queued behind what runs (a few waiting requests: HEADROOM of what runs) without a
queue that only grows:

- the server runs nearly all it gets (under half the headroom waiting) while the driver has the
  limit in flight: it could take more: the limit grows by half;
- requests wait beyond the headroom (the engine's batch is full, or its KV cache is: longer
  requests, fewer fit): the limit falls to what runs plus the headroom;
- otherwise it stays.

The limit never drops below what runs, stays within [FLOOR, CEILING], and starts at START. When the
metrics cannot be read the limit stays where it is (the driver says so once).
"""

from __future__ import annotations

import http.client
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

from slurm_vllm.core.unixhttp import UnixHTTPConnection

START = 64
FLOOR = 8
CEILING = 4096
SAMPLE_EVERY = 1.0

_METRIC = re.compile(r"^(vllm:num_requests_running|vllm:num_requests_waiting|vllm:kv_cache_usage_perc)"
                     r"(?:\{[^}]*\})?\s+(\S+)\s*$", re.M)


@dataclass(frozen=True)
class Load:
    """The server's load at one moment (summed over replicas; KV usage: the fullest one)."""

    running: float
    waiting: float
    kv_usage: float


def parse_metrics(texts: list[str]) -> Load | None:
    """The Load in Prometheus TEXTS (one per server); None when a server's text lacks the counts."""
    running = waiting = kv = 0.0
    for text in texts:
        found = {name: 0.0 for name in ("vllm:num_requests_running", "vllm:num_requests_waiting")}
        seen = set()
        for name, value in _METRIC.findall(text):
            try:
                number = float(value)
            except ValueError:
                return None
            seen.add(name)
            if name == "vllm:kv_cache_usage_perc":
                kv = max(kv, number)
            else:
                found[name] += number
        if not {"vllm:num_requests_running", "vllm:num_requests_waiting"} <= seen:
            return None
        running += found["vllm:num_requests_running"]
        waiting += found["vllm:num_requests_waiting"]
    return Load(running, waiting, kv) if texts else None


def headroom(running: float) -> int:
    """How many requests should wait behind RUNNING ones, ready when one finishes."""
    return max(4, int(running) // 8)


def decide(limit: int, in_flight: int, load: Load) -> int:
    """The next limit, from the current LIMIT, the driver's IN_FLIGHT and the server's LOAD."""
    room = headroom(load.running)
    if load.waiting > 2 * room:                                   # a queue beyond what keeps it busy
        new = int(load.running) + room
    elif 2 * load.waiting < room and in_flight >= 0.9 * limit and load.kv_usage < 0.95:
        new = limit + max(limit // 2, FLOOR)                      # it takes all it gets: more
    else:
        new = limit
    return max(FLOOR, min(CEILING, new))


class Limit:
    """A semaphore whose size can change while it is held (a shrink takes effect as slots return)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self.cond = threading.Condition()

    def acquire(self, timeout: float) -> bool:
        with self.cond:
            if self.used >= self.size:
                self.cond.wait(timeout)
            if self.used >= self.size:
                return False
            self.used += 1
            return True

    def release(self) -> None:
        with self.cond:
            self.used -= 1
            self.cond.notify()

    def resize(self, size: int) -> None:
        with self.cond:
            grew = size > self.size
            self.size = size
            if grew:
                self.cond.notify_all()


class Pacer:
    """Reads the servers' load at METRICS (`unix:PATH` or http://host:port, with KEY) and moves
    LIMIT (decide); SAY gets a line at the first reading, at each change, and once if unreadable."""

    def __init__(self, limit: Limit, metrics: tuple[str, ...], key: str | None,
                 say: Callable[[str], None]) -> None:
        self.limit, self.metrics, self.key, self.say = limit, metrics, key, say
        self.read_once = False            # the first reading (said once)
        self.unread = False               # the metrics could not be read (said once)

    def tick(self, in_flight: int) -> None:
        texts = []
        for url in self.metrics:
            try:
                texts.append(self.get(url))
            except (OSError, http.client.HTTPException, UnicodeDecodeError) as exc:
                self._unread(f"{type(exc).__name__}: {exc}")
                return
        load = parse_metrics(texts)
        if load is None:
            self._unread("no vllm:num_requests_running/waiting in /metrics")
            return
        size = self.limit.size
        if not self.read_once:
            self.read_once = True
            self.say(f"batch: concurrency auto: starting at {size}, the server's load read from "
                     f"{len(self.metrics)} /metrics (running {load.running:.0f}, waiting {load.waiting:.0f})")
        new = decide(size, in_flight, load)
        if new != size:
            self.limit.resize(new)
            self.say(f"batch: concurrency {size} -> {new} (running {load.running:.0f}, waiting "
                     f"{load.waiting:.0f}, KV cache {100 * load.kv_usage:.0f}%)")

    def _unread(self, why: str) -> None:
        if not self.unread:
            self.unread = True
            self.say(f"batch: concurrency stays {self.limit.size}: the server's metrics cannot be read "
                     f"({why})")

    def get(self, url: str) -> str:
        """GET URL/metrics: its text; HTTPException unless 200."""
        parsed = urlparse(url)
        conn = (UnixHTTPConnection(url.removeprefix("unix:"), timeout=5) if url.startswith("unix:")
                else http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port or 80, timeout=5))
        try:
            auth = {"Authorization": f"Bearer {self.key}"} if self.key else {}
            conn.request("GET", "/metrics", headers=auth)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise http.client.HTTPException(f"GET {url}/metrics: HTTP {resp.status}")
            return body.decode()
        finally:
            conn.close()
