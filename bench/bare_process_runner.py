"""Floor (e): the barest PROCESS-PER-SESSION htag runner, to tell what any such design
costs on this machine from what asgi_htag adds.

The same ASGI app as bench/inprocess_runner.py (same pages, cookie, routes and answers),
except that each session's ``HRenderer`` lives in a child process of its own: the web
worker forks it when the session starts and talks to it over a socketpair it keeps open,
with length-prefixed frames. The child is as thin as one can be: a blocking loop (no
event loop) that reads a frame, calls ``HRenderer.interact`` (or renders the page) and
writes the answer. No session store, no guard, no timer, no fork server, no reconnect,
no encryption: what is left is the process hop itself (the second process's wake-up,
its socket I/O, its own caches), paid on every click.

It is a yardstick, not a runner to use: it forks from the web worker (which blocks every
user while the child starts, so the benchmark does not time its renders or its
head-of-line blocking) and a child runs the app with no limit of time.

Routes as in bench/inprocess_runner.py, and ``GET /_stats``: the session count and the
children's pids.

Run with the repository root on PYTHONPATH:
    uvicorn bench.bare_process_runner:app --loop uvloop
"""
import asyncio
import gc
import json
import os
import signal
import socket
import struct
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Union

from bench.inprocess_runner import asgi_app, serve_page, serve_post, serve_websocket

HEADER = struct.Struct(">I")
RENDER = b"r"
INTERACT = b"i"


# --- the child: one HRenderer, a blocking loop ---------------------------------------------
def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = sock.recv(n, socket.MSG_WAITALL)
    if len(data) < n:
        raise EOFError
    return data


def _child_main(sock: socket.socket, js: str) -> None:
    """Serve one session until the worker closes its end: a render (``r``) answers the
    page, an interaction (``i`` + the page's JSON) answers ``json.dumps(actions)``."""
    from htag.render import HRenderer

    from tests.apps import Counter

    hr = HRenderer(Counter, js, init=((), {}))
    while True:
        try:
            (n,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
            payload = _recv_exact(sock, n)
        except (EOFError, OSError):
            return
        if payload[:1] == RENDER:
            out = str(hr).encode()
        else:
            o = json.loads(payload[1:])
            coro = hr.interact(o["id"], o["method"], o.get("args") or [], o.get("kargs") or {}, o.get("event"))
            try:
                coro.send(None)  # the Counter's click never suspends: no event loop needed
            except StopIteration as done:
                out = json.dumps(done.value).encode()
            else:
                coro.close()
                out = b'{"err":"the interaction suspended"}'
        sock.sendall(HEADER.pack(len(out)) + out)


def _fork_child(js: str) -> "tuple[int, socket.socket]":
    mine, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child keeps only its end of its pair (and stdio): no client socket
        try:
            gc.freeze()  # as a fork server's children: the worker's heap is not theirs to collect
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            os.dup2(theirs.fileno(), 3)
            os.closerange(4, os.sysconf("SC_OPEN_MAX"))
            _child_main(socket.socket(fileno=3), js)
        finally:
            os._exit(0)
    theirs.close()
    return pid, mine


# --- the worker's side: one open connection per child, answers in order ---------------------
class _Child(asyncio.Protocol):
    """The worker's end of one child's socketpair. Requests may be pipelined: the child
    answers them in order, so each answer goes to the oldest waiter."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.transport: Optional[asyncio.Transport] = None
        self.buf = bytearray()
        self.waiters: "Deque[asyncio.Future[bytes]]" = deque()
        self.lost: "asyncio.Future[None]" = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= HEADER.size:
            (n,) = HEADER.unpack_from(buf)
            if len(buf) < HEADER.size + n:
                return
            out = bytes(buf[HEADER.size:HEADER.size + n])
            del buf[:HEADER.size + n]
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(out)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionError("the session's process is gone"))

    async def ask(self, kind: bytes, body: bytes = b"") -> bytes:
        assert self.transport is not None
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self.transport.write(HEADER.pack(len(body) + 1) + kind + body)
        return await waiter


SESSIONS: Dict[str, _Child] = {}


async def _create(js: str) -> _Child:
    pid, sock = _fork_child(js)
    _, child = await asyncio.get_running_loop().create_unix_connection(lambda: _Child(pid), sock=sock)
    return child


async def _render(child: _Child) -> bytes:
    return await child.ask(RENDER)


async def _page(scope: Dict[str, Any], send: Any, mode: str) -> None:
    await serve_page(scope, send, mode, SESSIONS, _create, _render)


async def _ask(child: _Child, body: Union[str, bytes]) -> str:
    return (await child.ask(INTERACT, body.encode() if isinstance(body, str) else body)).decode()


async def _post(scope: Dict[str, Any], receive: Any, send: Any) -> None:
    await serve_post(scope, receive, send, SESSIONS, _ask)


async def _websocket(scope: Dict[str, Any], receive: Any, send: Any) -> None:
    await serve_websocket(scope, receive, send, SESSIONS, _ask)


async def _end_children(timeout: float = 10) -> None:
    """Close every child's connection (the EOF ends its loop), then reap it."""
    children: List[_Child] = list(SESSIONS.values())
    SESSIONS.clear()
    for child in children:
        if child.transport is not None:
            child.transport.close()
    if children:
        await asyncio.wait([asyncio.ensure_future(c.lost) for c in children], timeout=timeout)
    deadline = asyncio.get_running_loop().time() + timeout
    pending = [c.pid for c in children]
    while pending and asyncio.get_running_loop().time() < deadline:
        for pid in list(pending):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    pending.remove(pid)
            except ChildProcessError:
                pending.remove(pid)
        if pending:
            await asyncio.sleep(0.01)


app = asgi_app(_page, _post, _websocket,
               lambda: {"sessions": len(SESSIONS), "pids": [c.pid for c in SESSIONS.values()]}, _end_children)
