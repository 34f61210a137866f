"""HtagASGI: a raw ASGI app that serves one htag app, one OS process per session.

Routes, relative to wherever it is mounted (``scope["root_path"]``):

* ``GET /`` (any query string): the page; the query params build the instance.
* ``WEBSOCKET /_htag/<app id>/ws``: interactions in, actions and ``tag.update()`` pushes out.
* ``POST /_htag/<app id>/interact``: one interaction (http_only mode).

The app id and the process key are derived server-side (a hash of the app's reference and
options, and of the session id), so a URL never names code to import, and a client can only
ever reach the processes of its own session.
"""
import gc
import hashlib
import html
import json
import logging
import os
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union
from urllib.parse import parse_qs

import anyio

from ._types import Receive, Scope, Send
from .config import (
    LoadScheduling,
    Secret,
    check_process_loop,
    check_runtime_dir,
    default_runtime_dir,
    default_state_dir,
    load_secret,
    use_batch_scheduling,
)
from .exceptions import ConfigurationError, PoolFull, ProcessGone, ProcessStartError, ProtocolError
from .process import wire
from .process.pool import PoolConfig, ProcessPool
from .sessions import MemoryStore, Session, SessionMiddleware, SessionStore, default_store, store_failure

logger = logging.getLogger(__name__)

APP_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_CFG_PLACEHOLDER = "/*ASGI_HTAG_CFG*/null"
_ROUTE_RE = re.compile(r"^/_htag/([^/]*)/(ws|interact)$")


@dataclass(frozen=True)
class AppOptions:
    """Per-app settings; they travel to the app's processes."""

    http_only: bool = False
    parano: bool = False
    debug: bool = False
    timeout_interaction: float = 60.0
    timeout_inactivity: float = 0.0
    timeout_abandoned: float = 120.0

    def __post_init__(self) -> None:
        if self.timeout_interaction < 0 or self.timeout_inactivity < 0 or self.timeout_abandoned < 0:
            raise ConfigurationError("timeouts are in seconds and must be >= 0 (0 disables them)")


def app_reference(obj: Any) -> str:
    """``"module:Qual.Name"`` for a Tag subclass or a "module:Class" / "module.Class" string.

    Raises:
        ConfigurationError: the app cannot be found again by import in another process.
    """
    if isinstance(obj, str):
        if ":" in obj:
            module, _, name = obj.partition(":")
        elif "." in obj:
            module, _, name = obj.rpartition(".")
        else:
            module, name = "", ""
        if not module or not name or not all(p.isidentifier() for p in module.split(".") + name.split(".")):
            raise ConfigurationError(f"app {obj!r} must be a Tag subclass or a 'module:Class' string")
        return f"{module}:{name}"
    from htag import Tag

    if not (isinstance(obj, type) and issubclass(obj, Tag)):
        raise ConfigurationError(f"app must be an htag Tag subclass or a 'module:Class' string, not {obj!r}")
    if "<locals>" in obj.__qualname__:
        raise ConfigurationError(
            f"{obj.__qualname__} is defined inside a function; define it at module level so "
            "the per-session processes can import it"
        )
    return f"{obj.__module__}:{obj.__qualname__}"


def app_id_for(ref: str, opts: AppOptions) -> str:
    return hashlib.sha256(json.dumps([ref, asdict(opts)], sort_keys=True).encode()).hexdigest()[:16]


def process_key(sid: str, app_id: str) -> str:
    return hashlib.sha256(f"{sid}\0{app_id}".encode()).hexdigest()[:20]


def session_owner(sid: str) -> str:
    """What the fork server knows of a session: a hash of its id, that tags its processes."""
    return hashlib.sha256(f"owner\0{sid}".encode()).hexdigest()[:20]


def url_to_init(query_string: str) -> List[Any]:
    """htag's rule: ``?john&age=12`` -> ``[["john"], {"age": "12"}]``."""
    from htag.runners.commons import url2ak

    args, kargs = url2ak("?" + query_string if query_string else "")
    return [list(args), dict(kargs)]


def _script_json(obj: Any) -> str:
    return json.dumps(obj).replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _relative_path(scope: Scope) -> str:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "") or ""
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


def _header(scope: Scope, name: bytes) -> Optional[str]:
    for k, v in scope.get("headers") or []:
        if k == name:
            return v.decode("latin-1")
    return None


