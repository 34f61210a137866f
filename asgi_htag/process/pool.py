"""The worker side of the process world: find (or have the zygote fork) the process of a
(session, app), and talk to it over persistent Unix-socket connections.

Nothing here forks: processes are forked by the zygote, which this module starts when no
zygote answers for the runtime directory. Waits are bounded (``anyio.fail_after``) and a
connection that breaks the protocol is closed and dropped.
"""
import asyncio
import json
import logging
import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import anyio
from anyio.abc import SocketStream, UNIXSocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from ..config import ensure_private_dir
from ..exceptions import PoolFull, ProcessGone, ProcessStartError, ProtocolError
from . import wire

logger = logging.getLogger(__name__)

_STREAM_ERRORS = (
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    OSError,
)


@dataclass(frozen=True)
class PoolConfig:
    """What every worker of one server must agree on (the zygote is shared)."""

    runtime_dir: Path
    max_processes: int = 1000
    grace_seconds: float = 5.0
    start_timeout_seconds: float = 60.0
    # how long a worker tries to reach (or start) the fork server before it gives up
    zygote_answer_seconds: float = 15.0
    max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES
    log_level: str = "WARNING"
    apps: Tuple[str, ...] = field(default=())
    max_starting: int = 0  # processes starting at once; 0 = one per CPU
    # at max_processes, how long a new process waits for one told to go to end (then: full)
    full_wait_seconds: float = 5.0
    # at max_processes, the age past which a process whose page never made contact (no
    # websocket, no interaction) is ended to make room; < 0: never
    evict_uncontacted_after: float = 10.0
    process_loop: str = "auto"  # event loop of the per-session processes: auto, uvloop, asyncio
    batch_scheduling: bool = True  # per-session processes under SCHED_BATCH (see Engine)


class _ReadBuffer(wire.FlowProtocol):
    """Protocol of :class:`_UnixStream`: keeps what arrives for the one reader."""

    def __init__(self) -> None:
        super().__init__()
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._hold(len(data))


class _UnixStream:
    """The three stream operations :class:`ChildConnection` needs, directly on an asyncio
    transport: reading stays on between receives and a call that can complete at once does
    not take an extra turn of the loop (anyio's stream pauses and resumes reading around
    every receive). Used when the server runs on asyncio, as under uvicorn; anyio's stream
    otherwise. Raises what anyio's stream raises."""

    __slots__ = ("_transport", "_proto")

    def __init__(self, transport: asyncio.Transport, proto: _ReadBuffer) -> None:
        self._transport = transport
        self._proto = proto

    @classmethod
    async def connect(cls, path: str) -> "_UnixStream":
        sock = await _connect_unix(path)
        try:
            transport, proto = await asyncio.get_running_loop().create_unix_connection(_ReadBuffer, sock=sock)
        except BaseException:
            sock.close()
            raise
        return cls(transport, proto)  # type: ignore[arg-type]

    async def send(self, data: bytes) -> None:
        if self._proto.lost or self._transport.is_closing():
            raise anyio.BrokenResourceError
        self._transport.write(data)
        await self._proto.drain()  # ConnectionResetError if the process goes meanwhile

    async def receive(self, max_bytes: int = 65536) -> bytes:
        proto = self._proto
        while not proto.buf:
            if proto.eof:
                raise anyio.EndOfStream
            await proto.readable()
        data = bytes(proto.buf)
        proto.buf.clear()
        proto.release(len(data))
        return data

    async def aclose(self) -> None:
        self._transport.close()


_NOTICE_MAX_BYTES = 4096  # the most read of what a fork server says on a presence connection as it goes
_HELLO_SECONDS = 10.0  # the longest one hello to the fork server may take (within zygote_answer_seconds)
_CONNECT_RETRY_FIRST, _CONNECT_RETRY_MAX = 0.005, 0.1  # seconds between connects to a full backlog


