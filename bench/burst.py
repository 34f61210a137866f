"""Load helper for the head-of-line measurement of bench/run.py (not a benchmark itself).

``python bench/burst.py BASE_URL PATH N``: makes N httpx clients (N separate sessions),
prints READY, waits for a line on stdin, then fires N cold GETs of PATH at once and
prints one JSON line: the time.monotonic() window of the burst and each GET's status
and duration. It runs in its own process so that the burst's client-side work does not
delay the measured user's event loop in bench/run.py.
"""
import asyncio
import json
import sys
import time
from typing import Any, List, Tuple

import httpx


async def main(base_url: str, path: str, n: int) -> None:
    clients = [httpx.AsyncClient(base_url=base_url, timeout=120) for _ in range(n)]
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    async def one(client: httpx.AsyncClient) -> Tuple[Any, float]:
        start = time.monotonic()
        try:
            status: Any = (await client.get(path)).status_code
        except Exception as exc:  # reported, not raised: the bench prints it
            status = f"{type(exc).__name__}: {exc}"
        return status, time.monotonic() - start

    t0 = time.monotonic()
    results: List[Tuple[Any, float]] = await asyncio.gather(*(one(c) for c in clients))
    t1 = time.monotonic()
    sys.stdout.write(json.dumps({"t0": t0, "t1": t1, "results": results}) + "\n")
    sys.stdout.flush()
    for c in clients:
        await c.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
