"""Floor (d) of the benchmark: the cost of one process per session, with no web stack.

``python bench/procfloor.py SECONDS N [N ...]`` prints one JSON line. For each N it
measures the same Counter click two ways, each for SECONDS after a short warm-up:

- ``inprocess``: N ``HRenderer`` instances in this process, clicked round-robin;
- ``processes``: N child processes forked from this one (which has imported htag and the
  app and frozen its GC, as a fork server does), each holding one ``HRenderer`` and
  answering frames on a socketpair; this process keeps one click outstanding per child
  (a closed loop) and reads the answers with ``selectors``.

Reported per N: interactions/s, and CPU microseconds per interaction (this process's for
``inprocess``; the children's, from ``/proc/PID/stat``, for ``processes``). The gap between
the two CPU figures is what any process-per-session design pays on this machine before a
single byte of HTTP: the extra wake-up and socket I/O, and caches and TLB shared by N
address spaces instead of one. Started by bench/run.py; does not import asgi_htag.
"""
import gc
import json
import os
import re
import selectors
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.apps

from htag.render import HRenderer  # noqa: E402

from tests.apps import Counter  # noqa: E402

HEADER = struct.Struct(">I")
INC_RE = re.compile(r'"id": (\d+), "method": "inc"')
TICK = os.sysconf("SC_CLK_TCK")


def run_now(coro: Any) -> Any:
    """Run a coroutine that never suspends (the Counter's click is synchronous)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the interaction suspended")


def new_renderer() -> Tuple[HRenderer, int]:
    hr = HRenderer(Counter, "", init=((), {}))
    found = INC_RE.search(str(hr).replace("&quot;", '"'))
    if not found:
        raise RuntimeError("no inc button in the Counter's page")
    return hr, int(found.group(1))


def click(hr: HRenderer, oid: int) -> bytes:
    actions = run_now(hr.interact(oid, "inc", [], {}, {}))
    return json.dumps(actions, separators=(",", ":")).encode()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def recv_frame(sock: socket.socket) -> bytes:
    head = sock.recv(4, socket.MSG_WAITALL)
    if len(head) < 4:
        raise EOFError
    (n,) = HEADER.unpack(head)
    body = sock.recv(n, socket.MSG_WAITALL)
    if len(body) < n:
        raise EOFError
    return body


def child(sock: socket.socket) -> None:
    hr, oid = new_renderer()
    sock.sendall(b"R")
    while True:
        try:
            recv_frame(sock)
        except (EOFError, OSError):
            return
        out = click(hr, oid)
        sock.sendall(HEADER.pack(len(out)) + out)


def inprocess(n: int, seconds: float) -> Dict[str, Any]:
    renderers = [new_renderer() for _ in range(n)]
    for hr, oid in renderers:
        for _ in range(20):
            click(hr, oid)
    count = 0
    c0, t0 = time.process_time(), time.perf_counter()
    stop = t0 + seconds
    while time.perf_counter() < stop:
        for hr, oid in renderers:
            click(hr, oid)
        count += n
    elapsed = time.perf_counter() - t0
    return {"interactions_per_s": count / elapsed, "cpu_us_per_interaction": (time.process_time() - c0) / count * 1e6}


def processes(n: int, seconds: float) -> Dict[str, Any]:
    socks: List[socket.socket] = []
    pids: List[int] = []
    try:
        for _ in range(n):
            mine, theirs = socket.socketpair()
            pid = os.fork()
            if pid == 0:  # the child: only its own end of its own pair
                try:
                    mine.close()
                    for s in socks:
                        s.close()
                    child(theirs)
                finally:
                    os._exit(0)
            theirs.close()
            socks.append(mine)
            pids.append(pid)
        for s in socks:
            if s.recv(1) != b"R":
                raise RuntimeError("a child did not start")
        request = HEADER.pack(2) + b"go"
        sel = selectors.DefaultSelector()
        for s in socks:
            sel.register(s, selectors.EVENT_READ)

        def loop(duration: float) -> int:
            done = 0
            for s in socks:
                s.sendall(request)
            end = time.perf_counter() + duration
            outstanding = len(socks)
            while outstanding:
                for key, _ in sel.select():
                    s = key.fileobj  # type: ignore[assignment]
                    recv_frame(s)  # type: ignore[arg-type]
                    done += 1
                    if time.perf_counter() < end:
                        s.sendall(request)  # type: ignore[attr-defined]
                    else:
                        outstanding -= 1
            return done

        loop(min(0.5, seconds / 4))  # warm-up
        c0 = sum(cpu_seconds(p) for p in pids)
        t0 = time.perf_counter()
        count = loop(seconds)
        elapsed = time.perf_counter() - t0
        c1 = sum(cpu_seconds(p) for p in pids)
        return {"interactions_per_s": count / elapsed, "cpu_us_per_interaction": (c1 - c0) / count * 1e6}
    finally:
        for s in socks:
            s.close()
        for p in pids:
            os.waitpid(p, 0)


def main() -> None:
    seconds = float(sys.argv[1])
    levels = [int(a) for a in sys.argv[2:]]
    new_renderer()  # everything the children will run is imported and warm
    gc.collect()
    gc.freeze()
    out = {str(n): {"inprocess": inprocess(n, seconds), "processes": processes(n, seconds)} for n in levels}
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
