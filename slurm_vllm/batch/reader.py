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

from slurm_vllm.core import safefile
from slurm_vllm.core.errors import JobFolderError, SpecError
from slurm_vllm.core.jobdir import verify

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
    """(line number from 1, raw line without its newline) for each line of PATH, streamed; a line
    over MAX_LINE bytes is refused before it is read whole (BatchInputError names it)."""
    with open(path, "rb") as f:
        number = 0
        while raw := f.readline(MAX_LINE + 1):
            number += 1
            if len(raw) > MAX_LINE:
                raise BatchInputError(f"{path} line {number}: longer than {MAX_LINE} bytes: refused")
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
        req = json.loads(raw, parse_constant=_not_json)
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc.msg})"
    except UnicodeDecodeError:
        return None, "not JSON (not UTF-8)"
    except (ValueError, RecursionError) as exc:   # NaN/Infinity, a 5000-digit number, deep nesting
        return None, f"not JSON ({str(exc)[:100] if isinstance(exc, ValueError) else 'nested too deeply'})"
    if not isinstance(req, dict):
        return None, f"a JSON {type(req).__name__}, not an object"
    cid = req.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return None, "custom_id is missing (a non-empty string)"
    try:
        cid.encode("utf-8")
    except UnicodeEncodeError:
        return None, "custom_id is not valid Unicode text (a lone surrogate escape)"
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
    if body.get("stream"):
        return None, "body.stream: a streamed answer is not a batch result (leave stream out)"
    return req, ""


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


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
    PATH (never through a link), so that its request runs again instead of leaving a broken line;
    the bytes cut."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        return repair_fd(fd)
    finally:
        os.close(fd)


def repair_fd(fd: int) -> int:
    """repair() on an output already open (read and write) as FD."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return 0
    scan = size                          # back to the last newline, a chunk at a time
    while scan > 0:
        start = max(0, scan - 4096)
        nl = os.pread(fd, scan - start, start).rfind(b"\n")
        if nl >= 0:
            scan = start + nl + 1
            break
        scan = start
    os.ftruncate(fd, scan)
    return size - scan


def verify_parts(parts: Path) -> None:
    """The parts folder is this user's and no one else can write it (else its parts are not merged)."""
    try:
        verify(parts, "parts folder")
    except JobFolderError as exc:
        raise BatchInputError(f"batch.output: {exc}") from None


def complete_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Like lines(), without a last line that has no newline yet (another job is writing it); PATH
    (a part) only as a regular file of this user's, not a link."""
    with os.fdopen(safefile.open_checked(path), "rb") as f:
        for number, raw in enumerate(f, 1):
            if raw.endswith(b"\n"):
                yield number, raw.rstrip(b"\r\n")


def result_id(path: Path, number: int, raw: bytes) -> str:
    """The custom_id of result line NUMBER (RAW) of PATH; BatchInputError if it is not a result line."""
    cid = request_id(raw)
    if cid is not None:
        return cid
    raise BatchInputError(f"batch.output: {path} line {number}: not a result line (another program's file?)")


def done_ids(*paths: Path) -> IdSet:
    """The custom_ids that already have a result line in any of the outputs at PATHS (a missing one
    counts as empty; a half-written last line, of a job still writing, is not counted)."""
    done = IdSet()
    try:
        for path in paths:
            if path.exists():
                for number, raw in complete_lines(path):
                    if raw.strip():
                        done.add(result_id(path, number, raw), number)
    except BaseException:
        done.close()
        raise
    return done


def request_id(raw: bytes) -> str | None:
    """The custom_id of an input or result line, or None if it has none."""
    try:
        value = json.loads(raw).get("custom_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, RecursionError, ValueError):
        return None
    return value if isinstance(value, str) else None