async def _connect_unix(path: str) -> socket.socket:
    """A non-blocking Unix stream socket connected to ``path``.

    A Unix connect completes at once or fails, except against a listener whose backlog is
    full (it is stalled, or out of descriptors and not accepting for a moment): then it
    fails with EAGAIN, and the socket, still unconnected, polls writable, so waiting for
    writability (what anyio's and asyncio's connects do) turns into a busy loop. This
    retries after a pause instead, 5 ms doubling up to 100 ms, until it connects or the
    caller's deadline cancels it. Not on the click path: a websocket connects once.

    Raises:
        OSError: no socket file, nobody listening (ECONNREFUSED), and the like.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        delay = _CONNECT_RETRY_FIRST
        while True:
            try:
                sock.connect(path)
                return sock
            except BlockingIOError:
                await anyio.sleep(delay)
                delay = min(delay * 2, _CONNECT_RETRY_MAX)
    except BaseException:
        sock.close()
        raise


async def _anyio_connect(path: str) -> UNIXSocketStream:
    """:func:`_connect_unix` as an anyio stream."""
    sock = await _connect_unix(path)
    try:
        return await UNIXSocketStream.from_socket(sock)
    except BaseException:
        sock.close()
        raise


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # another anyio backend (trio)
        return False
    return True


class ChildConnection:
    """One persistent connection to a per-session process. ``reused``: it came from the
    idle pool, so it may lead to a process that has since died and been replaced (the
    socket name is the same)."""

    __slots__ = ("key", "_stream", "_frames", "_max", "broken", "reused", "generation")

    def __init__(self, key: str, stream: "SocketStream | _UnixStream", max_frame_bytes: int) -> None:
        self.key = key
        self._stream = stream
        self._frames = wire.FrameBuffer(max_frame_bytes)
        self._max = max_frame_bytes
        self.broken = False
        self.reused = False
        self.generation = 0  # its key's idle generation when it was opened (see ProcessPool.release)

    async def send(self, obj: Dict[str, Any], raw: Optional[bytes] = None) -> None:
        """Send a frame (``raw``: bytes relayed untouched). Raises ProcessGone if the
        process is not there any more."""
        await self._send(wire.encode(obj, self._max, raw=raw))

    async def send_json(self, meta: bytes, raw: Optional[bytes] = None) -> None:
        """:meth:`send` of a frame object already serialized by :func:`wire.compact_json`."""
        await self._send(wire.encode_json(meta, self._max, raw=raw))

    async def _send(self, data: bytes) -> None:
        try:
            await self._stream.send(data)
        except _STREAM_ERRORS as exc:
            self.broken = True
            raise ProcessGone("the app process closed the connection") from exc

    async def receive_frame(self) -> Tuple[Dict[str, Any], Optional[bytes]]:
        """The next frame and its raw bytes. Raises ProcessGone on EOF, ProtocolError on a
        bad frame (the connection is then unusable)."""
        frames = self._frames
        try:
            while True:
                payload = frames.next_payload()
                if payload is not None:
                    return wire.split_payload(payload)
                try:
                    frames.feed(await self._stream.receive(262144))
                except _STREAM_ERRORS as exc:
                    raise ProcessGone("the app process closed the connection") from exc
        except (ProcessGone, ProtocolError):
            self.broken = True
            raise

    async def receive(self) -> Dict[str, Any]:
        """The next frame's JSON object (its raw bytes, if any, under ``"raw"``)."""
        frame, raw = await self.receive_frame()
        if raw is not None:
            frame["raw"] = raw
        return frame

    async def request(self, obj: Dict[str, Any], raw: Optional[bytes] = None) -> Dict[str, Any]:
        await self.send(obj, raw)
        return await self.receive()

    async def aclose(self) -> None:
        self.broken = True
        with anyio.CancelScope(shield=True):
            try:
                await self._stream.aclose()
            except _STREAM_ERRORS:
                pass


