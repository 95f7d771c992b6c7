"""The endpoint's front door: the API key on every route; vLLM itself only on a private Unix socket.

vLLM checks its --api-key on /v1/* only: /invocations (a completion), /tokenize, /metrics and the
routes later versions add answer anyone. So vLLM serves on a Unix socket in a folder only this user
can enter (`vllm serve --uds`), and the head runs this door on the job's address and API port: it
reads each request's head, lets through those that carry `Authorization: Bearer <key>` (and
`GET /health`, which tells nothing of the model), and pipes them to the socket byte for byte; the
answers come back the same way, streamed. A request without the key gets 401 and the connection is
closed. Requests on a kept-alive connection are each checked: the client side is read as a sequence
of requests (Content-Length or chunked bodies); a message that could be read two ways (both, or a
repeated Content-Length) is refused with 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http.client
import json
import threading
from typing import cast

OPEN_ROUTES = {("GET", "/health"), ("HEAD", "/health")}
MAX_HEAD = 64 << 10                      # a request's line and headers
CHUNK = 64 << 10


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_head(head: bytes) -> tuple[str, str, dict[str, list[str]]]:
    """(method, path without the query, headers by lower-case name) of a request head."""
    try:
        text = head.decode("latin-1")
        line, *rest = text.split("\r\n")
        method, target, _version = line.split(" ")
    except ValueError:
        raise BadRequest(400, "malformed request line") from None
    headers: dict[str, list[str]] = {}
    for field in rest:
        if not field:
            continue
        name, sep, value = field.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(400, "malformed header")
        headers.setdefault(name.lower(), []).append(value.strip())
    return method, target.split("?", 1)[0], headers


def body_kind(headers: dict[str, list[str]]) -> tuple[str, int]:
    """('length', n), ('chunked', 0) or ('none', 0); BadRequest for what could be read two ways."""
    lengths = headers.get("content-length", [])
    encodings = [e.strip().lower() for v in headers.get("transfer-encoding", []) for e in v.split(",")]
    if encodings and lengths:
        raise BadRequest(400, "both Content-Length and Transfer-Encoding")
    if encodings:
        if encodings != ["chunked"]:
            raise BadRequest(400, f"Transfer-Encoding {', '.join(encodings)} is not supported")
        return "chunked", 0
    if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
        raise BadRequest(400, "a bad or repeated Content-Length")
    return ("length", int(lengths[0])) if lengths else ("none", 0)


def with_authorization(head: bytes, key: str) -> bytes:
    """HEAD with its Authorization headers replaced by `Authorization: Bearer KEY`."""
    lines = head[:-4].split(b"\r\n")
    kept = [line for line in lines[1:] if not line.lower().startswith(b"authorization:")]
    return b"\r\n".join([lines[0], *kept, f"Authorization: Bearer {key}".encode("latin-1")]) + b"\r\n\r\n"


def _answer(status: int, message: str) -> bytes:
    reason = http.client.responses.get(status, "Error")
    error = {"message": message, "type": "invalid_request_error", "code": status}
    body = json.dumps({"error": error}).encode()
    extra = 'WWW-Authenticate: Bearer realm="slurm_vllm"\r\n' if status == 401 else ""
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class _Sink:
    """Where a request's body goes when nothing will read it (read all the same: a socket closed
    with unread input is reset, and the client would not see the answer)."""

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass


class FrontDoor:
    """The door at HOST:PORT to vLLM's socket UPSTREAM (or `tcp:HOST:PORT`: with replicas, the job's
    door to their router), letting in requests that carry KEY (every
    request, when KEY is None: the spec turned the key off). UPSTREAM_KEY: the key the upstream
    checks when the job has none (the replicas' router), put on every request let through.
    start() binds (ServeError-free: an OSError when the port is taken) and serves in a daemon
    thread; stop() closes it."""

    def __init__(self, host: str, port: int, upstream: str, key: str | None,
                 upstream_key: str | None = None) -> None:
        self.host, self.port, self.upstream, self.upstream_key = host, port, upstream, upstream_key
        self.expected = f"Bearer {key}".encode() if key else None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="front-door", daemon=True)
        self.server: asyncio.base_events.Server | None = None
        self.refused = 0                  # requests answered 401 or 400 (for tests and the log)

    def start(self) -> None:
        self.server = self.loop.run_until_complete(asyncio.start_server(
            self._client, self.host, self.port, limit=MAX_HEAD, reuse_address=True))
        self.thread.start()

    def stop(self) -> None:
        if not self.thread.is_alive():
            return

        async def close() -> None:
            if self.server is not None:
                self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)

    def allowed(self, method: str, path: str, headers: dict[str, list[str]]) -> bool:
        if self.expected is None or (method, path) in OPEN_ROUTES:
            return True
        given = headers.get("authorization", [])
        return len(given) == 1 and hmac.compare_digest(given[0].encode("latin-1"), self.expected)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_writer: asyncio.StreamWriter | None = None
        pump: asyncio.Task[None] | None = None
        waiting = [False]            # a request passed on, not a byte of its answer back yet
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break                                    # the client is done
                except asyncio.LimitOverrunError:
                    raise BadRequest(431, f"request head over {MAX_HEAD} bytes") from None
                method, path, headers = parse_head(head)
                kind, length = body_kind(headers)
                if not self.allowed(method, path, headers):
                    self.refused += 1
                    if up_writer is None:                    # nothing of vLLM's on this connection yet
                        writer.write(_answer(401, "this endpoint needs its API key (Authorization: "
                                                  "Bearer <key from the job folder's api_key>)"))
                        await writer.drain()
                    break
                if up_writer is None:
                    try:
                        up_reader, up_writer = await self._connect()
                    except OSError:                          # not there (killed, restarting)
                        await self._body(reader, cast(asyncio.StreamWriter, _Sink()), kind, length)
                        writer.write(_answer(503, "the server is not answering: send the request again"))
                        await writer.drain()
                        break
                    pump = asyncio.create_task(self._pipe(up_reader, writer, waiting))
                up_writer.write(head if self.upstream_key is None else
                                with_authorization(head, self.upstream_key))
                waiting[0] = True
                if "upgrade" in headers:                     # a websocket: raw both ways from here
                    await self._pipe(reader, up_writer)
                    break
                await self._body(reader, up_writer, kind, length)
                await up_writer.drain()
            if pump is not None and up_writer is not None:   # the last answer may still be coming
                with contextlib.suppress(OSError):
                    up_writer.write_eof()
                await pump
        except BadRequest as exc:
            self.refused += 1
            if up_writer is None:
                writer.write(_answer(exc.status, str(exc)))
                with contextlib.suppress(OSError):
                    await writer.drain()
        except OSError:
            if pump is not None and waiting[0]:      # the server went away mid-request: its 503
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(pump), 5)
        except (asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            if pump is not None:
                pump.cancel()
            for w in (up_writer, writer):
                if w is not None:
                    w.close()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to UPSTREAM: vLLM's Unix socket, or `tcp:HOST:PORT` (the replicas' router)."""
        if self.upstream.startswith("tcp:"):
            host, port = self.upstream.removeprefix("tcp:").rsplit(":", 1)
            return await asyncio.open_connection(host, int(port), limit=MAX_HEAD)
        return await asyncio.open_unix_connection(self.upstream, limit=MAX_HEAD)

    async def _body(self, reader: asyncio.StreamReader, out: asyncio.StreamWriter, kind: str,
                    length: int) -> None:
        if kind == "length":
            await self._copy(reader, out, length)
        elif kind == "chunked":
            while True:
                line = await reader.readuntil(b"\r\n")
                out.write(line)
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise BadRequest(400, "a malformed chunk size") from None
                if size == 0:                                # trailers, then the empty line
                    while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                        out.write(trailer)
                    out.write(b"\r\n")
                    return
                await self._copy(reader, out, size + 2)

    @staticmethod
    async def _copy(reader: asyncio.StreamReader, out: asyncio.StreamWriter, n: int) -> None:
        while n > 0:
            data = await reader.read(min(n, CHUNK))
            if not data:
                raise asyncio.IncompleteReadError(b"", n)
            out.write(data)
            n -= len(data)
            await out.drain()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    waiting: list[bool] | None = None) -> None:
        """READER's bytes to WRITER until either ends. WAITING (the server's answers to the client):
        if the server goes away with a request it has not begun to answer (killed, restarting), a
        503 instead of a closed connection: the replicas' router sends it to another replica, an
        OpenAI client sends it again."""
        try:
            while True:
                try:
                    data = await reader.read(CHUNK)
                except OSError:                      # reset (it died with our request unread): gone
                    data = b""
                if not data:
                    break
                if waiting:
                    waiting[0] = False
                writer.write(data)
                await writer.drain()
            if waiting and waiting[0]:
                writer.write(_answer(503, "the server went away before answering: send the request again"))
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(OSError):
                if writer.can_write_eof():
                    writer.write_eof()
