"""A rank's watchdog: when the rank dies without its teardown (SIGKILL, the OOM killer), it kills
the process groups the rank started and runs the rank's cleanup commands (container removal).

A rank's children run in sessions of their own (so that one signal reaches each whole tree); if
the rank itself is killed outright, nothing would stop them: Ray's raylet and agents, vLLM or a
container would outlive the job (Slurm's proctrack/linuxproc loses them once they are orphans).
`python -m slurm_vllm.node.watchdog` is started by the rank in a session of its own and reads lines
from a pipe: `pgid N`, `cleanup ARGV-AS-JSON`, `done` (the rank tore everything down itself). At
EOF without `done` (the rank died), it SIGTERMs the groups, SIGKILLs what is left 5 s later, runs the
cleanup commands, and exits. Signals meant for the rank (scancel, the time limit) do not stop it.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from typing import IO

from slurm_vllm.core import proc


def reap(groups: list[int], cleanup: list[list[str]], grace: float = 5.0) -> None:
    """SIGTERM each of GROUPS, SIGKILL those alive after GRACE seconds, then run each CLEANUP argv."""
    proc.stop_groups(groups, grace, kill_wait=0.0)
    for argv in cleanup:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60)


def serve(lines: IO[str]) -> int:
    """Read LINES until EOF; reap unless `done` came."""
    groups: list[int] = []
    cleanup: list[list[str]] = []
    for line in lines:
        word, _, rest = line.strip().partition(" ")
        if word == "pgid":
            groups.append(int(rest))
        elif word == "cleanup":
            cleanup.append([str(a) for a in json.loads(rest)])
        elif word == "done":
            return 0
    reap(groups, cleanup)
    return 0


class Watchdog:
    """The rank's side: start the watchdog, tell it what to clean, say done after the teardown."""

    def __init__(self) -> None:
        self.popen = subprocess.Popen([sys.executable, "-m", "slurm_vllm.node.watchdog"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      start_new_session=True)
        assert self.popen.stdout is not None
        self.popen.stdout.readline()         # "ready": from here on, the rank's signals pass it by

    def _say(self, line: str) -> None:
        assert self.popen.stdin is not None
        with contextlib.suppress(BrokenPipeError, ValueError):
            self.popen.stdin.write(line + "\n")
            self.popen.stdin.flush()

    def watch(self, pgid: int) -> None:
        self._say(f"pgid {pgid}")

    def cleanup(self, argv: list[str]) -> None:
        self._say(f"cleanup {json.dumps(argv)}")

    def done(self) -> None:
        """The rank tore down what it started: the watchdog exits without doing anything."""
        self._say("done")
        with contextlib.suppress(OSError):
            assert self.popen.stdin is not None
            self.popen.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)


if __name__ == "__main__":
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    print("ready", flush=True)
    sys.exit(serve(sys.stdin))