class Engine:
    """Worker-side machinery shared by :class:`HtagASGI` and the Runner: settings, the
    session store, the process pool and the three handlers.

    ``process_loop`` is the event loop of the per-session processes: "auto" (uvloop when it
    is installed, else asyncio), "uvloop" (required) or "asyncio". The fork server is
    shared by every worker of a runtime directory: the first one to start it sets it.

    ``gc_freeze``: once the server has started (lifespan start-up of the Runner, or of
    HtagASGI served on its own), collect and then ``gc.freeze()`` every object alive, the
    imported world of the web worker: a full collection then scans only what requests
    allocate instead of pausing every user's clicks for all of it (12-21 ms, measured in a
    benchmark server during bursts of new sessions). Frozen objects are never collected.
    Mounted apps leave the host app's process alone.

    ``process_batch_scheduling``: the per-session processes run under Linux's SCHED_BATCH
    policy (same share of CPU, same nice): a session process that wakes up does not
    preempt another one that is running, so 50 busy sessions on 2 cores switch less
    (more clicks served per second of CPU). Set it False to keep the default policy. Like
    ``process_loop``, it is the setting of the worker that starts the fork server.

    ``worker_batch_scheduling``: once the server has started (as for ``gc_freeze``), the
    policy of the web worker's event loop thread. Every click wakes the worker twice (the
    page's message, the process's answer), and under the default policy each of those
    wake-ups preempts the session process running on that CPU in the middle of its click;
    under SCHED_BATCH the worker waits for it to block or use up its slice.

    * ``False`` (the default): the default policy always.
    * ``"auto"``: SCHED_BATCH while the worker has at least twice as many interactions in
      flight as it has CPUs, the default policy again once they are down to one per CPU,
      and for 10 s whenever, batched, it waits more than 300 us for a CPU per time slice
      (:class:`asgi_htag.config.LoadScheduling`). For a host that runs nothing else: in a
      benchmark on 2 cores, 50 sessions clicking at once got 7-10% more clicks per second
      than with the default policy, 10 sessions 2-4%, and one session the same quick
      wake-ups; with two CPU-bound programs beside the server, 50 sessions got 10% fewer.
    * ``True``: SCHED_BATCH always, for the loop thread and the threads it starts later.
      Where other programs keep the CPUs busy, the worker then waits for them at every
      wake-up (two CPU-bound programs on 2 cores: one session's median click 8 ms in two
      rounds of three, against 0.23-0.26 ms without it).

    Mounted apps leave the host app's process alone.

    ``session_cookie``: the session cookie's attributes, as :class:`SessionMiddleware`
    takes them: ``cookie_name``, ``max_age_seconds``, ``path``, ``same_site`` and
    ``https_only`` (e.g. ``{"https_only": True}`` behind a TLS proxy whose
    ``X-Forwarded-Proto`` the server does not trust, so the cookie is still ``Secure``)."""

    def __init__(
        self,
        *,
        state_dir: Optional[Union[str, Path]] = None,
        runtime_dir: Optional[Union[str, Path]] = None,
        secret: Optional[Union[str, bytes, Secret]] = None,
        store: Optional[SessionStore] = None,
        max_processes: int = 1000,
        max_message_bytes: int = 1024 * 1024,
        zygote_grace_seconds: float = 5.0,
        allowed_origins: Optional[List[str]] = None,
        log_level: Optional[str] = None,
        process_loop: str = "auto",
        gc_freeze: bool = True,
        process_batch_scheduling: bool = True,
        worker_batch_scheduling: Union[bool, str] = False,
        session_cookie: Optional[Dict[str, Any]] = None,
    ) -> None:
        if isinstance(max_processes, bool) or not isinstance(max_processes, int) or max_processes < 1:
            raise ConfigurationError(f"max_processes must be an int >= 1, got {max_processes!r}")
        if (
            isinstance(zygote_grace_seconds, bool)
            or not isinstance(zygote_grace_seconds, (int, float))
            or not 0 <= zygote_grace_seconds < 86400 * 365
        ):
            raise ConfigurationError(f"zygote_grace_seconds must be a number of seconds >= 0, got {zygote_grace_seconds!r}")
        if max_message_bytes > wire.DEFAULT_MAX_FRAME_BYTES - 64 * 1024:
            raise ConfigurationError(
                f"max_message_bytes must be <= {wire.DEFAULT_MAX_FRAME_BYTES - 64 * 1024} (what a frame to a process can hold)"
            )
        if max_message_bytes < 1024:
            raise ConfigurationError("max_message_bytes must be >= 1024")
        check_process_loop(process_loop)
        if not isinstance(worker_batch_scheduling, bool) and worker_batch_scheduling != "auto":
            raise ConfigurationError(
                f"worker_batch_scheduling must be True, False or 'auto', got {worker_batch_scheduling!r}"
            )
        self.session_cookie = dict(session_cookie or {})
        unknown = set(self.session_cookie) - _COOKIE_OPTIONS
        if unknown:
            raise ConfigurationError(
                f"session_cookie takes {', '.join(sorted(_COOKIE_OPTIONS))}; not {', '.join(sorted(unknown))}"
            )
        # the middleware checks the values: now, not at the first request
        checked = SessionMiddleware(_send_nothing, store=MemoryStore(), secret=b"x" * 32, **self.session_cookie)
        # (a host app's own SessionMiddleware may refresh more often: 5 minutes at most)
        self.cookie_keepalive = min(300.0, checked.refresh_seconds)
        self.state_dir = Path(state_dir).absolute() if state_dir else default_state_dir()
        self.runtime_dir = Path(runtime_dir).absolute() if runtime_dir else default_runtime_dir(self.state_dir)
        self._secret_arg = secret
        self._secret: Optional[Secret] = None
        self._store = store
        self._owns_store = False  # the default store is ours to close; one given to us is not
        self.max_message_bytes = max_message_bytes
        # compared as browsers send them: scheme and host in lower case
        self.allowed_origins = [o.rstrip("/").lower() for o in (allowed_origins or [])]
        main = sys.modules.get("__main__")
        self.main_path = getattr(main, "__file__", None)
        if self.main_path:
            self.main_path = os.path.abspath(self.main_path)
        self.pool_config = PoolConfig(
            runtime_dir=self.runtime_dir,
            max_processes=max_processes,
            grace_seconds=zygote_grace_seconds,
            process_loop=process_loop,
            batch_scheduling=process_batch_scheduling,
            log_level=log_level or logging.getLevelName(logging.getLogger("asgi_htag").getEffectiveLevel()),
        )
        self._pool: Optional[ProcessPool] = None
        self.gc_freeze = gc_freeze
        self.worker_batch_scheduling = worker_batch_scheduling
        # set by server_started() when worker_batch_scheduling == "auto"
        self.load_scheduling: Optional[LoadScheduling] = None

    @property
    def secret(self) -> Secret:
        if self._secret is None:
            self._secret = load_secret(self.state_dir, self._secret_arg)
        return self._secret

    @property
    def store(self) -> SessionStore:
        if self._store is None:
            self._store = default_store(self.state_dir)
            self._owns_store = True
        return self._store

    @property
    def pool(self) -> ProcessPool:
        if self._pool is None:
            check_runtime_dir(self.runtime_dir)
            self._pool = ProcessPool(self.pool_config, main_path=self.main_path)
        return self._pool

    def session_middleware(self, app: Any) -> SessionMiddleware:
        return SessionMiddleware(
            app, store=self.store, secret=self.secret, on_drop=self.session_dropped, **self.session_cookie
        )

    async def session_dropped(self, sid: str) -> None:
        """A session was dropped (a logout's clear(), the old id of a regenerate_id()): its
        processes are unreachable from now on, so they go instead of waiting for
        timeout_inactivity (never, by default) and counting against max_processes."""
        ended = await self.pool.end_owner(session_owner(sid))
        if ended:
            logger.info("session %s dropped: %s process(es) ended", sid[:6], ended)

    async def startup(self, refs: List[str]) -> None:
        for ref in refs:
            self.pool.register_app(ref)
        try:
            await self.pool.ensure_zygote()
        except ProcessStartError as exc:
            if exc.kind != "timeout":
                raise  # it cannot start (the app does not import...): say so at once
            # A fork server runs but is busy (a slow import, a stalled host). Failing here
            # would fail the worker's boot, and gunicorn stops every worker when a new one
            # fails to boot; the first requests try again instead.
            logger.error("the fork server did not answer at start-up; requests will try again: %s", exc)

    def server_started(self) -> None:
        """Called once the server this engine owns has started (lifespan start-up of the
        Runner, or of HtagASGI served on its own); see ``gc_freeze`` and
        ``worker_batch_scheduling``."""
        if self.gc_freeze:
            gc.collect()
            gc.freeze()
            logger.debug("gc: %s objects frozen after start-up", gc.get_freeze_count())
        if self.worker_batch_scheduling == "auto":
            load = LoadScheduling()
            if load.attach():
                self.load_scheduling = load
        elif self.worker_batch_scheduling:
            use_batch_scheduling("the web worker")

    async def shutdown(self) -> None:
        if self._pool is not None:
            await self.pool.aclose()
        if self._owns_store and self._store is not None:
            await self._store.close()  # (it reopens if used again)

    # --- helpers ----------------------------------------------------------------------
    def origin_ok(self, scope: Scope) -> bool:
        origin = _header(scope, b"origin")
        if origin is None:
            return True  # not a browser: cross-site hijacking needs one
        origin = origin.rstrip("/").lower()
        if origin in self.allowed_origins:
            return True
        host = _header(scope, b"host")
        if host is None:
            return False
        _, _, netloc = origin.partition("://")
        return netloc.lower() == host.lower()

    @staticmethod
    def session_of(scope: Scope) -> Session:
        session = scope.get("session")
        if not isinstance(session, Session):
            raise ConfigurationError(
                "asgi_htag needs its own session in scope['session']; wrap the app in "
                "asgi_htag.SessionMiddleware (or use HtagASGI / Runner, which do it)"
            )
        session.accessed = True  # the session's id keys the process, which reads its data
        return session

    # --- GET: the page ----------------------------------------------------------------
    async def render_page(self, scope: Scope, ref: str, opts: AppOptions) -> Tuple[int, str]:
        """Render the page of ``ref`` for this request's session: ``(status, html)``."""
        session = self.session_of(scope)
        sid = session.ensure_id()
        app_id = app_id_for(ref, opts)
        key = process_key(sid, app_id)
        qs = scope.get("query_string", b"").decode("latin-1")
        init = url_to_init(qs)
        pool = self.pool
        pool.register_app(ref)
        for attempt in (1, 2):
            try:
                info = await pool.spawn(key, ref, init, dict(session), asdict(opts), session_owner(sid))
            except PoolFull:
                logger.warning("refusing a new process for session %s: pool is full", sid[:6])
                return 503, _error_page("The server is busy", "Too many users right now. Please try again later.")
            except ProcessStartError as exc:
                logger.error("cannot start %s for session %s: %s", ref, sid[:6], exc)
                if exc.kind == "timeout":
                    return 504, _error_page(
                        "The application took too long to start",
                        "The server could not start it in time. Reload to try again.",
                    )
                detail = str(exc) if opts.debug else "The application could not start."
                return 500, _error_page("Application error", detail, pre=opts.debug)
            try:
                conn = await pool.acquire(key)
                reply, _ = await pool.exchange(conn, {"t": "render", "token": info["token"], "session": dict(session)})
            except ProcessGone:
                if attempt == 2:
                    return 500, _error_page("Application error", "The application process stopped while rendering.")
                # A fresh connection failed: the process is exiting (inactivity, exit(), a
                # crash) but the fork server has not reaped it yet and would hand it out
                # again. Have it dropped (that pid only, not a replacement another worker may
                # have made) so that the retry gets a new one.
                await pool.kill(key, info.get("pid"))
                continue
            if reply.get("t") != "html":
                if attempt == 2:
                    return 500, _error_page("Application error", "The application process did not render the page.")
                continue
            self._apply_local(session, reply.get("diff"))
            root = scope.get(ROOT_PATH_KEY, scope.get("root_path", "")) or ""
            cfg = {
                "mode": "http" if opts.http_only else "ws",
                "ws": f"{root}/_htag/{app_id}/ws",
                "post": f"{root}/_htag/{app_id}/interact",
                "token": info["token"],
                "parano": opts.parano,
                # a page that clicks over its websocket gets no HTTP response: it asks for
                # one this often while in use, so that the cookie's Max-Age slides
                "keepalive": self.cookie_keepalive,
            }
            page = reply["html"].replace(_CFG_PLACEHOLDER, _script_json(cfg), 1)
            logger.info(
                "render %s for session %s (process %s, %s)", ref, sid[:6], info.get("pid"), "new" if info.get("created") else "reused"
            )
            return 200, page
        raise AssertionError("unreachable")

    @staticmethod
    def _apply_local(session: Session, diff: Optional[Dict[str, Any]]) -> None:
        if not diff:
            return
        emptied = session.emptied
        for k, v in (diff.get("set") or {}).items():
            session[k] = v
        for k in diff.get("del") or []:
            session.pop(k, None)
        session.emptied = emptied  # what the app deletes never drops the session (only requests do)

    # --- websocket and POST: interactions ---------------------------------------------
    async def interaction_endpoint(self, scope: Scope, receive: Receive, send: Send, app_id: str, kind: str) -> None:
        if kind == "ws" and scope["type"] == "websocket":
            await self._websocket(scope, receive, send, app_id)
        elif kind == "interact" and scope["type"] == "http" and scope.get("method") == "POST":
            await self._post(scope, receive, send, app_id)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await _send_response(send, 405, b"method not allowed", "text/plain; charset=utf-8")

    async def _post(self, scope: Scope, receive: Receive, send: Send, app_id: str) -> None:
        if not self.origin_ok(scope):
            logger.warning("refused an interaction POST from a foreign origin")
            await _send_json(send, 403, {"asgi_htag": "error", "message": "foreign origin"})
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_message_bytes:
                # Read the rest (up to a bound) before answering: a server that closes with
                # unread data resets the connection, and the client may never see the 413.
                left = 16 * self.max_message_bytes
                while more and left > 0:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    left -= len(message.get("body", b""))
                    more = message.get("more_body", False)
                await _send_json(send, 413, {"asgi_htag": "error", "message": "interaction too large"})
                return
        session = self.session_of(scope)
        token = _query_value(scope, "t")
        if session.sid is None or not APP_ID_RE.match(app_id) or not token:
            await _send_json(send, 200, _GONE)
            return
        key = process_key(session.sid, app_id)
        pool = self.pool
        try:
            conn = await pool.acquire(key)
        except ProcessGone:
            await _send_json(send, 200, _GONE)
            return
        meta = {"t": "interact", "token": token, "session": dict(session)}
        load = self.load_scheduling
        if load is not None:
            load.started()
        try:
            # the body goes to the process untouched: it parses and checks it (a process
            # that replaced a dead one answers "gone" to the old page's token)
            reply, out = await pool.exchange(conn, meta, bytes(body))
        except ProcessGone as exc:
            # gone before this click (inactivity, a page that never made contact...): the page
            # reloads into a new instance; gone during it: the user is told
            await _send_json(send, 200, _GONE if getattr(exc, "missing", False) else _dead_message(True))
            return
        except ProtocolError:
            await _send_json(send, 502, {"asgi_htag": "error", "message": "the app process broke the protocol"})
            return
        finally:
            if load is not None:
                load.finished()
        if reply.get("t") == "gone" or out is None:
            await _send_json(send, 200, _GONE)
            return
        diff = reply.get("diff")
        if diff and not await _save_changes(session, diff):
            logger.info("session %s is gone (a logout): its page's write is dropped", session.sid[:6])
            await _send_json(send, 200, _GONE)
            return
        await _send_response(send, int(reply.get("status") or 200), out, "application/json")

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, app_id: str) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        if not self.origin_ok(scope):
            logger.warning("refused a websocket from a foreign origin")
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "websocket.accept"})
        send_lock = anyio.Lock()
        closed = False

        async def ws_send_text(text: str) -> None:
            nonlocal closed
            if closed:
                return
            try:
                send_lock.acquire_nowait()  # uncontended, the usual case: no checkpoint
            except anyio.WouldBlock:
                await send_lock.acquire()
            try:
                await send({"type": "websocket.send", "text": text})
            except (OSError, RuntimeError):
                closed = True
            finally:
                send_lock.release()

        async def ws_send(obj: Any) -> None:
            await ws_send_text(json.dumps(obj, separators=(",", ":")))

        async def ws_close(code: int = 1000) -> None:
            nonlocal closed
            if closed:
                return
            closed = True
            try:
                await send({"type": "websocket.close", "code": code})
            except (OSError, RuntimeError):
                pass

        session = self.session_of(scope)
        store = session.store
        token = _query_value(scope, "t")
        resync = _query_value(scope, "resync") == "1"
        page_id = _query_value(scope, "k")
        if session.sid is None or not APP_ID_RE.match(app_id) or not token:
            await ws_send(_GONE)
            await ws_close(4001)
            return
        key = process_key(session.sid, app_id)
        short_sid = session.sid[:6]
        try:
            conn = await self.pool.connect(key)
        except ProcessGone:
            await ws_send(_GONE)
            await ws_close(4001)
            return
        pending = 0
        pending_since = 0.0
        load = self.load_scheduling
        clicked = [anyio.Event()]  # set when a click becomes pending (wakes the watchdog)
        try:
            sent_version = store.version()
            touched_at = time.monotonic()  # the handshake's request touched the session
            await session.reload()
            try:
                await conn.send(
                    {"t": "subscribe", "token": token, "resync": resync, "k": page_id, "session": dict(session)}
                )
                reply, out = await conn.receive_frame()
                # The process counts this page as subscribed before it answers, and its
                # answer waits while an interaction runs: what that interaction pushes
                # meanwhile comes first, and goes to the page as any push does.
                while reply.get("t") == "push":
                    if out is not None:
                        await ws_send_text(out.decode())
                    reply, out = await conn.receive_frame()
            except (ProcessGone, ProtocolError):
                reply, out = {"t": "gone"}, None
            if reply.get("t") != "subscribed":
                if reply.get("t") == "gone":
                    await ws_send(_GONE)
                elif out is not None:  # the process's own error for the page (its text rides there)
                    await ws_send_text(out.decode())
                else:
                    await ws_send({"asgi_htag": "error", "message": reply.get("message", "")})
                await ws_close(4001)
                return
            timeout_interaction = reply.get("timeout_interaction") or 0
            sock_path = self.pool.socket_path(key)
            if out:
                await ws_send_text(out.decode())
            logger.debug("websocket of session %s subscribed to process %s", short_sid, reply.get("pid"))

            async with anyio.create_task_group() as tg:

                async def watchdog() -> None:
                    # The process kills itself (SIGALRM) past timeout_interaction; if it is
                    # stuck beyond that too (signals blocked...), the fork server kills it:
                    # no click waits unbounded. from_process then sees the connection end.
                    while True:
                        await clicked[0].wait()
                        clicked[0] = anyio.Event()
                        while pending:
                            left = pending_since + timeout_interaction + _BACKSTOP_SECONDS - time.monotonic()
                            if left > 0:
                                await anyio.sleep(left)
                                continue
                            since = wire.read_busy(sock_path)
                            limit = timeout_interaction + _BACKSTOP_SECONDS
                            if since and time.monotonic() - since < limit:
                                # It is in an interaction that started less than a limit ago
                                # (its own timer ends it past that): this click waits behind
                                # others (the session's other tabs) and is not stuck.
                                await anyio.sleep(since + limit - time.monotonic())
                                continue
                            logger.error("process of session %s is stuck past its timeout: killing it", short_sid)
                            try:
                                await self.pool.kill(key)
                            except Exception:
                                logger.exception("could not have the stuck process of session %s killed", short_sid)
                            return

                async def from_process() -> None:
                    nonlocal pending, pending_since
                    try:
                        while True:
                            frame, out = await conn.receive_frame()
                            diff = frame.get("diff")
                            if diff and not await _save_changes(session, diff, ws_send):
                                # the session was deleted (a logout) or expired: the app's write
                                # must not bring it back; the page reloads into the current one
                                logger.info("session %s is gone (a logout): its page's write is dropped", short_sid)
                                await ws_send(_GONE)
                                await ws_close(4001)
                                break
                            t = frame.get("t")
                            if t in ("actions", "error", "hello"):
                                if pending:
                                    pending -= 1
                                    if load is not None:
                                        load.finished()
                                pending_since = time.monotonic()  # not anyio's clock: no backend lookup per click
                            if t in ("actions", "error", "hello", "push"):
                                if out is not None:
                                    await ws_send_text(out.decode())
                            elif t in ("bye", "gone"):
                                await ws_send(_IDLE if frame.get("reason") == "inactivity" else _GONE)
                                await ws_close(4001)
                                break
                    except ProcessGone:
                        logger.warning("process of session %s died (interaction pending: %s)", short_sid, bool(pending))
                        await ws_send(_dead_message(bool(pending), timeout_interaction))
                        await ws_close(4002)
                    except ProtocolError as exc:
                        logger.error("process of session %s broke the protocol: %s", short_sid, exc)
                        await ws_send(_dead_message(False))
                        await ws_close(4002)
                    tg.cancel_scope.cancel()

                tg.start_soon(from_process)
                if timeout_interaction:
                    tg.start_soon(watchdog)
                plain_meta = wire.compact_json({"t": "interact", "token": token})  # a click's frame, session aside
                while True:
                    message = await receive()
                    if message["type"] == "websocket.disconnect":
                        closed = True
                        break
                    if message["type"] != "websocket.receive":
                        continue
                    text = message.get("text")
                    raw: bytes = text.encode("utf-8", "surrogatepass") if text is not None else (message.get("bytes") or b"")
                    if len(raw) > self.max_message_bytes:
                        await ws_send({"asgi_htag": "error", "message": "interaction too large"})
                        continue
                    # the session travels only when the store says something changed
                    meta: Optional[Dict[str, Any]] = None
                    version = store.version()
                    stale = version is None or version != sent_version
                    now = time.monotonic()
                    if now - touched_at >= _TOUCH_SECONDS:
                        # clicking keeps the session alive as requests do; one that expired
                        # meanwhile is not revived, and reaches the app as an empty one
                        touched_at = now
                        await store.touch(session.sid)
                        stale = True
                    if stale:
                        await session.reload()
                        meta = {"t": "interact", "token": token, "session": dict(session)}
                        sent_version = version
                    if not pending:
                        pending_since = now
                        clicked[0].set()
                    pending += 1
                    if load is not None:
                        load.started()
                    try:
                        if meta is None:
                            await conn.send_json(plain_meta, raw)
                        else:
                            await conn.send(meta, raw)
                    except ProcessGone:
                        break  # from_process reports it
                tg.cancel_scope.cancel()
        finally:
            if pending and load is not None:
                load.finished(pending)  # answers that will not come to this websocket
            await conn.aclose()
            await ws_close(1000)


