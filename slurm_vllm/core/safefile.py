"""Reading files in folders others may reach: never through a link, this user's regular files only, bounded.

A job folder and jobs_root usually sit on shared scratch. A file there is read only when it is a
regular file owned by this user (a secret: readable by no one else either), opened without following
a link and without blocking (a FIFO planted in its place is refused, not waited on), and never more
than a stated number of bytes. Text printed from such a file goes through `printable` first: no
terminal escapes, no bidi overrides.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import stat
from pathlib import Path

from slurm_vllm.core.errors import JobFolderError

MAX_RECORD = 1 << 20          # a typed job-folder file (stage, endpoint.json, batch.json …)
MAX_LOG_TAIL = 1 << 20        # what `logs` and a failure's explanation read from the end of a log

# C0 and C1 controls but tab and newline; the bidi overrides and isolates (they reorder what follows).
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")


def owner_name(uid: int) -> str:
    """UID's user name (or `uid N` when it has none)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def open_checked(path: Path, secret: bool = False) -> int:
    """A read-only descriptor of PATH: not a link, a regular file, this user's (and, for a SECRET, not
    readable or writable by group or others). JobFolderError (one line) otherwise; FileNotFoundError
    passes through (callers decide what a missing file means)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise JobFolderError(f"{path}: a link: refused (files here are never followed)") from None
        raise JobFolderError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise JobFolderError(f"{path}: not a regular file: refused")
        if st.st_uid != os.geteuid():
            raise JobFolderError(f"{path}: belongs to {owner_name(st.st_uid)}, not to you: refused")
        if secret and st.st_mode & 0o077:
            raise JobFolderError(f"{path}: a secret others can reach (mode {stat.S_IMODE(st.st_mode):o}): "
                                 f"refused (chmod 600 it if it is yours)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: Path, limit: int = MAX_RECORD, secret: bool = False) -> bytes:
    """PATH's bytes (see open_checked), at most LIMIT of them: a larger file is refused."""
    fd = open_checked(path, secret)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise JobFolderError(f"{path}: {size} bytes, more than the {limit} read here: refused")
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, min(1 << 16, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:           # grew while read
                raise JobFolderError(f"{path}: more than the {limit} bytes read here: refused")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path: Path, limit: int = MAX_RECORD, secret: bool = False) -> str:
    return read_bytes(path, limit, secret).decode("utf-8", errors="replace")


def tail(path: Path, lines: int, limit: int = MAX_LOG_TAIL) -> list[str]:
    """The last LINES lines of PATH (see open_checked), reading at most LIMIT bytes from its end."""
    fd = open_checked(path)
    try:
        size = os.fstat(fd).st_size
        start = max(0, size - limit)
        os.lseek(fd, start, os.SEEK_SET)
        data = b""
        while len(data) < size - start and (chunk := os.read(fd, 1 << 16)):
            data += chunk
    finally:
        os.close(fd)
    text = data.decode("utf-8", errors="replace").splitlines()
    if start > 0 and text:
        text = text[1:]                 # the first line read is cut
    return text[-lines:] if lines > 0 else []


def read_input(path: Path, limit: int) -> bytes:
    """A file the user names (a spec, a template, a model's config.json): links followed and any
    owner (a site's template may be the admin's), but a regular file only (a FIFO is refused, not
    waited on) and at most LIMIT bytes. OSError (strerror) when it cannot be opened; ValueError
    (a reason) when it is not a regular file or is larger."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{st.st_size} bytes: at most {limit} are read")
        data = os.read(fd, limit + 1)
        while len(data) <= limit and (chunk := os.read(fd, limit + 1 - len(data))):
            data += chunk
        if len(data) > limit:
            raise ValueError(f"over {limit} bytes: at most {limit} are read")
        return data
    finally:
        os.close(fd)


def printable(text: str) -> str:
    """TEXT without terminal controls or bidi overrides (newlines and tabs kept): safe to print."""
    return _UNPRINTABLE.sub("\N{REPLACEMENT CHARACTER}", text)
