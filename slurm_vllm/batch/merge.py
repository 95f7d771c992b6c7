"""Sharding a batch: K servers (a job array) each over a stable 1/K of the input, then one merged output."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from slurm_vllm.batch.output import check_record, input_digest, open_output, record_path, write_record
from slurm_vllm.batch.reader import (
    BatchInputError,
    complete_lines,
    done_ids,
    lines,
    repair_fd,
    request_id,
    result_id,
    verify_parts,
)


def shard_of(custom_id: str, shards: int) -> int:
    """The shard (0..SHARDS-1) of a request: a hash of its custom_id, the same in every process and
    every run (not Python's hash(), which is salted per process)."""
    digest = hashlib.blake2b(custom_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def part_path(parts: Path, shard: int, shards: int) -> Path:
    """The output of shard SHARD of SHARDS, in the parts folder (<output>.parts/)."""
    return parts / f"part-{shard}-of-{shards}.jsonl"


def merged_output(part: Path) -> Path:
    """The output that a shard's PART (part_path's name) is merged into."""
    return part.parent.with_name(part.parent.name.removesuffix(".parts"))


@dataclass(frozen=True)
class MergeResult:
    """What a merge did: parts read, lines added to the output, and how complete the output is."""

    output: Path
    parts: int            # part files read
    added: int            # result lines appended to the output by this merge
    present: int          # input requests that now have a line in the output
    total: int            # requests in the input
    removed: bool         # the output is complete and the parts were removed

    @property
    def complete(self) -> bool:
        return self.present == self.total

    def line(self) -> str:
        tail = ("complete; parts removed" if self.removed else
                f"{self.total - self.present} requests without a result yet; parts kept")
        return (f"merged {self.parts} parts into {self.output}: {self.added} lines added, "
                f"{self.present}/{self.total} requests have a result ({tail})")


def merge(output: Path, parts: Path, input_path: Path, lock_timeout: float = 120.0) -> MergeResult:
    """Append to OUTPUT every result line of the part files in PARTS whose custom_id the output lacks
    (idempotent: run it any number of times, while shards still write, and after); when then every
    request of the input at INPUT_PATH has a line, remove the parts. Under an exclusive lock on
    OUTPUT; a half-written last line of a part (its shard is writing) waits for the next merge."""
    try:
        if not input_path.is_file():
            raise BatchInputError(f"batch.input: {input_path}: not a file (the merge counts its requests)")
    except OSError as exc:
        raise BatchInputError(f"batch.input: {input_path}: {exc.strerror}") from None
    fd = open_output(output, input_path)
    with os.fdopen(fd, "ab") as out:
        deadline = time.monotonic() + lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BatchInputError(f"batch.output: {output} is locked by another job (a batch "
                                          f"writing it?); merge later") from None
                time.sleep(0.1)
        repair_fd(fd)                   # a merge that crashed mid-write
        files = sorted(parts.glob("part-*-of-*.jsonl")) if parts.is_dir() else []
        if files:
            verify_parts(parts)
        digest = input_digest(input_path)     # only lines that answer this input are merged
        for path in (output, *files):
            check_record(path, input_path, digest)
        write_record(output, input_path, digest)
        added = 0
        with done_ids(output) as have:
            for part in files:
                chunk: list[bytes] = []
                for number, raw in complete_lines(part):
                    if raw.strip():
                        cid = result_id(part, number, raw)
                        if have.add(cid, number) is None:
                            chunk.append(raw + b"\n")
                            if len(chunk) >= 1024:
                                out.write(b"".join(chunk))
                                added += len(chunk)
                                chunk = []
                out.write(b"".join(chunk))
                added += len(chunk)
            out.flush()
            os.fsync(out.fileno())
            total = present = 0
            for _, raw in lines(input_path):
                if raw.strip():
                    total += 1
                    rid = request_id(raw)
                    present += rid is not None and rid in have
        removed = False
        if total and present == total and files:
            for part in files:
                part.unlink(missing_ok=True)
                record_path(part).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                parts.rmdir()           # something else in it: left alone
            removed = True
        return MergeResult(output, len(files), added, present, total, removed)
