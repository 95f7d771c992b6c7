"""The readiness probes against a real HTTP server on loopback: a slow first completion is waited for."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from slurm_vllm.core.errors import ServeError
from slurm_vllm.node.probes import Http

pytestmark = pytest.mark.unit


class Server(BaseHTTPRequestHandler):
    """/v1/models lists "tiny"; /v1/completions answers after DELAY s with STATUS, checking the key."""

    delay = 0.0
    status = 200

    def do_GET(self) -> None:
        self.reply(200, {"data": [{"id": "tiny"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") != "Bearer k" or body["max_tokens"] != 1:
            self.reply(401, {"error": "bad key or body"})
            return
        time.sleep(type(self).delay)
        self.reply(type(self).status, {"choices": [{"text": ""}]})

    def reply(self, status: int, obj: object) -> None:
        data = json.dumps(obj).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass                  # the client gave up first

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    Server.delay, Server.status = 0.0, 200


def test_a_first_completion_slower_than_the_old_fixed_timeout_is_waited_for(url: str) -> None:
    Server.delay = 1.5
    http = Http(url, "k")
    http.check_models("tiny")
    assert http.complete_one("tiny", timeout=0.5) is not None          # too short: no answer
    started = time.monotonic()
    assert http.complete_one("tiny", timeout=5) is None                # enough: it comes back
    assert time.monotonic() - started >= 1.5


def test_what_went_wrong_is_said(url: str) -> None:
    Server.status = 500
    assert Http(url, "k").complete_one("tiny", 5) == ('a 1-token completion answered 500: '
                                                      '{"choices": [{"text": ""}]}')
    assert (Http(url, "wrong").complete_one("tiny", 5) or "").startswith("a 1-token completion answered 401")
    assert "got no answer" in (Http("http://127.0.0.1:9", "k").complete_one("tiny", 2) or "")
    with pytest.raises(ServeError, match="/v1/models answered 200"):
        Http(url, "k").check_models("other")
