"""What a file holds does not set what the CLI's memory holds: the peak RSS of the real CLI reading
gigabyte files (sparse: they take no disk) stays near its size on a small spec, and each is refused
or read from its end with one line. Before the bounds: a 1 GiB batch line took 2.2 GB, a 3 GB spec
3.2 GB, `logs -n 5` of a 500 MB log 1.2 GB, a 1 GiB index entry 2.1 GB (issue 18, §7)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .test_trust import ready_job

pytestmark = pytest.mark.unit
GIB = 1 << 30
BOUND_KIB = 200 * 1024          # the CLI alone peaks near 40 MB; reading any of these files is >= 1 GB

# Runs the CLI as its only child and reports that child's peak RSS (RUSAGE_CHILDREN: KiB on Linux).
WRAP = """
import json, resource, subprocess, sys
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": r.returncode, "out": r.stdout[-2000:], "err": r.stderr[-2000:],
                  "peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def sparse(path: Path, size: int, head: bytes = b"", tail: bytes = b"") -> Path:
    """A file of SIZE bytes: HEAD, a hole, TAIL (the hole reads as NUL bytes)."""
    with path.open("wb") as f:
        f.write(head)
        f.truncate(size - len(tail))
        f.seek(size - len(tail))
        f.write(tail)
    return path


def peak(home: Path, *args: str) -> dict[str, object]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "SLURM_VLLM_INDEX": str(home / "index")}
    out = subprocess.run([sys.executable, "-c", WRAP, sys.executable, "-m", "slurm_vllm", *args],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout)
    print(f"{' '.join(args)[-60:]}: peak {int(str(result['peak_kib'])) // 1024} MiB, rc {result['rc']}")
    return result


def spec_file(home: Path, **extra: object) -> Path:
    body = {"name": "j", "model": {"path": "/models/m"}, "jobs_root": str(home / "jobs"), **extra}
    path = home / "job.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_a_small_spec_sets_the_baseline(tmp_path: Path) -> None:
    r = peak(tmp_path, "validate", str(spec_file(tmp_path)))
    assert r["rc"] == 0, r
    assert int(str(r["peak_kib"])) < BOUND_KIB, r


def test_a_3_gib_spec_is_refused_without_reading_it(tmp_path: Path) -> None:
    spec = sparse(tmp_path / "huge.yaml", 3 * GIB, head=b"name: j\n")
    r = peak(tmp_path, "validate", str(spec))
    assert r["rc"] == 2 and "a spec is at most" in str(r["err"]), r
    assert int(str(r["peak_kib"])) < BOUND_KIB, r


def test_a_1_gib_batch_line_without_a_newline_is_refused_by_line(tmp_path: Path) -> None:
    start = b'{"custom_id": "a", "url": "/v1/completions", "body": {"p": "'
    inp = sparse(tmp_path / "in.jsonl", GIB, head=start)
    spec = spec_file(tmp_path, mode="batch", batch={"input": str(inp)})
    (tmp_path / "jobs").mkdir(mode=0o700)
    r = peak(tmp_path, "validate", str(spec))
    assert r["rc"] == 2 and "line 1" in str(r["err"]) and len(str(r["err"]).splitlines()) <= 3, r
    assert int(str(r["peak_kib"])) < BOUND_KIB, r


def test_logs_of_a_512_mib_log_read_its_end_only(tmp_path: Path) -> None:
    jd = ready_job(tmp_path / "jobs" / "j-1")
    sparse(jd.logs / "vllm-0.log", 512 << 20, head=b"first\n", tail=b"\nnext to last\nthe last line\n")
    r = peak(tmp_path, "logs", str(jd.path), "-n", "2")
    assert r["rc"] == 0 and "the last line" in str(r["out"]) and "first" not in str(r["out"]), r
    assert int(str(r["peak_kib"])) < BOUND_KIB, r


def test_a_1_gib_index_entry_is_skipped_not_read(tmp_path: Path) -> None:
    ready_job(tmp_path / "jobs" / "j-1")
    (tmp_path / "index").mkdir(mode=0o700)
    sparse(tmp_path / "index" / "77.json", GIB, head=b'{"job_id": "77", "folder": "')
    r = peak(tmp_path, "list")
    assert r["rc"] in (0, 1) and "Traceback" not in str(r["err"]), r
    assert int(str(r["peak_kib"])) < BOUND_KIB, r