# set by a Runner (and by HtagASGI) on the scopes it serves: the root_path of its own
# /_htag/... routes, which a Mount inside a Runner would otherwise lengthen
ROOT_PATH_KEY = "asgi_htag.root_path"

_COOKIE_OPTIONS = {"cookie_name", "max_age_seconds", "path", "same_site", "https_only"}


async def _send_nothing(scope: Scope, receive: Receive, send: Send) -> None:
    """The app of the session middleware built only to check the cookie options."""


_BACKSTOP_SECONDS = 2.0
_TOUCH_SECONDS = 1.0  # how often clicks over a websocket refresh their session's expiry
_GONE = {"asgi_htag": "gone", "message": "This page's instance no longer exists; reloading..."}
# its process ended after timeout_inactivity while the page stayed open: the page says so
# and waits for a reload, as when its process stopped otherwise ("dead"); reloading by
# itself, a tab left open would start a process every timeout_inactivity
_IDLE = {
    "asgi_htag": "dead",
    "reason": "inactivity",
    "message": "This page was left unused for a while, and its application has stopped.",
}


def _dead_message(pending: bool, timeout: float = 0) -> Dict[str, Any]:
    if pending:
        limit = f" (limit: {timeout:g} s)" if timeout else ""
        text = f"The application stopped: an interaction took too long{limit} or crashed it. Reload the page to start again."
    else:
        text = "The application process stopped. Reload the page to start again."
    return {"asgi_htag": "dead", "message": text}


