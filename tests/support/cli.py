"""Run slurm_vllm's command line as a user would (a subprocess), and wait on what it reports."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .reference import greedy_chat

QUESTION = "What is a slurm node?"


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "slurm_vllm", *args], capture_output=True, text=True,
                          timeout=timeout)


def logs(job_dir: str) -> str:
    return cli("logs", job_dir, "-n", "30").stdout if job_dir else ""


def submit(spec: Path | str, wait: bool = False) -> dict[str, str]:
    out = cli("submit", str(spec), "--json", *(["--wait"] if wait else []), timeout=900)
    job: dict[str, str] = json.loads(out.stdout.splitlines()[0]) if out.stdout else {}
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n" + logs(job.get("job_dir", ""))
    return job


def status(job: str) -> dict[str, Any]:
    out = cli("status", job, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def wait_stage(job: str, stages: tuple[str, ...], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = status(job)
        if st["stage"] in stages:
            return st
        assert st["stage"] not in ("FAILED", "CANCELLED", "DONE", "TIMEOUT"), st
        assert time.monotonic() < deadline, f"still {st} after {timeout:.0f} s"
        time.sleep(1)


def chat(endpoint: dict[str, Any], key: str | None, question: str = QUESTION) -> str:
    import openai

    client = openai.OpenAI(base_url=endpoint["url"], api_key=key or "none", max_retries=0)
    reply = client.chat.completions.create(model=endpoint["model"], max_tokens=16, temperature=0,
                                           messages=[{"role": "user", "content": question}])
    return str(reply.choices[0].message.content)


def expected(model: str, question: str = QUESTION) -> str:
    return greedy_chat(model, question)


def open_routes(url: str, key: str) -> list[str]:
    """Every route vLLM lists in its /openapi.json (read with KEY), tried without a key at URL (the
    endpoint's http://host:port): those that answer anything but 401, as `METHOD path status`.
    GET /health is left out (open by design: it tells nothing of the model)."""
    import urllib.error
    import urllib.request

    def call(method: str, path: str, with_key: bool) -> tuple[int, bytes]:
        data = b"{}" if method in ("POST", "PUT", "PATCH") else None
        req = urllib.request.Request(url + path, data=data, method=method, headers={
            "Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if with_key else {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    status, spec = call("GET", "/openapi.json", True)
    assert status == 200, status
    paths: dict[str, dict[str, object]] = json.loads(spec)["paths"]
    assert len(paths) > 5, sorted(paths)
    open_ = []
    for path, methods in paths.items():
        concrete = "/".join("x" if part.startswith("{") else part for part in path.split("/"))
        for method in methods:
            if (method.upper(), path) == ("GET", "/health"):
                continue
            code, _ = call(method.upper(), concrete, False)
            if code != 401:
                open_.append(f"{method.upper()} {path} {code}")
    return open_
