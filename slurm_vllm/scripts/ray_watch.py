"""The head's Ray barrier: print the alive nodes (JSON) whenever they change; end once all are there.

Connects once (not once a poll). Usage (inside the head's container): python3 -c TEXT ADDRESS NODES GPUS
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Any


def main() -> None:
    import ray

    address, want_nodes, want_gpus = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))     # stopped by the head: quietly, no traceback
    last = None
    while True:
        nodes: list[dict[str, Any]] = [n for n in ray.nodes() if n["Alive"]]  # type: ignore[no-untyped-call]
        line = json.dumps([{"ip": n["NodeManagerAddress"], "gpus": n["Resources"].get("GPU", 0)}
                           for n in nodes])
        if line != last:
            print(line, flush=True)
            last = line
        if len(nodes) >= want_nodes and sum(n["Resources"].get("GPU", 0) for n in nodes) >= want_gpus:
            break
        time.sleep(0.2)


if __name__ == "__main__":
    main()
