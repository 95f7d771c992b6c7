"""The ranks' heartbeat over the job's own network: a node that stops answering is named within seconds.

A job folder on a shared file system says nothing about the network the job uses (it often runs
over another one, and on the test bed over none), so each node of a multi-node job answers TCP
connects on its heartbeat port, on the job's address (Beacon), and the head probes every worker
while a worker probes the head (Watch), once a second. A peer whose probes have failed for SILENCE
seconds is gone: the head fails the job naming it, a worker stops its own processes. The handshake
is the kernel's (the listening socket's backlog), not the program's: a node whose CPUs are busy
still answers; and a prober starved of CPU has seen no failed probe, so it says nothing. Load alone
does not make a node look gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import threading
import time
from dataclasses import dataclass

SILENCE = 10.0          # seconds without a completed connect before a peer counts as gone
PROBE_EVERY = 1.0       # seconds between two probes of one peer
CONNECT_TIMEOUT = 1.0   # one probe's wait for the handshake
SUSPECT = 3.0           # a peer silent this long is named as the likely cause when a child dies
SIOCGIFFLAGS, IFF_UP, IFF_RUNNING = 0x8913, 0x1, 0x40


class Beacon:
    """Answers connects on (IP, PORT) until stopped: the proof, to the other ranks, that this node
    is on the job's network."""

    def __init__(self, ip: str, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((ip, port))
        except OSError:
            self.sock.close()
            raise
        self.sock.listen(64)
        self.thread = threading.Thread(target=self._serve, name="heartbeat-beacon", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return                       # closed by stop()
            conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@dataclass
class Peer:
    name: str                 # e.g. "node2 (rank 1)"
    ip: str
    port: int
    last_ok: float            # time.time() of the last completed connect (or when watching began)
    silent_since: float = 0.0  # time.time() of the first failed probe after the last success; 0: none
    failures: int = 0          # failed probes since the last success
    longest: float = 0.0       # the longest time between two completed connects seen (load's effect)


class Watch:
    """Probes each peer added, in a thread; `gone()` names those silent for SILENCE seconds."""

    def __init__(self, silence: float | None = None) -> None:
        self.silence = SILENCE if silence is None else silence
        self.peers: dict[str, Peer] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="heartbeat-watch", daemon=True)
        self.thread.start()

    def add(self, key: str, name: str, ip: str, port: int) -> None:
        with self.lock:
            if key not in self.peers:
                self.peers[key] = Peer(name, ip, port, time.time())

    def watching(self, key: str) -> bool:
        with self.lock:
            return key in self.peers

    def _run(self) -> None:
        while not self.stopped.is_set():
            with self.lock:
                peers = list(self.peers.values())
            for peer in peers:
                ok = probe(peer.ip, peer.port)
                with self.lock:
                    if ok:
                        now = time.time()
                        peer.longest = max(peer.longest, now - peer.last_ok)
                        peer.last_ok, peer.silent_since, peer.failures = now, 0.0, 0
                    else:
                        peer.silent_since = peer.silent_since or time.time()
                        peer.failures += 1
            self.stopped.wait(PROBE_EVERY)

    def silent(self, for_at_least: float) -> list[Peer]:
        """The peers whose probes have failed for FOR_AT_LEAST seconds, at least twice. Counted from
        failed probes, not from the last answer: a prober that did not run (this node starved of CPU)
        has seen no failure and says nothing."""
        now = time.time()
        with self.lock:
            return [p for p in self.peers.values()
                    if p.failures >= 2 and now - p.silent_since >= for_at_least]

    def gone(self) -> list[Peer]:
        return self.silent(self.silence)

    def stop(self) -> None:
        self.stopped.set()

    def summary(self) -> str:
        """One line for the task's log: each peer's longest gap between two answers."""
        with self.lock:
            gaps = ", ".join(f"{p.name} {p.longest:.1f} s" for p in self.peers.values())
        return (f"heartbeat: longest time without an answer: {gaps or 'no peer watched'} "
                f"(limit {self.silence:g} s)")


def probe(ip: str, port: int) -> bool:
    """Does (IP, PORT) complete a TCP handshake within CONNECT_TIMEOUT?"""
    try:
        with socket.create_connection((ip, port), timeout=CONNECT_TIMEOUT):
            return True
    except OSError:
        return False


def interface_down(interface: str) -> bool:
    """Is this node's INTERFACE down (set down, or no carrier)? Then the silence is this node's own.
    Asked of the kernel for this process's network namespace (SIOCGIFFLAGS), not of /sys, which
    may show another namespace's interfaces."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, struct.pack("16sH", interface.encode()[:15], 0))
        except OSError:
            return False                      # no such interface here: nothing to say
    flags = struct.unpack("16sH", raw[:18])[1]
    return not (flags & IFF_UP and flags & IFF_RUNNING)


def says(peer: Peer, interface: str, ours: bool = False) -> str:
    """The failure line for a peer gone: the node, its address, when it went silent, for how long;
    whether this node's own link is the one down."""
    since = peer.silent_since or peer.last_ok
    waited = time.time() - peer.last_ok
    at = time.strftime("%H:%M:%S", time.localtime(since))
    line = (f"{peer.name} ({peer.ip}) stopped answering at {at} "
            f"(no answer on the job's network for {waited:.0f} s)")
    if ours or interface_down(interface):
        line += f"; this node's own {interface} is down: the loss is on this side"
    return line
