"""Network plumbing: two bridges on the host, one network namespace per node with eth0 and eth1."""

from __future__ import annotations

import os
from pathlib import Path

from .config import (
    HOSTS_BEGIN,
    HOSTS_END,
    NETNS_PREFIX,
    NETWORKS,
    NODE_IFNAMES,
    host_ip,
    netns,
    node_ip,
    node_name,
)
from .procs import run

HOSTS = Path("/etc/hosts")


def _exists(kind: str, name: str) -> bool:
    if kind == "link":
        return Path(f"/sys/class/net/{name}").exists()
    return Path(f"/run/netns/{name}").exists()


def up(nodes: int) -> None:
    for bridge, _ in NETWORKS:
        if not _exists("link", bridge):
            run(["ip", "link", "add", bridge, "type", "bridge"])
    for net, (bridge, _) in enumerate(NETWORKS):
        run(["ip", "addr", "replace", f"{host_ip(net)}/24", "dev", bridge])
        run(["ip", "link", "set", bridge, "up"])
    for i in range(1, nodes + 1):
        ns = netns(i)
        if not _exists("netns", ns):
            run(["ip", "netns", "add", ns])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        for net, (bridge, _) in enumerate(NETWORKS):
            outside = f"svt{i}{NODE_IFNAMES[net]}"          # e.g. svt1eth0, on the host side
            if not _exists("link", outside):
                run(["ip", "link", "add", outside, "type", "veth", "peer", "name", "tmp" + outside])
                run(["ip", "link", "set", "tmp" + outside, "netns", ns])
                run(["ip", "-n", ns, "link", "set", "tmp" + outside, "name", NODE_IFNAMES[net]])
            run(["ip", "link", "set", outside, "master", bridge, "up"])
            run(["ip", "-n", ns, "addr", "replace", f"{node_ip(i, net)}/24", "dev", NODE_IFNAMES[net]])
            run(["ip", "-n", ns, "link", "set", NODE_IFNAMES[net], "up"])
        run(["ip", "-n", ns, "route", "replace", "default", "via", host_ip(0)])
    write_hosts(nodes)


def down() -> None:
    netns_dir = Path("/run/netns")
    for entry in sorted(netns_dir.glob(f"{NETNS_PREFIX}*")) if netns_dir.is_dir() else []:
        run(["ip", "netns", "del", entry.name], check=False)
    for link in Path("/sys/class/net").iterdir():
        if link.name.startswith("svt") and link.name[3:4].isdigit():
            run(["ip", "link", "del", link.name], check=False)
    for bridge, _ in NETWORKS:
        if _exists("link", bridge):
            run(["ip", "link", "del", bridge], check=False)
    restore_hosts()


def netns_inode(i: int) -> int | None:
    try:
        return os.stat(f"/run/netns/{netns(i)}").st_ino
    except OSError:
        return None


def _strip_block(text: str) -> str:
    out, inside = [], False
    for line in text.splitlines(keepends=True):
        if line.strip() == HOSTS_BEGIN:
            inside = True
        elif line.strip() == HOSTS_END:
            inside = False
        elif not inside:
            out.append(line)
    return "".join(out)


def write_hosts(nodes: int) -> None:
    lines = [HOSTS_BEGIN]
    for i in range(1, nodes + 1):
        lines.append(f"{node_ip(i)}\t{node_name(i)}")
        lines.append(f"{node_ip(i, 1)}\t{node_name(i)}-{NODE_IFNAMES[1]}")
    lines.append(HOSTS_END)
    base = _strip_block(HOSTS.read_text())
    if not base.endswith("\n"):
        base += "\n"
    # /etc/hosts may be a bind mount (containers): rewrite in place, never rename over it.
    HOSTS.write_text(base + "\n".join(lines) + "\n")


def restore_hosts() -> None:
    text = HOSTS.read_text()
    stripped = _strip_block(text)
    if stripped != text:
        HOSTS.write_text(stripped)
