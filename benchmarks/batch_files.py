"""Benchmark: batch input validation and the driver's resume path (read-and-skip) at 1,000 and
1,000,000 lines: wall time and peak RSS, each in a fresh process.

Both stream their files and keep the custom_ids in SQLite on disk, so the peak memory at 1,000,000
lines should be within 10% of the figure at 1,000. Usage:
    python benchmarks/batch_files.py [--sizes 1000 1000000] [--dir /tmp/batch-bench]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import resource, sys, time
from pathlib import Path
from slurm_vllm.batch.driver import _cid
from slurm_vllm.batch.reader import done_ids, lines, validate
what, path, extra = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
t0 = time.monotonic()
if what == "validate":
    n = validate(path, "tiny").requests
else:                                   # the driver's resume pass: index the output, skip the input
    with done_ids(Path(extra)) as done:
        n = sum(1 for _, raw in lines(path) if raw.strip() and _cid(raw) in done)
print(n, round(time.monotonic() - t0, 2), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_files(folder: Path, n: int) -> tuple[Path, Path]:
    """An input of N chat requests, and an output holding a result for every other one."""
    inp, out = folder / f"in-{n}.jsonl", folder / f"out-{n}.jsonl"
    if not inp.exists():
        with open(inp, "w") as f, open(out, "w") as g:
            for i in range(n):
                cid = f"req-{i:09d}"
                body = {"model": "tiny", "max_tokens": 16,
                        "messages": [{"role": "user", "content": f"q {i}"}]}
                f.write(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                                    "body": body}) + "\n")
                if i % 2 == 0:
                    response = {"status_code": 200, "request_id": "r", "body": {"choices": []}}
                    g.write(json.dumps({"id": f"batch_req_{i}", "custom_id": cid, "response": response,
                                        "error": None}) + "\n")
    return inp, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 1_000_000])
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="batch-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = {}
    print(f"{'lines':>9} {'what':>9} {'seconds':>8} {'peak RSS MB':>12}")
    for n in args.sizes:
        inp, out = make_files(folder, n)
        for what in ("validate", "resume"):
            res = subprocess.run([sys.executable, "-c", CHILD, what, str(inp), str(out)], capture_output=True,
                                 text=True, check=True).stdout.split()
            count, seconds, rss_kb = int(res[0]), float(res[1]), int(res[2])
            rows[(n, what)] = rss_kb
            print(f"{n:>9} {what:>9} {seconds:>8.2f} {rss_kb / 1024:>12.1f}   ({count} lines counted)")
    small, large = min(args.sizes), max(args.sizes)
    for what in ("validate", "resume"):
        growth = rows[(large, what)] / rows[(small, what)] - 1
        print(f"{what}: peak RSS at {large} lines is {growth:+.1%} against {small} lines "
              f"({'within' if growth <= 0.10 else 'OVER'} 10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
