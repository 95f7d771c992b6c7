"""How many requests a batch keeps in flight: a fixed number, or one tuned from the server's own load.

`batch.concurrency: auto` (the default): every SAMPLE_EVERY seconds the driver reads vLLM's
Prometheus metrics (`vllm:num_requests_running`, `vllm:num_requests_waiting`,
`vllm:kv_cache_usage_perc`; summed over replicas) and `decide()` moves the limit so that the engine
always has work queued behind what runs (a few waiting requests: HEADROOM of what runs) without a
queue that only grows:

- requests wait beyond twice the headroom in two readings in a row, what runs did not rise between
  them, and the engine is full: its KV cache (KV_FULL: longer requests, fewer fit; what runs now is
  its capacity) or its batch (what runs is near the most that ran at the last PEAK_OF readings,
  which is its capacity: what runs swings by a quarter as requests finish together and the next
  ones are taken in): the limit falls to that capacity plus the headroom. Otherwise a queue is a
  burst being taken in (prefills have a token budget per step): the engine has room, it stays;
- the server runs nearly all it gets (under half the headroom waiting) while the driver has the
  limit in flight: it could take more: the limit grows by half, unless the engine is at the
  capacity learned (what runs is not clearly above it: the requests between the engine and the
  driver, and those finishing, leave a few slots empty at any reading; growing there only built a
  queue to cut again, an oscillation);
- otherwise it stays.

The limit stays within [FLOOR, CEILING] and starts at START. When the metrics cannot be read the
limit stays where it is (the driver says so once).
"""

from __future__ import annotations

import http.client
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from urllib.parse import urlparse

from slurm_vllm.core.unixhttp import UnixHTTPConnection

START = 64
FLOOR = 8
CEILING = 4096
SAMPLE_EVERY = 1.0
GROWN = 1.1           # what runs above this x the capacity learned: the engine has room again
KV_FULL = 0.9         # the KV cache this full: no more fit (what runs is the capacity)
PEAK_OF = 5           # the capacity at a plateau: the most that ran at this many last readings

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
    return max(4, int(running) // 4)


@dataclass(frozen=True)
class State:
    """The controller's state between two readings: the LIMIT; the engine's CAPACITY learned from
    a standing queue (0: not known, or outgrown); RUNNING at the last reading if a queue stood then
    (None: no queue); what ran at the last PEAK_OF readings (RECENT)."""

    limit: int
    capacity: int = 0
    queued_running: float | None = None
    recent: tuple[float, ...] = ()


def decide(state: State, in_flight: int, load: Load) -> State:
    """The next state, from the current STATE, the driver's IN_FLIGHT and the server's LOAD."""
    state = replace(state, recent=(*state.recent, load.running)[-PEAK_OF:])
    limit, room = state.limit, headroom(load.running)
    if load.waiting > 2 * room:                                   # a queue beyond what keeps it busy
        before = state.queued_running                             # None: no queue at the last reading
        kv_full, plateau = load.kv_usage >= KV_FULL, load.running >= 0.9 * max(state.recent)
        if before is None or load.running > GROWN * before or not (kv_full or plateau):
            return replace(state, queued_running=load.running)    # once, rising, or a burst taken in
        capacity = int(max(load.running, before) if kv_full else max(state.recent))
        return State(_bounded(capacity + headroom(capacity)), capacity, load.running, state.recent)
    state = replace(state, queued_running=None)
    outgrown = not state.capacity or load.running > GROWN * state.capacity
    if 2 * load.waiting < room and in_flight >= 0.9 * limit and load.kv_usage < KV_FULL and outgrown:
        return State(_bounded(limit + max(limit // 2, FLOOR)), recent=state.recent)  # it takes all: more
    return state


def _bounded(limit: int) -> int:
    return max(FLOOR, min(CEILING, limit))


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
        self.state = State(limit.size)

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
        self.state = decide(replace(self.state, limit=size), in_flight, load)
        new = self.state.limit
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
