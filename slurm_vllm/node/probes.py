"""Facts a rank waits on: a port free or answering, Ray's alive nodes, and vLLM's HTTP readiness."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse

from slurm_vllm import scripts
from slurm_vllm.core.errors import ServeError
from slurm_vllm.core.records import RayNode
from slurm_vllm.core.unixhttp import UnixHTTPConnection

# Run inside the container with its Python: the alive Ray nodes, with their IPs and GPUs.
# The head's barrier: one process (Ray imported and connected once, not once a poll) prints the alive
# nodes as a JSON line whenever they change, and ends once NODES nodes with GPUS GPUs are there.
RAY_WATCH = scripts.text("ray_watch")    # scripts/ray_watch.py


def port_free(port: int) -> bool:
    """Can this node bind PORT on every address?"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """Does HOST:PORT accept a TCP connection?"""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def parse_ray_nodes(output: str) -> tuple[RayNode, ...] | None:
    """The last answer in RAY_WATCH's output (its last line that is one: Ray may log around them),
    or None when it printed none yet."""
    for line in reversed(output.strip().splitlines()):
        try:
            rows = json.loads(line)
            return tuple(RayNode(str(n["ip"]), float(n["gpus"])) for n in rows)
        except (ValueError, KeyError, TypeError):
            continue
    return None


class Http:
    """Requests to vLLM's OpenAI server at URL (`http://host:port`, or `unix:/path` for its private
    socket), with its API key."""

    def __init__(self, url: str, key: str | None) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.url.startswith("unix:"):
            return UnixHTTPConnection(self.url.removeprefix("unix:"), timeout=timeout)
        parsed = urllib.parse.urlparse(self.url)
        return http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port or 80, timeout=timeout)

    def __call__(self, path: str, body: dict[str, object] | None = None,
                 timeout: float = 30) -> tuple[int, str]:
        """(status, text); status 0 when nothing answers within TIMEOUT seconds."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {**self.headers, **({"Content-Type": "application/json"} if data else {})}
        conn = self.connection(timeout)
        try:
            conn.request("POST" if data is not None else "GET", path, body=data, headers=headers)
            resp = conn.getresponse()
            return int(resp.status), resp.read().decode(errors="replace")
        except (OSError, http.client.HTTPException):
            return 0, ""
        finally:
            conn.close()

    def healthy(self) -> bool:
        return self("/health")[0] == 200

    def check_models(self, model: str) -> None:
        """After /health: /v1/models lists MODEL, or ServeError."""
        status, text = self("/v1/models")
        if status != 200 or model not in text:
            raise ServeError(f"/v1/models answered {status}: {text[:200]}")

    def complete_one(self, model: str, timeout: float) -> str | None:
        """Ask for a 1-token completion: None when it came back, else what went wrong. The first
        request may be slow (kernels compiled or tuned on first use: over 30 s seen on a cold
        AVX-512 CPU), so TIMEOUT is the time left for readiness, not a fixed few seconds."""
        status, text = self("/v1/completions", {"model": model, "prompt": "Hello", "max_tokens": 1},
                            timeout=timeout)
        if status == 200:
            return None
        if status == 0:
            return f"a 1-token completion got no answer (connection failed or {timeout:.0f} s passed)"
        return f"a 1-token completion answered {status}: {text[:300]}"
