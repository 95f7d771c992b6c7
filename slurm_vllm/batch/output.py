"""The batch output and its parts folder, trusted only as this user's own: checked at submit, opened safely.

The default output (<jobs_root>/<name>.results.jsonl) and <output>.parts/ have predictable names,
usually on shared scratch. A line in the output counts as done, so a file someone else planted there
(lines for your custom_ids), a link (repair would cut the last line of whatever it points to) or the
input itself would make a job report DONE having sent nothing. So: the output is a regular file of
this user's that no one else can write, never followed as a link, never the input; its folder is one
others cannot rearrange (theirs to write only with the sticky bit); the parts folder is private.

An output also records which input its lines answer (`.<output>.input`: the input's path and a digest
of its bytes). Lines left by another batch with the same custom_ids, or by this input before it was
edited, would count as done with answers to other prompts: an output whose record names another
input, or that holds lines and no record, is refused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slurm_vllm.batch.reader import BatchInputError, verify_parts
from slurm_vllm.core import safefile
from slurm_vllm.core.errors import JobFolderError
from slurm_vllm.core.jobdir import atomic_write, make_private_dir
from slurm_vllm.core.jobsroot import folder_problem
from slurm_vllm.core.safefile import owner_name


def check_folder(folder: Path, what: str = "batch.output") -> None:
    """FOLDER exists, is a folder this user can write, and others cannot rearrange it."""
    problem = folder_problem(folder)
    if problem:
        raise BatchInputError(f"{what}: its folder {problem}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BatchInputError(f"{what}: its folder {folder} is not writable by you")


def _check_file(st: os.stat_result, output: Path, input_path: Path) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise BatchInputError(f"batch.output: {output} is a folder; name a file")
    if not stat.S_ISREG(st.st_mode):
        raise BatchInputError(f"batch.output: {output} is not a regular file: refused")
    if st.st_uid != os.geteuid():
        raise BatchInputError(f"batch.output: {output} belongs to {owner_name(st.st_uid)}, not to you: "
                              f"refused (its lines would count as done)")
    if st.st_mode & 0o022:
        raise BatchInputError(f"batch.output: {output} is writable by group or others (mode "
                              f"{stat.S_IMODE(st.st_mode):o}): refused (chmod go-w it if it is yours)")
    try:
        same = os.path.samefile(input_path, output)
    except OSError:
        same = False
    if same:
        raise BatchInputError(f"batch.output: {output} is the input itself: name another file")


def check_output(output: Path, input_path: Path, parts: Path | None = None) -> None:
    """At submit: the output may be written here, and what is there already is this user's own
    results (see the module's docstring); PARTS, if there, is a private folder of this user's."""
    check_folder(output.parent)
    try:
        st = os.lstat(output)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise BatchInputError(f"batch.output: {output} is a link: refused (name the file itself)")
        _check_file(st, output, input_path)
    if parts is not None and os.path.lexists(parts):
        verify_parts(parts)
    check_record(output, input_path, input_digest(input_path))


def open_output(output: Path, input_path: Path) -> int:
    """OUTPUT opened to read and append (created 0600 if missing): never through a link, and only
    when it passes the submit-time checks on the open file itself."""
    check_folder(output.parent)
    if os.path.islink(output):      # (O_NOFOLLOW below also refuses one planted after this look)
        raise BatchInputError(f"batch.output: {output} is a link: refused")
    flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(output, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BatchInputError(f"batch.output: {output} is a link: refused") from None
        raise BatchInputError(f"batch.output: {output}: {exc.strerror}") from None
    try:
        _check_file(os.fstat(fd), output, input_path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_parts(parts: Path) -> None:
    """The parts folder (<output>.parts) as a 0700 folder of this user's; a planted one is refused."""
    try:
        make_private_dir(parts)
    except JobFolderError as exc:
        raise BatchInputError(f"batch.output: {exc}") from None


def input_digest(input_path: Path) -> str:
    """A digest of the input's bytes (BLAKE2b, streamed)."""
    h = hashlib.blake2b(digest_size=16)
    with open(input_path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def record_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.input")


def check_record(output: Path, input_path: Path, digest: str) -> None:
    """OUTPUT's lines (if it has any) answer this input (DIGEST), by its record; else refused."""
    try:
        if os.lstat(output).st_size == 0:
            return
    except FileNotFoundError:
        return
    record = record_path(output)
    again = "choose another output, or remove it (and its record) to start again"
    try:
        data = json.loads(safefile.read_text(record, 4096))
    except FileNotFoundError:
        raise BatchInputError(f"batch.output: {output} holds results with no record of their input "
                              f"(another batch's?): {again}") from None
    except (JobFolderError, ValueError) as exc:
        raise BatchInputError(f"batch.output: its record {record}: {exc}") from None
    if not isinstance(data, dict) or data.get("input_digest") != digest:
        named = data.get("input") if isinstance(data, dict) else None
        same = named == str(input_path.resolve())
        raise BatchInputError(f"batch.output: {output} holds results of "
                              f"{'this input before it changed' if same else f'another input ({named})'}: "
                              f"{again}")


def write_record(output: Path, input_path: Path, digest: str) -> None:
    """Record that OUTPUT answers the input at INPUT_PATH (DIGEST): before its first line."""
    record = record_path(output)
    text = json.dumps({"input": str(input_path.resolve()), "input_digest": digest}) + "\n"
    try:
        if safefile.read_text(record, 4096) == text:
            return
    except FileNotFoundError:
        pass
    except JobFolderError as exc:
        raise BatchInputError(f"batch.output: its record {record}: {exc}") from None
    if os.path.islink(record):
        raise BatchInputError(f"batch.output: its record {record} is a link: refused")
    atomic_write(record, text, mode=0o600)


@dataclass(frozen=True)
class ResultLine:
    """One line of a batch's output (OpenAI's batch output format), with what it counts for."""

    data: bytes                # UTF-8 JSON and a newline
    ok: bool                   # a 2xx answer (else the server refused the request: an error line)
    tokens_in: int
    tokens_out: int
    aborted: bool = False      # the engine cut an answer short as it stopped: not a result


def result_line(custom_id: str, status: int, raw: bytes, request_id: str) -> ResultLine:
    """The output line for CUSTOM_ID answered with STATUS and body RAW (x-request-id REQUEST_ID)."""
    try:
        answer: Any = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        answer = {"text": raw.decode(errors="replace")}
    error = None if 200 <= status < 300 else {"code": str(status), "message": _message(answer)}
    line = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id or f"req_{uuid.uuid4().hex}",
                         "body": answer},
            "error": error}
    # A lone surrogate in the answer (\ud800) stays a JSON escape instead of failing to encode.
    data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8", errors="backslashreplace")
    usage = answer.get("usage") if isinstance(answer, dict) else None
    tokens = (int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)) \
        if isinstance(usage, dict) else (0, 0)
    choices = answer.get("choices") if isinstance(answer, dict) else None
    aborted = isinstance(choices, list) and any(isinstance(c, dict) and c.get("finish_reason") == "abort"
                                                 for c in choices)
    return ResultLine(data, error is None, *tokens, aborted=aborted)


def _message(answer: Any) -> str:
    """The error message of a refusal, whichever shape the server used ({"message"} or {"error":
    {"message"}}), at most 2000 characters."""
    if isinstance(answer, dict):
        inner = answer.get("error")
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])[:2000]
        if "message" in answer:
            return str(answer["message"])[:2000]
    return json.dumps(answer)[:2000]
