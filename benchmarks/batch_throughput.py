"""Benchmark: batch mode's steady-state throughput against `vllm run-batch`, and its change with
`batch.concurrency`, on the test bed (same model, same node, TP1 x PP1, the same 1,000 chat requests).

slurm_vllm: one batch job per concurrency; the rate is the driver's (answered / seconds sending,
batch.json), start-up is submit → BATCH. vllm run-batch: one process in a plain sbatch job on the
same kind of node, run twice (1 request, then all): its steady rate is (N - 1) / (T_N - T_1), its
start-up T_1. Usage (test bed up, `eval "$(scripts/testbed env)"`):
    $SLURM_VLLM_TEST_VENV/bin/python benchmarks/batch_throughput.py [--requests 1000] \
        [--concurrency 16 64 256]
Issue 22's comparison (run-batch, fixed 64 in input order, the defaults; inputs (a) and (b)):
    $SLURM_VLLM_TEST_VENV/bin/python benchmarks/batch_throughput.py --side-by-side [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ARGS = ["--max-model-len", "256", "--dtype", "float32", "--enforce-eager"]
RUN_BATCH = """#!/bin/bash
#SBATCH --nodes=1 --ntasks=1 --gpus-per-node=1 --cpus-per-task=2 --time=30 --output={out}/run-batch-%j.out
set -euo pipefail
source "$SLURM_VLLM_TEST_VENV/bin/activate"
cd {out}
for n in 1 {n}; do
  t0=$(date +%s.%N)
  vllm run-batch -i input-$n.jsonl -o output-$n.jsonl --model "$SLURM_VLLM_TEST_MODEL" \\
      --served-model-name tiny {args} > run-batch-$n.log 2>&1
  echo "$n $t0 $(date +%s.%N)" >> times
