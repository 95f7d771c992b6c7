"""The front door: every route needs the key, requests reach vLLM's Unix socket byte for byte, answers
stream back. A real door on a loopback port before a real HTTP server on a Unix socket."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from slurm_vllm.core.unixhttp import UnixHTTPConnection
from slurm_vllm.node.frontdoor import FrontDoor, with_authorization

pytestmark = pytest.mark.unit
KEY = "sk-door-test"
ROUTES = ["/v1/models", "/v1/completions", "/invocations", "/tokenize", "/metrics", "/openapi.json",
          "/pooling"]


class Upstream(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A stand-in for vLLM's API server on a Unix socket: echoes what reached it, streams /stream."""

    daemon_threads = True
    seen: list[tuple[str, str, bytes]]


def handler() -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def address_string(self) -> str:
            return "unix"

        def _reply(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/stream":
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(3):
                    data = f"data: {i}\n\n".encode()
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()
                    time.sleep(0.3)
                self.wfile.write(b"0\r\n\r\n")
                return
            self.server.seen.append(("GET", self.path, b""))  # type: ignore[attr-defined]
            self._reply(json.dumps({"path": self.path, "auth": self.headers.get("Authorization")}).encode())

        def do_POST(self) -> None:
            if self.headers.get("Transfer-Encoding") == "chunked":
                body = b""
                while (size := int(self.rfile.readline().strip(), 16)) > 0:
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
            else:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.server.seen.append(("POST", self.path, body))  # type: ignore[attr-defined]
            self._reply(json.dumps({"path": self.path, "body": body.decode()}).encode())

    return Handler


@pytest.fixture
def door(tmp_path: Path) -> Iterator[tuple[FrontDoor, Upstream]]:
    sock = tmp_path / "api.sock"
    up = Upstream(str(sock), handler())
    up.seen = []
    threading.Thread(target=up.serve_forever, daemon=True).start()
    d = FrontDoor("127.0.0.1", 0, str(sock), KEY)
    d.start()
    assert d.server is not None
    d.port = d.server.sockets[0].getsockname()[1]
    yield d, up
    d.stop()
    up.shutdown()
    up.server_close()


def request(door: FrontDoor, method: str, path: str, key: str | None = None, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", door.port, timeout=10)
    hdrs = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_needs_the_key(route: str, door: tuple[FrontDoor, Upstream]) -> None:
    d, up = door
    for method in ("GET", "POST"):
        status, body = request(d, method, route, body=b"{}" if method == "POST" else None)
        assert status == 401 and b"API key" in body, (method, route, status)
        status, _ = request(d, method, route, key="sk-wrong", body=b"{}" if method == "POST" else None)
        assert status == 401
    assert up.seen == []                                         # nothing reached vLLM
    status, body = request(d, "GET", route, key=KEY)
    assert status == 200 and json.loads(body) == {"path": route, "auth": f"Bearer {KEY}"}


def test_health_alone_is_open(door: tuple[FrontDoor, Upstream]) -> None:
    d, _ = door
    assert request(d, "GET", "/health")[0] == 200
    assert request(d, "GET", "/health?x=1")[0] == 200
    assert request(d, "POST", "/health", body=b"")[0] == 401


def test_bodies_reach_vllm_byte_for_byte(door: tuple[FrontDoor, Upstream]) -> None:
    d, _ = door
    payload = json.dumps({"prompt": "ü" * 100_000}).encode()
    status, body = request(d, "POST", "/v1/completions", key=KEY, body=payload)
    assert status == 200 and json.loads(body)["body"].encode() == payload

    def chunks() -> Iterator[bytes]:
        yield b'{"a": '
        yield b'"chunked"}'

    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
    conn.request("POST", "/v1/completions", body=chunks(), headers={"Authorization": f"Bearer {KEY}"},
                 encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["body"] == '{"a": "chunked"}'


def test_each_request_of_a_kept_alive_connection_is_checked(door: tuple[FrontDoor, Upstream]) -> None:
    d, up = door
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
    for _ in range(3):
        conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert conn.getresponse().read()
    conn.request("POST", "/invocations", body=b"{}")            # the same connection, no key
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        conn.getresponse()
    assert [s[1] for s in up.seen] == ["/v1/models"] * 3


def test_a_request_that_reads_two_ways_is_refused(door: tuple[FrontDoor, Upstream]) -> None:
    d, up = door
    raw = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
           b"\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
           b"POST /invocations HTTP/1.1\r\n\r\n")                  # smuggled behind the first
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(raw)
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400") and up.seen == []


def test_answers_stream_through(door: tuple[FrontDoor, Upstream]) -> None:
    d, _ = door
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
    conn.request("GET", "/stream", headers={"Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    first = resp.readline()
    got_first = time.monotonic()
    rest = resp.read()
    # vLLM's side sends an event every 0.3 s: the first came through long before the last (streamed,
    # not held until the answer was whole), however fast this host is.
    assert first == b"data: 0\n" and b"data: 2" in rest and time.monotonic() - got_first >= 0.5


def test_the_unix_connection_reaches_the_socket(door: tuple[FrontDoor, Upstream], tmp_path: Path) -> None:
    conn = UnixHTTPConnection(str(tmp_path / "api.sock"), timeout=5)
    conn.request("GET", "/v1/models")
    assert json.loads(conn.getresponse().read())["path"] == "/v1/models"


class TcpUpstream(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """The stand-in upstream on TCP (the replicas' router)."""

    daemon_threads = True
    allow_reuse_address = True
    seen: list[tuple[str, str, bytes]]


@contextlib.contextmanager
def tcp_door(key: str | None, upstream_key: str | None = None) -> Iterator[tuple[FrontDoor, TcpUpstream]]:
    """A door on a free port in front of a TcpUpstream (`tcp:HOST:PORT`), stopped after."""
    up = TcpUpstream(("127.0.0.1", 0), handler())
    up.seen = []
    threading.Thread(target=up.serve_forever, daemon=True).start()
    d = FrontDoor("127.0.0.1", 0, f"tcp:127.0.0.1:{up.server_address[1]}", key, upstream_key=upstream_key)
    d.start()
    assert d.server is not None
    d.port = d.server.sockets[0].getsockname()[1]
    try:
        yield d, up
    finally:
        d.stop()
        up.shutdown()
        up.server_close()


def test_a_tcp_upstream_gets_the_request_and_its_key() -> None:
    """With replicas the job's door faces the router on loopback (`tcp:HOST:PORT`): the request and
    its Authorization header go through unchanged (the replicas' doors check it again)."""
    with tcp_door(KEY) as (d, up):
        status, body = request(d, "GET", "/v1/models", key=KEY)
        assert status == 200 and json.loads(body) == {"path": "/v1/models", "auth": f"Bearer {KEY}"}
        assert request(d, "GET", "/v1/models")[0] == 401 and len(up.seen) == 1


def test_with_an_upstream_key_every_request_carries_it_and_nothing_else() -> None:
    """A job without an API key in front of the router (which always checks one): the door lets
    every request in and replaces whatever Authorization the client sent by the router's key."""
    with tcp_door(None, upstream_key="inner") as (d, _up):
        for given in (None, "forged"):
            status, body = request(d, "GET", "/v1/models", key=given)
            assert status == 200 and json.loads(body) == {"path": "/v1/models", "auth": "Bearer inner"}


def test_with_authorization_replaces_every_authorization_header() -> None:
    head = b"POST /v1/x HTTP/1.1\r\nHost: h\r\nauthorization: Bearer a\r\nAUTHORIZATION: b\r\nX: 1\r\n\r\n"
    assert with_authorization(head, "k") == (b"POST /v1/x HTTP/1.1\r\nHost: h\r\nX: 1\r\n"
                                             b"Authorization: Bearer k\r\n\r\n")


def test_a_server_that_goes_away_unanswered_or_is_not_there_gets_the_client_a_503(tmp_path: Path) -> None:
    """vLLM killed while a request waits for its answer, or its socket gone (restarting): the
    client gets 503 (the replicas' router sends that request to another replica; an OpenAI client
    sends it again), not a closed connection."""
    sock = tmp_path / "api.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    listener.listen()

    def swallow() -> None:                       # reads the request, then dies without a word
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.close()

    threading.Thread(target=swallow, daemon=True).start()
    d = FrontDoor("127.0.0.1", 0, str(sock), KEY)
    d.start()
    assert d.server is not None
    d.port = d.server.sockets[0].getsockname()[1]
    try:
        status, body = request(d, "POST", "/v1/completions", key=KEY, body=b"{}")
        assert status == 503 and b"went away before answering" in body
        listener.close()
        sock.unlink()
        status, body = request(d, "POST", "/v1/completions", key=KEY, body=b"{}")
        assert status == 503 and b"not answering" in body
    finally:
        d.stop()
