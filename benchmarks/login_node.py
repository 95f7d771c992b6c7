"""Benchmark: what a user waits for on the login node: whole CLI processes (`--help`, `validate`,
`render`, a refused `validate` of a 2 MiB spec, and with the test bed up `status` and `list`), and the
pure work (plan, render, hostlist) for a 1,024-node job in process. Targets: each command under 0.3 s,
the 1,024-node work under 0.1 s.

Usage (`eval "$(scripts/testbed env)"` for status/list; without it they are left out):
    python benchmarks/login_node.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = """name: big
model: {path: /models/m, served_name: m}
slurm: {nodes: 1024, gpus_per_node: 8, partition: gpu, time: "12:00:00"}
container: {runtime: apptainer, image: /images/vllm.sif, binds: ["/models:/models:ro"]}
vllm: {args: {max_model_len: 8192}}
jobs_root: %s
"""


def timed(argv: list[str], runs: int) -> float:
    """The median wall time of ARGV as a whole process."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, cwd=ROOT, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="login-bench-"))
    spec = folder / "big.yaml"
    spec.write_text(SPEC % (folder / "jobs"))
    huge = folder / "huge.yaml"           # refused by its size, before it is parsed
    huge.write_bytes(b"name: t\n" + b"#" * (2 << 20))
    cli = [sys.executable, "-m", "slurm_vllm"]
    cases = {"--help": [*cli, "--help"], "validate": [*cli, "validate", str(spec)],
             "render": [*cli, "render", str(spec)], "refused": [*cli, "validate", str(huge)]}
    if os.environ.get("SLURM_VLLM_TEST_JOBS_ROOT"):
        cases |= {"status": [*cli, "status", "1", "--json"], "list": [*cli, "list", "--all"]}
    for name, argv in cases.items():
        t = timed(argv, args.runs)
        print(f"{name:>10}: {t * 1000:6.0f} ms  ({'under' if t < 0.3 else 'OVER'} 0.3 s)", flush=True)

    sys.path.insert(0, str(ROOT))
    from submitit.slurm.slurm import SlurmJobEnvironment

    from slurm_vllm.core import plan, render
    from slurm_vllm.core import spec as spec_mod

    s = spec_mod.load(spec)
    names = ",".join(f"gpu[{i * 8 + 1:04d}-{i * 8 + 8:04d}]" for i in range(128))
    t0 = time.perf_counter()
    p = plan.make(s, {})
    text = render.sbatch_text(s, p, sys.executable)
    os.environ["SLURM_JOB_NODELIST"] = names       # the nodes read it through submitit
    hosts = SlurmJobEnvironment().hostnames
    took = time.perf_counter() - t0
    assert len(hosts) == 1024 and p.tp * p.pp == 8192 and text
    print(f"1,024 nodes: plan + render + hostlist in {took * 1000:.1f} ms "
          f"({'under' if took < 0.1 else 'OVER'} 0.1 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
