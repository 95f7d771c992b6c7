"""Slurm hostlist expressions (`gpu[01-03,07],login1`) expanded to host names, in Slurm's order."""

from __future__ import annotations

import re

from slurm_vllm.core.errors import SlurmVllmError


def _split_top(expr: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SlurmVllmError(f"bad hostlist {expr!r}: unbalanced ']'")
        elif ch == "," and depth == 0:
            parts.append(expr[start:i])
            start = i + 1
    if depth:
        raise SlurmVllmError(f"bad hostlist {expr!r}: unbalanced '['")
    parts.append(expr[start:])
    return [p for p in parts if p]


def _expand_ranges(body: str, expr: str) -> list[str]:
    out = []
    for item in body.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not match:
            raise SlurmVllmError(f"bad hostlist {expr!r}: {item!r} is not a number or range")
        lo, hi = match.group(1), match.group(2) or match.group(1)
        width = len(lo)
        if int(hi) < int(lo):
            raise SlurmVllmError(f"bad hostlist {expr!r}: range {item!r} goes backwards")
        out += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    return out


def expand(expr: str) -> list[str]:
    """`node[1-3],gpu[01-02]x` → [node1, node2, node3, gpu01x, gpu02x]; several bracket groups work."""
    hosts: list[str] = []
    for part in _split_top(expr.strip()):
        names = [""]
        for piece in re.findall(r"\[[^\]]*\]|[^\[]+", part):
            if piece.startswith("["):
                names = [n + r for n in names for r in _expand_ranges(piece[1:-1], expr)]
            else:
                names = [n + piece for n in names]
        hosts += names
    return hosts