def _query_value(scope: Scope, name: str) -> Optional[str]:
    qs = scope.get("query_string", b"").decode("latin-1")
    values = parse_qs(qs).get(name)
    return values[0] if values else None


async def _save_changes(session: Any, diff: Dict[str, Any], notify: Any = None) -> bool:
    """Apply an app's session changes to the store: False if the session is gone (a
    logout). A store that fails (its disk full or read-only, its server down) is logged
    and the click's answer still goes to the page (``notify``, a websocket's sender, tells
    it the change was not saved): the page stays in step with its instance."""
    try:
        return bool(await session.apply_changes(diff.get("set") or {}, diff.get("del") or [], create=False))
    except Exception as exc:
        if not store_failure(exc):
            raise
        logger.error("the session store failed to save the changes of session %s...: %s: %s",
                     (session.sid or "-")[:6], type(exc).__name__, str(exc)[:200])
        if notify is not None:
            await notify({"asgi_htag": "error", "message": _NOT_SAVED})
        return True


_NOT_SAVED = "The server could not save this change to your session; it may be lost."


def _error_page(title: str, text: str, pre: bool = False) -> str:
    body = f"<pre>{html.escape(text)}</pre>" if pre else f"<p>{html.escape(text)}</p>"
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>"
        f"{html.escape(title)}</title></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


