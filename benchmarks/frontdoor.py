"""Benchmark: what the endpoint's front door costs. The same small POSTs sent straight to a server on a
Unix socket (as the batch driver does) and through the front door on loopback (as users do), one
connection per client kept alive, sequentially and with 8 clients at once. Prints req/s and the
median and p99 latency of each.

Usage: python benchmarks/frontdoor.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import http.client
import socketserver
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slurm_vllm.core.unixhttp import UnixHTTPConnection
from slurm_vllm.node.frontdoor import FrontDoor

KEY = "sk-bench"
BODY = b'{"model": "m", "prompt": "The number 7 is", "max_tokens": 8}'
ANSWER = b'{"choices": [{"text": " a number between six and eight"}], "usage": {"prompt_tokens": 5}}'


class Upstream(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def address_string(self) -> str:
        return "unix"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)


def run(connect: Callable[[], http.client.HTTPConnection], n: int, clients: int) -> tuple[float, list[float]]:
    """N requests over CLIENTS kept-alive connections: (req/s, latencies)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(count: int) -> None:
        conn = connect()
        mine = []
        for _ in range(count):
            t0 = time.perf_counter()
            conn.request("POST", "/v1/completions", body=BODY,
                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200, resp.status
            mine.append(time.perf_counter() - t0)
        conn.close()
        with lock:
            latencies.extend(mine)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [n // clients] * clients))
    return len(latencies) / (time.perf_counter() - t0), latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="door-bench-"))
    sock = str(folder / "api.sock")
    up = Upstream(sock, Handler)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    door = FrontDoor("127.0.0.1", 0, sock, KEY)
    door.start()
    assert door.server is not None
    port = door.server.sockets[0].getsockname()[1]
    ways: dict[str, Callable[[], http.client.HTTPConnection]] = {
        "straight to the socket": lambda: UnixHTTPConnection(sock, timeout=30),
        "through the front door": lambda: http.client.HTTPConnection("127.0.0.1", port, timeout=30)}
    for clients in (1, 8):
        for name, connect in ways.items():
            run(connect, 200, clients)                                   # warm-up
            rate, lat = run(connect, args.requests, clients)
            lat.sort()
            print(f"{clients} client{'s' if clients > 1 else ''}, {name:24}: {rate:7.0f} req/s, median "
                  f"{statistics.median(lat) * 1000:.2f} ms, p99 {lat[int(len(lat) * 0.99)] * 1000:.2f} ms",
                  flush=True)
    door.stop()
    up.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
