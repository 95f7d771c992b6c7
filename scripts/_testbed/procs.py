"""Daemons the test bed starts: spawn detached, record PID + start time, stop by that record only."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import STATE

PIDS = STATE / "pids"
LOGS = STATE / "log"


def start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in ticks), or None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def run(argv: Sequence[str], check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a short command, capture its output; on failure raise with the command and its stderr."""
    proc = subprocess.run(list(argv), text=True, capture_output=True, **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"command failed (rc={proc.returncode}): {' '.join(argv)}\n{proc.stdout}{proc.stderr}"
        )
    return proc  # type: ignore[no-any-return]


def spawn(name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> int:
    """Start a long-running daemon in its own session, log to log/NAME.log, record its PID.

    Its working directory is /: a daemon must not keep the caller's folder (a checkout under
    /tmp does not exist inside the nodes, whose /tmp is their own, and slurmstepd then fails to
    return to it)."""
    PIDS.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    with open(LOGS / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env=env, cwd="/",
        )
    start = None
    for _ in range(100):
        start = start_time(proc.pid)
        if start:
            break
        time.sleep(0.01)
    (PIDS / f"{name}.pid").write_text(f"{proc.pid} {start}\n")
    return proc.pid


def pid_of(name: str) -> int | None:
    """The recorded PID of daemon NAME if that very process is still alive."""
    try:
        pid_s, start = (PIDS / f"{name}.pid").read_text().split()
    except (OSError, ValueError):
        return None
    pid = int(pid_s)
    return pid if start_time(pid) == start else None


def recorded() -> list[str]:
    return sorted(p.stem for p in PIDS.glob("*.pid")) if PIDS.is_dir() else []


def wait_for(
    what: str, cond: Callable[[], bool], timeout: float, dead: Callable[[], bool] = lambda: False
) -> None:
    """Poll COND until true; raise after TIMEOUT s, or at once when DEAD() says the daemon died."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while not cond():
        if dead():
            raise RuntimeError(f"{what}: the process died (see {LOGS})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what} (see {LOGS})")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def kill_all(targets: list[tuple[int, str | None]], timeout: float = 15.0) -> None:
    """SIGTERM every (pid, start time) that is still the process recorded, SIGKILL the rest after TIMEOUT."""
    def alive() -> list[tuple[int, str | None]]:
        return [(pid, start) for pid, start in targets
                if start_time(pid) is not None and (start is None or start_time(pid) == start)]

    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for pid, _ in alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)


def stop_all(names: list[str], timeout: float = 15.0) -> None:
    """Stop the daemons NAMES by their recorded PIDs (never by name), together; then forget them."""
    targets = []
    for name in names:
        try:
            pid_s, start = (PIDS / f"{name}.pid").read_text().split()
            targets.append((int(pid_s), start))
        except (OSError, ValueError):
            pass
    kill_all(targets, timeout)
    for name in names:
        (PIDS / f"{name}.pid").unlink(missing_ok=True)


def pids_in_netns(ns_inode: int) -> list[int]:
    """Every process whose network namespace is NS_INODE (processes inside one test-bed node)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(entry / "ns" / "net").st_ino == ns_inode:
                found.append(int(entry.name))
        except OSError:
            continue
    return found
