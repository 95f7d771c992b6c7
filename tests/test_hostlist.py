"""Slurm hostlist expansion."""

import pytest

from slurm_vllm.core.errors import SlurmVllmError
from slurm_vllm.node.hostlist import expand

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("expr", "hosts"), [
    ("node1", ["node1"]),
    ("node[1-3]", ["node1", "node2", "node3"]),
    ("gpu[01-02,07],login", ["gpu01", "gpu02", "gpu07", "login"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("a[9-11]-ib", ["a9-ib", "a10-ib", "a11-ib"]),
])
def test_expand(expr: str, hosts: list[str]) -> None:
    assert expand(expr) == hosts


@pytest.mark.parametrize("expr", ["node[1-", "node]1", "node[a-b]", "node[3-1]"])
def test_bad(expr: str) -> None:
    with pytest.raises(SlurmVllmError, match="bad hostlist"):
        expand(expr)
