"""A rank's children with real processes: a rank killed outright (SIGKILL) leaves nothing running
(the watchdog), and the time-limit signal does not kill them before the rank stops them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

RANK = """
import subprocess, sys, time
from slurm_vllm.node.watchdog import Watchdog
dog = Watchdog()
child = subprocess.Popen(["sh", "-c", "sleep 1000 & sleep 1000"], start_new_session=True)
dog.watch(child.pid)
dog.cleanup(["touch", sys.argv[1]])
print(child.pid, dog.popen.pid, flush=True)
time.sleep(1000)
"""


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def start_rank(tmp_path: Path) -> tuple[subprocess.Popen[str], int, int]:
    argv = [sys.executable, "-c", RANK, str(tmp_path / "cleaned")]
    rank = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert rank.stdout is not None
    child, dog = map(int, rank.stdout.readline().split())
    return rank, child, dog


def test_a_rank_killed_outright_leaves_no_process_and_its_cleanup_runs(tmp_path: Path) -> None:
    rank, child, _ = start_rank(tmp_path)
    assert group_alive(child)
    os.kill(rank.pid, signal.SIGKILL)                # the OOM killer, or slurmstepd's SIGKILL
    rank.wait()
    deadline = time.monotonic() + 15
    while (group_alive(child) or not (tmp_path / "cleaned").exists()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_alive(child), "the rank's children outlived it"
    assert (tmp_path / "cleaned").exists(), "the cleanup command (container removal) did not run"


def test_signals_for_the_rank_do_not_stop_the_watchdog_and_done_disarms_it() -> None:
    """scancel's SIGTERM reaches every process of the step: the watchdog ignores it (it acts on the
    rank's death only); after `done` (the rank tore down itself) it exits and touches nothing."""
    from slurm_vllm.node.watchdog import Watchdog

    dog = Watchdog()
    child = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    try:
        dog.watch(child.pid)
        os.kill(dog.popen.pid, signal.SIGTERM)
        dog.done()
        assert dog.popen.wait(timeout=5) == 0            # not -15: the SIGTERM did not end it
        assert child.poll() is None                      # done: the child was left alone
    finally:
        child.kill()
        child.wait()


def test_children_outlive_the_time_limit_signal_until_the_rank_stops_them(tmp_path: Path) -> None:
    """Slurm's SIGUSR2 (--signal=USR2@90) reaches every process of the step: a rank's child must not
    die of it (a batch drains its requests first), yet SIGTERM from the rank's teardown ends it."""
    from slurm_vllm.core import proc

    child = proc.spawn("sleeper", ["python3", "-c", "import time; time.sleep(60)"], tmp_path / "s.log")
    try:
        deadline = time.monotonic() + 10            # until the wrapper has exec'd python
        while Path(f"/proc/{child.popen.pid}/comm").read_text().strip() != "python3":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(child.popen.pid, signal.SIGUSR2)
        with pytest.raises(subprocess.TimeoutExpired):
            child.popen.wait(timeout=0.3)           # still running after the signal
    finally:
        proc.terminate_all([child], timeout=5)
    assert child.returncode() == -signal.SIGTERM
    with pytest.raises(proc.CommandError, match="sleeper: no-such-program: command not found"):
        proc.spawn("sleeper", ["no-such-program"], tmp_path / "s.log")
