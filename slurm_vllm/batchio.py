"""OpenAI batch files, streamed in constant memory: validate an input, repair and index an output.

Input: one request a line, `{"custom_id", "method": "POST", "url", "body"}` with url one of URLS.
Output: one result a line, `{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}`. Neither file is ever held in memory: the custom_ids seen (unique in the input, done in
the output) go into an SQLite table in a temporary file, so 1,000,000 lines take the memory of 1,000.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SpecError

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_SHOWN = 10                         # errors listed one a line; beyond that, only their count
MAX_LINE = 16 << 20                    # a request line longer than this is refused, not read whole


class BatchInputError(SpecError):
    """The batch input is not a valid OpenAI batch file (exit 2; each error names its line)."""


class IdSet:
    """A set of strings on disk (SQLite in a temporary file): constant memory whatever its size."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="slurm-vllm-ids-")
        self.db = sqlite3.connect(os.path.join(self._dir.name, "ids.sqlite"), isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-512", "temp_store=FILE"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("CREATE TABLE ids (id TEXT PRIMARY KEY, line INTEGER) WITHOUT ROWID")
        self.db.execute("BEGIN")

    def add(self, value: str, line: int) -> int | None:
        """Add VALUE (first seen on LINE); the line it was first seen on if it was there already."""
        try:
            self.db.execute("INSERT INTO ids VALUES (?, ?)", (value, line))
            return None
        except sqlite3.IntegrityError:
            row = self.db.execute("SELECT line FROM ids WHERE id = ?", (value,)).fetchone()
            return int(row[0])

    def __contains__(self, value: object) -> bool:
        return self.db.execute("SELECT 1 FROM ids WHERE id = ?", (value,)).fetchone() is not None

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM ids").fetchone()[0])

    def close(self) -> None:
        self.db.close()
        self._dir.cleanup()

    def __enter__(self) -> IdSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, raw line without its newline) for each line of PATH, streamed."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            yield number, raw.rstrip(b"\r\n")


@dataclass
class InputSummary:
    """What a valid input holds: request lines by url."""

    requests: int = 0
    by_url: dict[str, int] = field(default_factory=dict)


def check_request(raw: bytes, served_name: str) -> tuple[dict[str, Any] | None, str]:
    """RAW (one input line) as a request, or (None, what is wrong with it)."""
    if len(raw) > MAX_LINE:
        return None, f"longer than {MAX_LINE >> 20} MiB"
    try:
        req = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"not JSON ({exc.msg if isinstance(exc, json.JSONDecodeError) else 'not UTF-8'})"
    if not isinstance(req, dict):
        return None, f"a JSON {type(req).__name__}, not an object"
    cid = req.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return None, "custom_id is missing (a non-empty string)"
    if req.get("method", "POST") != "POST":
        return None, f"method {req.get('method')!r}: only POST"
    if req.get("url") not in URLS:
        return None, f"url {req.get('url')!r}: one of {', '.join(URLS)}"
    body = req.get("body")
    if not isinstance(body, dict):
        return None, "body is missing (an object)"
    model = body.get("model")
    if model is not None and model != served_name:
        return None, f"body.model {model!r} is not the served model {served_name!r}"
    return req, ""


def validate(path: Path, served_name: str) -> InputSummary:
    """Check every line of the input at PATH, streaming: JSON, custom_id present and unique, url,
    body.model (if given) the served name. BatchInputError lists the first MAX_SHOWN errors, one a
    line with its line number, then how many more."""
    where = f"batch.input: {path}"
    try:
        if not path.is_file():
            raise BatchInputError(f"{where}: not a file")
    except OSError as exc:
        raise BatchInputError(f"{where}: {exc.strerror}") from None
    summary = InputSummary()
    errors: list[str] = []
    count = 0
    with IdSet() as seen:
        try:
            for number, raw in lines(path):
                if not raw.strip():
                    continue
                req, problem = check_request(raw, served_name)
                if req is not None:
                    first = seen.add(req["custom_id"], number)
                    if first is not None:
                        problem = f"custom_id {req['custom_id'][:60]!r} repeats line {first}"
                if problem:
                    count += 1
                    if len(errors) < MAX_SHOWN:
                        errors.append(f"{where} line {number}: {problem}")
                    continue
                assert req is not None
                summary.requests += 1
                summary.by_url[req["url"]] = summary.by_url.get(req["url"], 0) + 1
        except OSError as exc:
            raise BatchInputError(f"{where}: cannot read: {exc.strerror}") from None
    if count:
        more = f"\n… and {count - len(errors)} more errors" if count > len(errors) else ""
        raise BatchInputError("\n".join(errors) + more)
    if not summary.requests:
        raise BatchInputError(f"{where}: no requests (an empty file)")
    return summary


def repair(path: Path) -> int:
    """Cut a half-written last line (a crash mid-write: no newline at the end) from the output at
    PATH, so that its request runs again instead of leaving a broken line; the bytes cut."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        scan = size                      # back to the last newline, a chunk at a time
        while scan > 0:
            start = max(0, scan - 4096)
            f.seek(start)
            nl = f.read(scan - start).rfind(b"\n")
            if nl >= 0:
                scan = start + nl + 1
                break
            scan = start
        f.truncate(scan)
        return size - scan


def done_ids(path: Path) -> IdSet:
    """The custom_ids that already have a result line in the output at PATH (after repair())."""
    done = IdSet()
    if path.exists():
        for number, raw in lines(path):
            if raw.strip():
                try:
                    cid = json.loads(raw)["custom_id"]
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                    done.close()
                    raise BatchInputError(f"batch.output: {path} line {number}: not a result line "
                                          f"(another program's file?)") from None
                done.add(cid, number)
    return done
