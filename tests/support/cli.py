"""Run slurm_vllm's command line as a user would (a subprocess), and wait on what it reports."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from .reference import greedy_chat

QUESTION = "What is a slurm node?"


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "slurm_vllm", *args], capture_output=True, text=True,
                          timeout=timeout)


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
