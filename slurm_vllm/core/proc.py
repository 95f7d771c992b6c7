"""The only subprocess wrapper: run, spawn in a new process group, terminate the group."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from slurm_vllm.core.errors import SlurmVllmError

log = logging.getLogger(__name__)


class CommandError(SlurmVllmError):
    """A command failed: the message has the command, its exit code and the tail of its output."""


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")      # Ray colours its log prefixes


def _tail(text: str, lines: int = 15) -> str:
    """The last LINES non-empty lines of TEXT, without terminal colour codes (they go into one-line
    messages and JSON files)."""
    kept = [line for line in ANSI.sub("", text).splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def run(argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 60,
        check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion and capture its output."""
    log.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.run(list(argv), env=dict(env) if env is not None else None, input=input,
                              capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise CommandError(f"{argv[0]}: command not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(f"{' '.join(argv)}: no answer within {timeout:.0f} s") from exc
    if check and proc.returncode != 0:
        raise CommandError(f"{' '.join(argv)} failed (exit {proc.returncode}): "
                           f"{_tail(proc.stderr or proc.stdout, 5)}")
    return proc


@dataclass
class Child:
    """A long-running child in its own process group, output appended to a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def returncode(self) -> int | None:
        return self.popen.poll()

    def tail(self, lines: int = 15) -> str:
        try:
            return _tail(self.log_path.read_text(errors="replace"), lines)
        except OSError:
            return ""

    def terminate(self, timeout: float = 15) -> None:
        """SIGTERM the child's process group, SIGKILL it after TIMEOUT; reap the child."""
        terminate_all([self], timeout)


def kill(children: Sequence[Child]) -> None:
    """SIGKILL each child's process group now and reap the children (no grace period)."""
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.popen.pid, signal.SIGKILL)
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(timeout=5)


def terminate_all(children: Sequence[Child], timeout: float = 10) -> None:
    """SIGTERM every child's process group at once, SIGKILL what is left after TIMEOUT, reap them:
    one grace period for all, not one each.

    A group whose leader (the child) died already is signalled too: its other members (vLLM's
    worker processes after its `vllm serve` was killed) would otherwise live on as orphans. The
    group's id cannot be reused while any member lives; none left is ProcessLookupError."""
    stop_groups([c.popen.pid for c in children], timeout, still=lambda: any(running(c) for c in children))


def stop_groups(pgids: Sequence[int], grace: float, kill_wait: float = 5.0,
                still: Callable[[], bool] | None = None) -> None:
    """SIGTERM each process group of PGIDS, SIGKILL what is left after GRACE s, then wait up to
    KILL_WAIT s for it to go. STILL() says whether anything is left (default: a member of a group
    answers signal 0). The one TERM→grace→KILL of slurm_vllm: the rank's teardown and its watchdog."""
    left = still or (lambda: any(group_alive(g) for g in pgids))
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)):
        for pgid in pgids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while left() and time.monotonic() < deadline:
            time.sleep(0.05)


def running(child: Child) -> bool:
    """Does anything of CHILD's process group still run? (Its leader is reaped first, so that a
    zombie leader does not count.)"""
    child.popen.poll()
    return group_alive(child.popen.pid)


def group_alive(pgid: int) -> bool:
    """Does a process of group PGID still run (signal 0 reaches a member)?"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Slurm's --signal=USR2@90 reaches every process of the job step, not only the ranks: a child that
# kept the default action would die of it (vLLM, Ray, a `docker run` that forwards it), while the
# rank wants them alive until its own orderly stop (a batch drains its requests in flight first).
# An ignored signal stays ignored across exec, so the child starts through this.
IGNORE_USR2 = ["sh", "-c", 'trap "" USR2 && exec "$@"', "slurm-vllm-child"]


def spawn(name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> Child:
    """Start ARGV in a new session (its own process group), SIGUSR2 ignored (IGNORE_USR2),
    stdout+stderr appended to LOG_PATH."""
    log.debug("spawn %s: %s", name, " ".join(argv))
    path = (env if env is not None else os.environ).get("PATH")
    if shutil.which(argv[0], path=path) is None:
        raise CommandError(f"{name}: {argv[0]}: command not found")
    with open(log_path, "ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {name}: {argv[0]} ...\n".encode())
        out.flush()
        try:
            popen = subprocess.Popen([*IGNORE_USR2, *argv], stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, env=dict(env) if env is not None else None,
                                     start_new_session=True)
        except FileNotFoundError as exc:
            raise CommandError(f"{name}: {argv[0]}: command not found") from exc
    return Child(name, popen, log_path)
