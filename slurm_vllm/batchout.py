"""The batch output and its parts folder, trusted only as this user's own: checked at submit, opened safely.

The default output (<jobs_root>/<name>.results.jsonl) and <output>.parts/ have predictable names,
usually on shared scratch. A line in the output counts as done, so a file someone else planted there
(lines for your custom_ids), a link (repair would cut the last line of whatever it points to) or the
input itself would make a job report DONE having sent nothing. So: the output is a regular file of
this user's that no one else can write, never followed as a link, never the input; its folder is one
others cannot rearrange (theirs to write only with the sticky bit); the parts folder is private.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .batchio import BatchInputError, verify_parts
from .errors import JobFolderError
from .jobdir import make_private_dir, owner_name


def check_folder(folder: Path, what: str = "batch.output") -> None:
    """FOLDER exists, is a folder this user can write, and others cannot rearrange it."""
    try:
        st = os.stat(folder)
    except OSError as exc:
        raise BatchInputError(f"{what}: its folder {folder}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise BatchInputError(f"{what}: {folder} is not a folder")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise BatchInputError(f"{what}: its folder {folder} is writable by group or others without the "
                              f"sticky bit (mode {stat.S_IMODE(st.st_mode):o}): others could replace the "
                              f"output; use a folder of your own")
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
