"""Batch mode on the head: the driver over the private server, and what a stop leaves (requeue or not)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from slurm_vllm.batch.driver import BatchError, Driver
from slurm_vllm.batch.merge import merge, part_path
from slurm_vllm.batch.output import private_parts
from slurm_vllm.core.records import BatchProgress, Stage
from slurm_vllm.node.rankenv import Stopped

if TYPE_CHECKING:
    from slurm_vllm.node.head import Head
    from slurm_vllm.node.rank import Rank

BATCH_DRAIN = 50.0  # after SIGUSR2 (90 s before the limit), wait this long for the requests in flight
CANCEL_DRAIN = 5.0  # after a cancel: Slurm's KillWait (30 s by default) covers this and the teardown
STOP_RACE = 3.0     # scancel signals every process of the step at once: vLLM may go before the rank hears


def run_batch(head: Head, url: str, key: str | None) -> str:
    """Batch mode: the driver sends the input to the private server; DONE when every request
    has its line, else a stop (cancel, time limit: see run()) with the counts. A shard (a task of
    the job array) sends its 1/K of the input to its part, then merges the parts it finds. Returns
    what DONE says."""
    b = head.spec.batch
    out = head.spec.batch_output
    if out != head.jd.results and not head.jd.results.is_symlink():
        head.jd.results.symlink_to(out)
    shard = (head.job.array_task or 0, b.shards) if b.shards > 1 else None
    writes = out
    also_done: tuple[Path, ...] = ()
    if shard is not None:
        parts = head.spec.batch_parts
        private_parts(parts)
        writes = part_path(parts, *shard)
        also_done = (out, *(p for p in sorted(parts.glob("part-*.jsonl")) if p != writes))
    what = f"shard {shard[0]} of {shard[1]} of " if shard else ""
    head.jd.write_stage(Stage.READY, f"batch: private server {url}; {what}input {b.input}")
    head.jd.write_stage(Stage.BATCH, "starting")

    def report(progress: BatchProgress) -> None:
        head.jd.write(head.jd.batch, progress)
        head.jd.write_stage(Stage.BATCH, progress.line(), log=False)

    def alive() -> None:
        head.check_alive()
        head.check_workers()

    # auto: tuned from the servers' own load (with replicas: each replica's, summed); a number: with
    # replicas, as much in flight for each
    concurrency = None if b.concurrency == "auto" else b.concurrency * head.plan.replicas
    driver = Driver(url, key, Path(b.input or ""), writes, head.plan.served_name, concurrency,
                    head.stop, check=alive, report=report, shard=shard, also_done=also_done,
                    window=b.prefix_window, metrics=head.metrics_urls(url),
                    say=lambda line: print(line, file=sys.stderr, flush=True))
    try:
        progress = driver.run(drain=lambda: drain_time(head))
    except BatchError:
        # Requests lost because the server went away: a failure, unless it went away because the
        # job is being stopped (scancel's SIGTERM reaches vLLM and this rank at the same moment;
        # the rank's stop may come a little after the resets). Wait for that stop, bounded.
        if not head.stop.wait(STOP_RACE):
            raise
        progress = driver.progress()
    if not progress.finished:
        raise Stopped(head.stop_reason or "stopped", detail=progress.summary())
    if shard is None:
        return progress.summary()
    merged = merge(out, head.spec.batch_parts, Path(b.input or ""))    # the last shard to end completes it
    return f"{progress.summary()}; {merged.line()}"



def drain_time(head: Rank) -> float:
    """How long a stopped batch waits for its requests in flight: long at the time limit (the
    server stays up), short after a cancel."""
    return BATCH_DRAIN if head.stop_reason == "TIMEOUT" else CANCEL_DRAIN



def goes_on(head: Rank, detail: str) -> str:
    """At the time limit, a batch with runs left (batch.max_jobs) leaves the mark that makes the
    script requeue the job (same id and folder); DETAIL then says so."""
    b = head.spec.batch
    runs_left = b.max_jobs - 1 - head.job.restart_count
    said = detail or "stopped before sending"
    if runs_left > 0:
        head.jd.requeue_mark.touch()
        return f"{said}; goes on in run {head.job.restart_count + 2} of up to {b.max_jobs} (requeued)"
    return f"{said}; no run left (batch.max_jobs {b.max_jobs}): submit again to finish"