done
"""


def requests(n: int) -> str:
    """N chat requests (vllm run-batch takes chat, not /v1/completions), 16 tokens each."""
    return "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": "tiny", "max_tokens": 16, "temperature": 0,
                                        "messages": [{"role": "user", "content": f"Count to {i}."}]}}) + "\n"
                   for i in range(n))


def wait_gone(job_id: str) -> None:
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        time.sleep(1)


def ours(folder: Path, n: int, concurrency: int) -> tuple[float, float]:
    """(start-up seconds, steady req/s) of one slurm_vllm batch job."""
    data = yaml.safe_load((ROOT / "tests" / "configs" / "test-batch-tp2.yaml").read_text())
    data["name"] = f"bench-c{concurrency}"
    data["slurm"].update(nodes=1)
    data["parallelism"] = {"tensor": 1, "pipeline": 1}
    out = folder / f"results-c{concurrency}.jsonl"
    out.unlink(missing_ok=True)
    data["batch"] = {"input": str(folder / f"input-{n}.jsonl"), "output": str(out),
                     "concurrency": concurrency}
    spec = folder / f"bench-c{concurrency}.yaml"
    spec.write_text(yaml.safe_dump(data))
    t0 = time.time()
    run = subprocess.run([sys.executable, "-m", "slurm_vllm", "submit", str(spec), "--wait", "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    job = json.loads(run.stdout.splitlines()[0])
    if run.returncode:
        raise SystemExit(f"batch job failed: {run.stderr[-2000:]}")
    log = Path(job["job_dir"], "stage.log").read_text().splitlines()
    started = next(float(line.split()[0]) for line in log if line.split()[1] == "BATCH")
    rate = json.loads(Path(job["job_dir"], "batch.json").read_text())["rate"]
    wait_gone(job["job_id"])
    return started - t0, rate


def theirs(folder: Path, n: int) -> tuple[float, float]:
    """(start-up seconds, steady req/s) of `vllm run-batch` in a plain sbatch job."""
    script = folder / "run-batch.sbatch"
    script.write_text(RUN_BATCH.format(out=folder, n=n, args=" ".join(ARGS)))
    (folder / "times").unlink(missing_ok=True)
    job_id = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                            check=True).stdout.strip()
    wait_gone(job_id)
    times = {int(a): float(c) - float(b) for a, b, c in (line.split() for line in
                                                           (folder / "times").read_text().splitlines())}
    return times[1], (n - 1) / (times[n] - times[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--side-by-side", action="store_true",
                        help="issue 22: run-batch, fixed 64, the defaults on inputs (a) and (b)")
    parser.add_argument("--per-prefix", type=int, default=15, help="(b): questions per system prompt")
    parser.add_argument("--prefix-words", type=int, default=1000, help="(b): words per system prompt")
    parser.add_argument("--kv-blocks", type=int, default=40, help="(b): KV cache blocks (128 tokens)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="side by side: run the three tools this many times, the order turned each "
                             "round (the host's speed drifts); the median is the result")
    parser.add_argument("--inputs", default="ab", help="side by side: which inputs (a, b or ab)")
    parser.add_argument("--with-ray", action="store_true",
                        help="side by side: a fourth row, the defaults but backend ray (Ray's executor on "
                             "one node, the default before backend auto)")
    args = parser.parse_args()
    if args.side_by_side:
        return side_by_side(args)
    folder = Path(tempfile.mkdtemp(prefix="batch-bench-", dir=os.environ["SLURM_VLLM_TEST_JOBS_ROOT"]))
    for n in (1, args.requests):
        (folder / f"input-{n}.jsonl").write_text(requests(n))
    start, rate = theirs(folder, args.requests)
    print(f"vllm run-batch        start-up {start:6.1f} s   steady {rate:6.1f} req/s", flush=True)
    best = 0.0
    for c in args.concurrency:
        s, r = ours(folder, args.requests, c)
        best = max(best, r)
        print(f"slurm_vllm c={c:<4}     start-up {s:6.1f} s   steady {r:6.1f} req/s   "
              f"({r / rate:.0%} of run-batch)", flush=True)
    verdict = "meets" if best >= 0.95 * rate else "BELOW"
    print(f"best: {best / rate:.0%} of vllm run-batch's steady rate ({verdict} the 95% bar); "
          f"files in {folder}")
    return 0



# -- issue 22: side by side, the new defaults against run-batch and the old fixed concurrency ------

SIDE_ARGS = {"max_model_len": 2048, "dtype": "float32", "enforce_eager": True}


def words(rng: random.Random, n: int) -> str:
    from tests.support.build_tiny_model import WORDS  # the test tokenizer's words: ~1 token each

    return " ".join(rng.choice(WORDS) for _ in range(n))


def input_a(n: int) -> list[dict[str, object]]:
    """(a) N independent chats of mixed lengths (10-400 words), no shared prefix."""
    rng = random.Random(1)
    return [{"custom_id": f"a{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "tiny", "max_tokens": 16, "temperature": 0,
                      "messages": [{"role": "user", "content": f"{i}: {words(rng, rng.randint(10, 400))}"}]}}
            for i in range(n)]


def input_b(prefixes: int, per: int, prefix_words: int) -> list[dict[str, object]]:
    """(b) PREFIXES distinct long system prompts (PREFIX_WORDS words each) x PER short questions,
    shuffled."""
    rng = random.Random(2)
    systems = [f"You are assistant {p}. {words(rng, prefix_words)}" for p in range(prefixes)]
    reqs: list[dict[str, object]] = [
        {"custom_id": f"b{p}-{q}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "tiny", "max_tokens": 8, "temperature": 0,
                  "messages": [{"role": "system", "content": systems[p]},
                               {"role": "user", "content": f"question {q}: {words(rng, 8)}"}]}}
        for p in range(prefixes) for q in range(per)]
    rng.shuffle(reqs)
    return reqs


def watch_first_line(path: Path, seen: dict[str, float], stop: threading.Event) -> None:
    while not stop.is_set():
        if path.exists() and path.stat().st_size > 0:
            seen["first"] = time.time()
            return
        time.sleep(0.05)


def ours_side(folder: Path, model: Path, tag: str, inp: Path, batch: dict[str, object],
              vllm_args: dict[str, object], backend: str = "auto") -> dict[str, float]:
    """One slurm_vllm batch job (1 node, TP1, BACKEND; auto: no backend key, the default): start-up,
    steady req/s and output tokens/s (the driver's), first and last result in seconds after sending
    began."""
    data = yaml.safe_load((ROOT / "tests" / "configs" / "test-batch-tp2.yaml").read_text())
    data.pop("backend", None)
    if backend != "auto":
        data["backend"] = backend
    data["name"] = f"side-{tag}"
    data["model"]["path"] = str(model)
    data["slurm"].update(nodes=1)
    data["parallelism"] = {"tensor": 1, "pipeline": 1}
    data["vllm"]["args"] = {**SIDE_ARGS, **vllm_args}
    out = folder / f"results-{tag}.jsonl"
    out.unlink(missing_ok=True)
    data["batch"] = {"input": str(inp), "output": str(out), **batch}
    spec = folder / f"side-{tag}.yaml"
    spec.write_text(yaml.safe_dump(data))
    seen: dict[str, float] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=watch_first_line, args=(out, seen, stop), daemon=True)
    watcher.start()
    t0 = time.time()
    run = subprocess.run([sys.executable, "-m", "slurm_vllm", "submit", str(spec), "--wait", "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    stop.set()
    job = json.loads(run.stdout.splitlines()[0])
    if run.returncode:
        raise SystemExit(f"batch job failed: {run.stderr[-2000:]}")
    log = Path(job["job_dir"], "stage.log").read_text().splitlines()
    sending = next(float(line.split()[0]) for line in log if line.split()[1] == "BATCH")
    progress = json.loads(Path(job["job_dir"], "batch.json").read_text())
    said = [line for line in (Path(job["job_dir"]) / "logs" / "task-0.out").read_text().splitlines()
            if line.startswith("batch: concurrency")]
    wait_gone(job["job_id"])
    return {"startup": sending - t0, "rate": progress["rate"],
            "tokens": progress["tokens_out"] / progress["elapsed"], "first": seen.get("first", 0) - sending,
            "last": out.stat().st_mtime - sending, "changes": len(said)}


def theirs_side(folder: Path, model: Path, tag: str, inp: Path, n: int,
                vllm_args: dict[str, object]) -> dict[str, float]:
    """vllm run-batch on the same input in a plain sbatch job (1 node): run once on 1 request
    (start-up T1), once on all (TN): steady rate (N - 1) / (TN - T1); it writes its output at the
    end, so first = last = TN - T1 after sending began."""
    first_line = inp.read_text().splitlines()[0] + "\n"
    (folder / f"input-{tag}-1.jsonl").write_text(first_line)
    (folder / f"input-{tag}-{n}.jsonl").write_text(inp.read_text())
    args = []
    for key, value in {**SIDE_ARGS, **vllm_args}.items():
        args += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    script = folder / f"run-batch-{tag}.sbatch"
    script.write_text(RUN_BATCH.format(out=folder, n=n, args=" ".join(args))
                      .replace("input-$n.jsonl", f"input-{tag}-$n.jsonl")
                      .replace("output-$n.jsonl", f"output-{tag}-$n.jsonl")
                      .replace('"$SLURM_VLLM_TEST_MODEL"', str(model))
                      .replace(">> times", f">> times-{tag}"))
    (folder / f"times-{tag}").unlink(missing_ok=True)
    job_id = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                            check=True).stdout.strip()
    wait_gone(job_id)
    rows = (folder / f"times-{tag}").read_text().splitlines()
    times = {int(a): float(c) - float(b) for a, b, c in (line.split() for line in rows)}
    lines = (folder / f"output-{tag}-{n}.jsonl").read_text().splitlines()
    tokens = sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"] for line in lines
                 if json.loads(line).get("response"))
    span = times[n] - times[1]
    return {"startup": times[1], "rate": (n - 1) / span, "tokens": tokens / span, "first": span,
            "last": span, "changes": 0}


def side_by_side(args: argparse.Namespace) -> int:
    from tests.support.testbed import machine_line

    print(machine_line(), flush=True)
    folder = Path(tempfile.mkdtemp(prefix="batch-side-", dir=os.environ["SLURM_VLLM_TEST_JOBS_ROOT"]))
    model = folder / "bench-llama"
    subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "build_tiny_model.py"), str(model),
                    "--bench"], check=True, capture_output=True)
    inputs: dict[str, tuple[list[dict[str, object]], dict[str, object]]] = {
        "a": (input_a(args.requests), {}),
              "b": (input_b(40, args.per_prefix, args.prefix_words),
                    {"num_gpu_blocks_override": args.kv_blocks})}
    rows = []
    for name, (reqs, vllm_args) in inputs.items():
        if name not in args.inputs:
            continue
        inp = folder / f"input-{name}.jsonl"
        inp.write_text("".join(json.dumps(r) + "\n" for r in reqs))
        n = len(reqs)
        tools: list[tuple[str, dict[str, object] | None, str]] = [
            ("vllm run-batch", None, ""),
            ("slurm_vllm old defaults (64, input order, ray)",
             {"concurrency": 64, "prefix_window": 0}, "ray"),
            ("slurm_vllm defaults (no batch or backend key)", {}, "auto")]
        if args.with_ray:
            tools.append(("slurm_vllm defaults but backend ray", {}, "ray"))
        for round_ in range(args.rounds):
            for tool, batch, backend in tools if round_ % 2 == 0 else tools[::-1]:
                tag = f"{name}-{'auto' if batch == {} else 64}-{backend}"
                r = (theirs_side(folder, model, name, inp, n, vllm_args) if batch is None else
                     ours_side(folder, model, tag, inp, batch, vllm_args, backend))
                rows.append((name, tool, r))
                print(f"({name}) round {round_ + 1} {tool:42} start-up {r['startup']:5.1f} s  "
                      f"{r['rate']:6.1f} req/s  {r['tokens']:7.1f} out tok/s  first {r['first']:6.1f} s  "
                      f"last {r['last']:6.1f} s" + (f"  ({r['changes']:.0f} concurrency lines)"
                                                    if r["changes"] else ""), flush=True)
        median = {tool: statistics.median(r["rate"] for i, t, r in rows if i == name and t == tool)
                  for tool, _, _ in tools}
        for tool, _, _ in tools:
            print(f"({name}) median of {args.rounds}: {tool:42} {median[tool]:6.1f} req/s", flush=True)
        for tool, _, _ in tools[1:]:
            print(f"({name}) {tool} / vllm run-batch: {median[tool] / median[tools[0][0]]:.2f}x", flush=True)
    print(f"files in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
