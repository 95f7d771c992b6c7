"""One rank's preflight all-reduce (NCCL on GPUs, Gloo on CPUs), timed per size; rank 0 writes the table.

Usage (inside each rank's container): python3 -c TEXT RANK WORLD ADDR PORT OUT SIZES
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from typing import Any


def main() -> None:
    import torch
    import torch.distributed as dist

    rank, world, addr, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    out = sys.argv[5]
    sizes = [int(s) for s in sys.argv[6].split(",")]
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    device = "cuda" if cuda else "cpu"
    rows: list[dict[str, Any]] = []
    for size in sizes:
        x = torch.ones(size // 4, dtype=torch.float32, device=device)
        for _ in range(2):
            dist.all_reduce(x)
        x.fill_(1.0)
        iters = 5
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / iters
        expected = float(world) ** iters
        ok = bool(torch.allclose(x[:16].cpu(), torch.full((16,), expected)))
        algbw = size / seconds / 1e9
        rows.append({"bytes": size, "ms": seconds * 1e3, "algbw_GBps": algbw,
                     "busbw_GBps": algbw * 2 * (world - 1) / world, "correct": ok})
    dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"backend": backend, "world_size": world, "rows": rows}, f)
    dist.destroy_process_group()
    print("preflight rank", rank, "done", flush=True)


if __name__ == "__main__":
    main()
