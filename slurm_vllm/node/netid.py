"""This node's one network identity: the address on the chosen interface, or on the route to the head."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import psutil

from slurm_vllm.core.errors import ClusterError


@dataclass(frozen=True)
class Identity:
    """This node's one network identity, decided once and applied to Ray, vLLM, NCCL and gloo."""

    hostname: str
    ip: str
    interface: str
    head_ip: str


def route_ip(target: str) -> str:
    """The local address the kernel would use to reach TARGET (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((target, 9))
        return str(s.getsockname()[0])


def interface_addresses() -> dict[str, tuple[str, str]]:
    """{interface: (IPv4, netmask)} of this node."""
    out: dict[str, tuple[str, str]] = {}
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET:
                out.setdefault(name, (a.address, a.netmask or "255.255.255.255"))
    return out


def interface_of(ip: str) -> str:
    for name, (address, _) in interface_addresses().items():
        if address == ip:
            return name
    raise ClusterError(f"no network interface holds {ip}")


def interface_network(interface: str) -> ipaddress.IPv4Network:
    ip, mask = interface_addresses()[interface]
    return ipaddress.IPv4Network(f"{ip}/{mask}", strict=False)


def identity(head_host: str, interface: str | None, head_ip: str | None = None) -> Identity:
    """This node's address: on INTERFACE if given, else the one on the route to the head."""
    if interface:
        addrs = interface_addresses()
        if interface not in addrs:
            have = ", ".join(f"{n} {a[0]}" for n, a in sorted(addrs.items()))
            raise ClusterError(f"network.interface: {interface} has no IPv4 address on "
                               f"{socket.gethostname()} (interfaces here: {have})")
        ip = addrs[interface][0]
        return Identity(socket.gethostname(), ip, interface, head_ip or ip)
    resolved = head_ip or socket.gethostbyname(head_host)
    ip = route_ip(resolved)
    if ip.startswith("127."):
        ip = resolved         # this is the head: its address on the route others use
    return Identity(socket.gethostname(), ip, interface_of(ip), resolved)