_ZYGOTE = "zygote"  # the zygote's key in the idle pool: socket_path(_ZYGOTE) is its socket


class ProcessPool:
    """Per web worker: reaches the zygote and the per-session processes of one runtime dir."""

    def __init__(self, config: PoolConfig, *, main_path: Optional[str] = None) -> None:
        self.config = config
        self.main_path = main_path
        self._runtime = str(config.runtime_dir)
        self._presence: Optional[SocketStream] = None
        self._presence_pid = 0
        self._lock: Optional[anyio.Lock] = None
        # attempts to reach the fork server that have ended, and the last one's failure: a
        # request that waited for the lock while one failed gets that answer at once
        self._attempts_ended = 0
        self._last_failure: Optional[ProcessStartError] = None
        self._idle: Dict[str, List[ChildConnection]] = {}
        self._idle_count = 0
        self.max_idle_total = 512
        self._apps = set(config.apps)
        # per key, how many times its idle connections were dropped: a connection opened
        # before the last drop is not kept afterwards (see release)
        self._generations: Dict[str, int] = {}

    def socket_path(self, key: str) -> str:
        return os.path.join(self._runtime, key + ".s")

    # --- zygote -----------------------------------------------------------------------
    async def _zygote_connect(self) -> SocketStream:
        return await _anyio_connect(self.socket_path(_ZYGOTE))

    async def ensure_zygote(self) -> None:
        """Make sure a zygote serves our runtime dir and that we hold a presence connection
        to it (the zygote lives while some worker holds one)."""
        if self._lock is None:
            self._lock = anyio.Lock()
        seen = self._attempts_ended
        async with self._lock:
            if self._presence is not None:
                retired = await self._presence_alive()
                if retired is None:
                    return
                if retired:  # for new code, say: every worker restarts it, one says why
                    logger.info("the fork server (pid %s) has retired (%s); starting a new one", self._presence_pid, retired)
                else:  # not a restart of ours (that drops the presence first): it died or was killed
                    logger.warning(
                        "the fork server (pid %s) is gone, and every session process with it; starting a new one",
                        self._presence_pid,
                    )
            elif self._attempts_ended > seen and self._last_failure is not None:
                # one failed while we waited for the lock (it waited as long as another
                # try would): its answer, rather than a queue of requests that each wait
                # zygote_answer_seconds in turn
                raise ProcessStartError(str(self._last_failure), self._last_failure.kind)
            self._presence = None
            await self.drop_idle(_ZYGOTE)  # they may lead to a zygote on its way out
            self._last_failure = None
            deadline = time.monotonic() + self.config.zygote_answer_seconds
            budget = min(_HELLO_SECONDS, self.config.zygote_answer_seconds)
            started = just_started = False
            while True:
                try:
                    # what is left until the deadline, but the whole budget for the first hello
                    # to one we just started: its start (the app's imports) may have used it up
                    timeout = budget if just_started else max(0.05, min(budget, deadline - time.monotonic()))
                    just_started = False
                    stream, reply = await self._hello(timeout)
                    self._attempts_ended += 1
                    break
                except (*_STREAM_ERRORS, TimeoutError, ProtocolError) as exc:
                    # None answers, or one is on its way out: it stops listening first and
                    # lets its lock go once its processes are gone (a few seconds at most);
                    # the one we start waits for that lock, then serves (READY). EXISTS: one
                    # started by another worker got there first; we ask it again.
                    if time.monotonic() > deadline:
                        self._last_failure = ProcessStartError(f"no fork server answers in {self._runtime}: {exc!r}", "timeout")
                        self._attempts_ended += 1
                        raise self._last_failure from exc
                    if isinstance(exc, TimeoutError):
                        # it took the connection but did not answer: one listens, busy or
                        # stalled; another interpreter would only find it there (EXISTS)
                        continue
                    if started:
                        await anyio.sleep(0.2)
                    await self._start_zygote()
                    started = just_started = True
            self._presence = stream
            self._presence_pid = int(reply.get("pid", 0))
            if self._apps:
                await self._preload(sorted(self._apps))

    async def _hello(self, timeout: float) -> Tuple[SocketStream, Dict[str, Any]]:
        """A connection to the zygote that has answered our hello, and its answer, within
        ``timeout`` seconds, the connect included (TimeoutError)."""
        stream: Optional[SocketStream] = None
        try:
            with anyio.fail_after(timeout):
                stream = await self._zygote_connect()
                rx = BufferedByteReceiveStream(stream)
                await stream.send(wire.encode({"op": "hello", "settings": self.settings()}))
                header = await rx.receive_exactly(wire.HEADER_SIZE)
                reply = wire.decode_payload(await rx.receive_exactly(wire.decode_length(header)))
        except BaseException:
            if stream is not None:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
            raise
        return stream, reply

    async def _drop_presence(self) -> None:
        await self.drop_idle(_ZYGOTE)
        if self._presence is not None:
            presence, self._presence = self._presence, None
            with anyio.CancelScope(shield=True):
                await presence.aclose()

    async def _presence_alive(self) -> Optional[str]:
        """None while the zygote lives; once it is gone, why it retired if it said so
        (:data:`wire.RETIRING`), else ``""`` (it died, or was killed)."""
        assert self._presence is not None
        # The zygote writes on a presence connection after the hello reply only to say it
        # retires, just before it goes: a readable socket means it is gone.
        raw = self._presence.extra(anyio.abc.SocketAttribute.raw_socket)
        readable, _, _ = select.select([raw.fileno()], [], [], 0)
        if not readable:
            return None
        reason = ""
        incoming = wire.FrameBuffer(_NOTICE_MAX_BYTES)
        try:
            incoming.feed(raw.recv(_NOTICE_MAX_BYTES, socket.MSG_DONTWAIT))
            frame = incoming.next_frame()  # None: EOF, or less than a whole frame
            if frame is not None and frame.get("t") == wire.RETIRING and isinstance(frame.get("reason"), str):
                reason = frame["reason"][:200] or "no reason given"
        except (OSError, ProtocolError):
            pass  # a reset, or not that frame: gone without a word
        await self._presence.aclose()
        return reason

    def settings(self) -> Dict[str, Any]:
        """The fork server's settings this pool was configured with. They go with every
        hello too: a fork server started by an earlier server (within its grace period)
        takes them on, rather than go on with that one's."""
        return {
            "max_processes": self.config.max_processes,
            "grace_seconds": self.config.grace_seconds,
            "start_timeout_seconds": self.config.start_timeout_seconds,
            "max_starting": self.config.max_starting,
            "full_wait_seconds": self.config.full_wait_seconds,
            "evict_uncontacted_after": self.config.evict_uncontacted_after,
            "process_loop": self.config.process_loop,
            "batch_scheduling": self.config.batch_scheduling,
            "log_level": self.config.log_level,
        }

    async def _start_zygote(self) -> None:
        cfg = {
            "runtime_dir": self._runtime,
            **self.settings(),
            "sys_path": [p or os.getcwd() for p in sys.path],
            "main_path": self.main_path,
            "apps": sorted(self._apps),
        }
        timeout = 60.0
        if not os.path.isdir(self._runtime):
            # removed under us (a /tmp cleaner; logind empties $XDG_RUNTIME_DIR when the
            # user's last session ends): every process it held is unreachable now
            logger.error("the runtime dir %s is gone; making it again (its sessions are lost)", self._runtime)
        ensure_private_dir(self._runtime)
        logger.info("starting the fork server for %s", self._runtime)
        line = await anyio.to_thread.run_sync(_spawn_zygote, json.dumps(cfg), timeout)
        if not (line.startswith("READY") or line == "EXISTS"):
            raise ProcessStartError(f"the fork server did not start: {line or 'no answer'}")

    async def _preload(self, apps: List[str]) -> None:
        try:
            reply = await self._zygote_call({"op": "preload", "apps": apps}, timeout=60)
        except ProcessStartError as exc:
            if exc.kind != "timeout":
                raise
            # the fork server is up (it answered our hello) but busy: each app is imported
            # when a page first needs it instead
            logger.error("the fork server did not load %s in time: %s", ", ".join(apps), exc)
            return
        for ref, err in (reply.get("errors") or {}).items():
            logger.error("the fork server cannot load %s: %s", ref, err)

    def register_app(self, ref: str) -> None:
        self._apps.add(ref)

    async def zygote_request(self, msg: Dict[str, Any], *, timeout: float = 10.0) -> Dict[str, Any]:
        """One request/reply with the zygote (starting it if needed); see :meth:`_zygote_call`."""
        await self.ensure_zygote()
        try:
            return await self._zygote_call(msg, timeout=timeout)
        except ProcessStartError as exc:
            if exc.kind == "timeout":
                raise  # it is there but does not answer: another try would wait as long
            # the zygote went away between our check and the call: start another, once
            await self._drop_presence()
            await self.ensure_zygote()
            return await self._zygote_call(msg, timeout=timeout)

    async def _zygote_call(self, msg: Dict[str, Any], *, timeout: float) -> Dict[str, Any]:
        """One request/reply with the zygote over the pool's idle connections, as for a
        session process (:meth:`exchange`): no connect and accept per page render. Every
        request is one the zygote may see twice (spawn answers with the live process, kill
        names the pid)."""
        try:
            with anyio.fail_after(timeout):
                try:
                    conn = await self.acquire(_ZYGOTE)
                    reply, _ = await self.exchange(conn, msg)
                except ProcessGone as exc:
                    raise ProcessStartError("the fork server is not running") from exc
                return reply
        except TimeoutError as exc:
            logger.error("the fork server (pid %s) did not answer %r within %g s", self._presence_pid, msg.get("op"), timeout)
            raise ProcessStartError(f"the fork server did not answer within {timeout:g} s", "timeout") from exc

    async def spawn(
        self,
        key: str,
        app_ref: str,
        init: Any,
        session: Dict[str, Any],
        opts: Dict[str, Any],
        owner: str = "",
    ) -> Dict[str, Any]:
        """The live process of ``key`` built from ``init`` (forked if absent or built from
        other query params). Returns ``{"pid", "token", "created"}``.

        Raises:
            PoolFull: the host runs ``max_processes`` already.
            ProcessStartError: the app could not be started (crash, import error, timeout).
        """
        msg = {"op": "spawn", "key": key, "app": app_ref, "init": init, "session": session, "opts": opts, "owner": owner}
        reply = await self.zygote_request(msg, timeout=self.config.start_timeout_seconds + 10)
        if reply.get("error") == "stale":
            await self._drop_presence()
            reply = await self.zygote_request(msg, timeout=self.config.start_timeout_seconds + 10)
        if reply.get("ok"):
            return reply
        if reply.get("error") == "full":
            raise PoolFull(reply.get("message", "too many processes"))
        raise ProcessStartError(reply.get("message") or "the app process could not start", str(reply.get("error") or "crash"))

    async def kill(self, key: str, pid: Optional[int] = None) -> None:
        await self.zygote_request({"op": "kill", "key": key, "pid": pid})

    async def end_owner(self, owner: str) -> int:
        """End (SIGTERM: they say bye to their pages) the processes spawned with ``owner``;
        returns how many there were."""
        if self._presence is None and not os.path.exists(self.socket_path(_ZYGOTE)):
            return 0  # no fork server runs, so no process does: do not start one to say so
        reply = await self.zygote_request({"op": "kill_owner", "owner": owner})
        return int(reply.get("ended") or 0)

    async def stats(self) -> Dict[str, Any]:
        return await self.zygote_request({"op": "stats"})

    # --- per-session processes --------------------------------------------------------
    async def connect(self, key: str) -> ChildConnection:
        """A new dedicated connection (for a websocket). Raises ProcessGone."""
        try:
            with anyio.fail_after(10):
                path = self.socket_path(key)
                if _on_asyncio():
                    stream: "SocketStream | _UnixStream" = await _UnixStream.connect(path)
                else:
                    stream = await _anyio_connect(path)
        except (OSError, TimeoutError) as exc:
            raise ProcessGone(f"no process for {key[:8]}") from exc
        conn = ChildConnection(key, stream, self.config.max_frame_bytes)
        conn.generation = self._generations.get(key, 0)
        return conn

    async def acquire(self, key: str) -> ChildConnection:
        """A pooled connection (for http requests); give it back with :meth:`release`."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            self._idle_count -= 1
            if not idle:
                del self._idle[key]
            if not conn.broken:
                conn.reused = True
                return conn
            await conn.aclose()
        return await self.connect(key)

    async def exchange(
        self, conn: ChildConnection, obj: Dict[str, Any], raw: Optional[bytes] = None
    ) -> Tuple[Dict[str, Any], Optional[bytes]]:
        """One request/reply on a connection from :meth:`acquire`, which it gives back to the
        pool afterwards (or closes, if the exchange did not complete). An idle connection
        may lead to a process that has died since (maybe replaced under the same socket
        name): nothing ran there, so the key's idle connections are dropped and the request
        goes once more on a fresh connection. Raises ProcessGone (no process answered on a
        fresh connection) or ProtocolError."""
        done = False
        try:
            try:
                await conn.send(obj, raw)
                reply = await conn.receive_frame()
            except ProcessGone:
                if not conn.reused:
                    raise
                await conn.aclose()
                await self.drop_idle(conn.key)
                try:
                    conn = await self.connect(conn.key)
                except ProcessGone as exc:
                    exc.missing = True  # type: ignore[attr-defined]  # gone before this request, not during it
                    raise
                await conn.send(obj, raw)
                reply = await conn.receive_frame()
            done = True
            return reply
        finally:
            if done:
                await self.release(conn)
            else:
                await conn.aclose()  # a reply may still be on its way: never reuse it

    async def release(self, conn: ChildConnection) -> None:
        """Keep ``conn`` for the next request to its key, unless it is broken, the pool is
        full, or the key's idle connections were dropped since it was opened (it was then
        in flight, and may lead where they led: a process or zygote on its way out)."""
        stale = conn.generation != self._generations.get(conn.key, 0)
        if conn.broken or stale or self._idle_count >= self.max_idle_total or len(self._idle.get(conn.key, ())) >= 4:
            await conn.aclose()
            return
        self._idle.setdefault(conn.key, []).append(conn)
        self._idle_count += 1

    async def drop_idle(self, key: str) -> None:
        self._generations[key] = self._generations.get(key, 0) + 1
        for conn in self._idle.pop(key, []):
            self._idle_count -= 1
            await conn.aclose()

    async def aclose(self) -> None:
        """Close our connections; the zygote notices our presence is gone."""
        for key in list(self._idle):
            await self.drop_idle(key)
        if self._presence is not None:
            await self._presence.aclose()
            self._presence = None


def _spawn_zygote(cfg_json: str, timeout: float) -> str:
    """Start a zygote and return its first line (READY/EXISTS). Runs in a worker thread:
    it blocks, but with a deadline on every wait."""
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "asgi_htag.process.zygote", cfg_json],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        close_fds=True,
        start_new_session=True,
        env=env,
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
    finally:
        proc.stdout.close()
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))  # the detaching intermediate
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return buf.decode(errors="replace").strip()


__all__ = ("PoolConfig", "ProcessPool", "ChildConnection")
