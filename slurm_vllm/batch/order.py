"""In what order a batch's requests are sent: those sharing a prompt prefix together, within a window.

vLLM's prefix cache keeps the KV blocks of prompts it has seen while there is room: requests that
share a long prefix (one system prompt over many questions, few-shot examples, one document asked
many things) are cheap when they come close together and each pays the whole prompt when the cache
has evicted it in between. The driver reads WINDOW pending requests ahead, sends them sorted by their
prompt text (role and content of each message, or the completion's prompt; its first KEY_CHARS
characters), which puts every set of prompts sharing a prefix next to each other, longest shared
prefixes closest, then reads the next window. Memory is bounded by the window; the output's order
does not matter (one line per custom_id) and resume is by custom_id, so neither changes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from slurm_vllm.batch.reader import check_request, lines

WINDOW = 10_000            # batch.prefix_window's default: requests read ahead and sorted
KEY_CHARS = 4096           # the part of a prompt that decides its place

T = TypeVar("T")


def prompt_text(body: dict[str, Any]) -> str:
    """The text a request's prompt starts with: its messages (role, then content; text parts of a
    multi-part content) or its prompt, cut at KEY_CHARS."""
    parts: list[str] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            parts.append(str(message.get("role", "")))
            content = message.get("content")
            if isinstance(content, list):
                parts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
            elif content is not None:
                parts.append(str(content))
            if sum(map(len, parts)) >= KEY_CHARS:
                break
    else:
        prompt = body.get("prompt", body.get("input", ""))
        parts.append(prompt if isinstance(prompt, str) else json.dumps(prompt))
    return "\x00".join(parts)[:KEY_CHARS]


def grouped(items: Iterable[T], key: Callable[[T], str], window: int) -> Iterator[T]:
    """ITEMS, each run of WINDOW of them sorted by KEY (stable); WINDOW <= 1: as they come."""
    if window <= 1:
        yield from items
        return
    buffer: list[tuple[str, int, T]] = []
    for item in items:
        buffer.append((key(item), len(buffer), item))
        if len(buffer) >= window:
            buffer.sort(key=lambda entry: (entry[0], entry[1]))
            yield from (entry[2] for entry in buffer)
            buffer = []
    buffer.sort(key=lambda entry: (entry[0], entry[1]))
    yield from (entry[2] for entry in buffer)


def to_send(path: Path, served_name: str, wanted: Callable[[str], bool], window: int,
            error: type[Exception]) -> Iterator[dict[str, Any]]:
    """The requests of the input at PATH that WANTED (by custom_id: this run's, not done yet), in
    the order they are sent (grouped by prompt, WINDOW at a time). A line that is no longer a valid
    request (the file changed since submit) raises ERROR naming it."""
    def pending() -> Iterator[dict[str, Any]]:
        for number, raw in lines(path):
            if not raw.strip():
                continue
            req, problem = check_request(raw, served_name)
            if req is None:
                raise error(f"batch.input: {path} line {number}: {problem}")
            if wanted(req["custom_id"]):
                yield req

    return grouped(pending(), lambda req: prompt_text(req["body"]), window)
