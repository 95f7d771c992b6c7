"""Job specs for the e2e tests: a test-bed config (tests/configs) written elsewhere with changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"       # the test bed's specs


def derive(folder: Path, base: str, name: str | None = None, **changes: Any) -> Path:
    """CONFIGS/BASE as FOLDER/NAME.yaml (the spec renamed NAME; default: BASE's file and name), with
    CHANGES: a dotted key sets one value inside its section ({"slurm.time": "2"}, {"env.X": "1"}),
    a plain key a top-level one (preflight=True)."""
    data = yaml.safe_load((CONFIGS / base).read_text())
    if name is not None:
        data["name"] = name
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = folder / (f"{name}.yaml" if name is not None else base)
    path.write_text(yaml.safe_dump(data))
    return path