async def _send_response(send: Send, status: int, body: bytes, content_type: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Send, status: int, obj: Any) -> None:
    await _send_response(send, status, json.dumps(obj, separators=(",", ":")).encode(), "application/json")


class HtagASGI:
    """Serve one htag app as a raw ASGI application.

    Args:
        obj: a ``htag.Tag`` subclass, or a ``"module:Class"`` / ``"module.Class"`` string.
        http_only: interactions over HTTP POST instead of a websocket (no ``tag.update()``).
        parano: encrypt every interaction and push payload (AES-GCM, key agreed per page).
        debug: show Python tracebacks in the page.
        timeout_interaction: seconds an interaction (or the instance creation) may run
            before its process is killed; 0 disables.
        timeout_inactivity: seconds without interaction after which a process exits; 0 = never.
        timeout_abandoned: seconds a new process waits for its page to make contact (open
            its websocket, or send an interaction) before it exits; 0 = forever. Clients
            that run no JavaScript (crawlers, link previews) would otherwise hold a process
            each, for ever by default, until max_processes turned everyone away.
        state_dir, runtime_dir, secret, store, max_processes, max_message_bytes,
        allowed_origins, zygote_grace_seconds, process_loop, gc_freeze,
        process_batch_scheduling, worker_batch_scheduling: see :class:`Engine`.

    Raises:
        ConfigurationError: at construction, for a bad app reference or bad settings.
    """

    def __init__(
        self,
        obj: Any,
        *,
        http_only: bool = False,
        parano: bool = False,
        debug: bool = False,
        timeout_interaction: float = 60,
        timeout_inactivity: float = 0,
        timeout_abandoned: float = 120,
        engine: Optional[Engine] = None,
        **engine_options: Any,
    ) -> None:
        self.ref = app_reference(obj)
        self.options = AppOptions(
            http_only=http_only,
            parano=parano,
            debug=debug,
            timeout_interaction=timeout_interaction,
            timeout_inactivity=timeout_inactivity,
            timeout_abandoned=timeout_abandoned,
        )
        self.engine = engine or Engine(**engine_options)
        self._with_session: Optional[Any] = None

    def __repr__(self) -> str:
        return f"HtagASGI({self.ref!r}, {self.options})"

    async def startup(self) -> None:
        """Start (or join) the fork server and preload this app. Called on lifespan
        start-up when HtagASGI is the top-level app; when it is mounted (Starlette and
        FastAPI do not forward lifespan events to mounts), call it from the host app's
        lifespan, or let the first request do it."""
        await self.engine.startup([self.ref])

    async def shutdown(self) -> None:
        """Close this worker's connections; the fork server stops its processes once no
        worker is left (after its grace period)."""
        await self.engine.shutdown()

    def session_middleware(self, app: Any) -> SessionMiddleware:
        """Wrap another ASGI app (e.g. the FastAPI app this one is mounted in) with the
        session middleware this app uses, so that ``request.session`` there and
        ``tag.session`` here are one session."""
        return self.engine.session_middleware(app)

    async def session_dropped(self, sid: str) -> None:
        """End the processes of session ``sid``. Give it as ``on_drop`` to a
        :class:`SessionMiddleware` of your own that wraps the host app
        (``app.add_middleware(SessionMiddleware, store=..., secret=...,
        on_drop=ui.session_dropped)``): a logout there, or an expired session, then ends
        them, as under :class:`Runner` or :meth:`session_middleware`."""
        await self.engine.session_dropped(sid)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] not in ("http", "websocket"):
            return
        scope[ROOT_PATH_KEY] = scope.get("root_path", "")  # our /_htag/ routes, even inside a Runner
        if isinstance(scope.get("session"), Session):
            await self._dispatch(scope, receive, send)
            return
        if self._with_session is None:
            self._with_session = self.engine.session_middleware(self._dispatch)
        await self._with_session(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    logger.exception("asgi_htag start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                self.engine.server_started()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        rel = _relative_path(scope)
        m = _ROUTE_RE.match(rel)
        if m:
            await self.engine.interaction_endpoint(scope, receive, send, m.group(1), m.group(2))
            return
        if scope["type"] == "http" and rel == "/" and scope.get("method") in ("GET", "HEAD"):
            try:
                status, page = await self.engine.render_page(scope, self.ref, self.options)
            except Exception:
                logger.exception("error while rendering %s", self.ref)
                text = traceback.format_exc() if self.options.debug else "Internal server error"
                status, page = 500, _error_page("Server error", text, pre=self.options.debug)
            await _send_response(send, status, page.encode(), "text/html; charset=utf-8")
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await _send_response(send, 404, b"not found", "text/plain; charset=utf-8")


__all__ = ("HtagASGI", "Engine", "AppOptions", "app_reference")
