"""The fork server ("zygote"): one per runtime directory, shared by every web worker.

It is started as a fresh interpreter (``python -m asgi_htag.process.zygote CONFIG``) so it
holds no copy of any client socket, imports htag and the apps once, and then forks one
child per (session, app). A child costs a fork, not an interpreter start, and no web
worker's event loop ever blocks on it.

Single-threaded and synchronous on purpose (``selectors``): a fork from here is clean,
and a child starts its own fresh asyncio loop.

The forks themselves are done by a *forker*, a process forked once from the zygote when it
is ready, which does nothing between forks but wait for the next request. Every page a
parent writes after a fork stays, as the original, with the child that shares it: the
zygote's bookkeeping (connections, children, timers) would be copied into every process
this way, the forker's near-empty loop is not.

Lifetime: it lives while at least one web worker holds a *presence* connection, and exits
``grace_seconds`` after the last one went away, terminating every child it started. It
never touches a process it did not start. A second zygote started for the same runtime
directory sees the lifetime lock taken and reports ``EXISTS``.
"""
import collections
import ctypes
import errno
import fcntl
import gc
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import math
import os
import re
import resource
import secrets
import selectors
import signal
import socket
import sys
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

from ..config import use_batch_scheduling
from ..exceptions import FrameTooLarge, ProcessStartError, ProtocolError
from . import wire

logger = logging.getLogger("asgi_htag.process.zygote")

KEY_RE = re.compile(r"^[0-9a-f]{20}$")
CONTROL_MAX_FRAME_BYTES = 4 * 1024 * 1024
MAIN_MODULE = "__asgi_htag_main__"
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def socket_path(runtime_dir: str, key: str) -> str:
    return os.path.join(runtime_dir, key + ".s")


def load_app(ref: str, main_path: Optional[str]) -> type:
    """Import ``"module:Qual.Name"``; ``__main__`` means the server's main script."""
    from htag import Tag

    module_name, _, qualname = ref.partition(":")
    if module_name == "__main__":
        module = sys.modules.get(MAIN_MODULE)
        if module is None:
            if not main_path:
                raise ImportError(f"{ref}: the app lives in __main__ but the main script's path is unknown")
            spec = importlib.util.spec_from_file_location(MAIN_MODULE, main_path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {main_path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[MAIN_MODULE] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[MAIN_MODULE]
                raise
    else:
        module = importlib.import_module(module_name)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Tag)):
        raise TypeError(f"{ref} is not an htag Tag subclass")
    return obj


class Child:
    __slots__ = ("key", "pid", "pidfd", "token", "init", "ready", "ready_fd", "waiters", "deadline", "buf", "started", "timeout", "owner", "contacted", "ready_at")

    def __init__(self, key: str, pid: int, pidfd: int, token: str, init: str, ready_fd: int, deadline: float) -> None:
        self.key = key
        self.pid = pid
        self.pidfd = pidfd
        self.token = token
        self.init = init
        self.ready = False
        self.ready_fd: Optional[int] = ready_fd
        self.waiters: List[socket.socket] = []
        self.deadline = deadline
        self.buf = b""
        self.started = time.monotonic()
        self.timeout = 0.0  # its timeout_interaction (the kernel timer that ends a slow start)
        self.owner = ""  # a hash of its session's id: the session's processes end with it (kill_owner)
        self.contacted = False  # its page made contact (known once read from its busy mark)
        self.ready_at = 0.0  # when it reported ready (its page can only be rendered after)


class Zygote:
    def __init__(self, cfg: Dict[str, Any]) -> None:
        self.runtime_dir: str = cfg["runtime_dir"]
        self.max_processes: int = int(cfg.get("max_processes", 1000))
        self.grace: float = float(cfg.get("grace_seconds", 5.0))
        self.start_timeout: float = float(cfg.get("start_timeout_seconds", 60.0))
        # How many children may be starting at once: a burst of new sessions then queues
        # here instead of crowding the CPUs that existing users' clicks need.
        self.max_starting: int = max(1, int(cfg.get("max_starting") or (os.cpu_count() or 1)))
        self.queued: "collections.deque[Tuple[socket.socket, Dict[str, Any]]]" = collections.deque()
        # At max_processes while some processes were told to go (a logout, an expired
        # session, a replaced instance): a new one waits for them, this long at most,
        # rather than be refused while a place is being freed.
        self.full_wait: float = max(0.0, float(cfg.get("full_wait_seconds", 5.0)))
        self.parked: "collections.deque[Tuple[socket.socket, Dict[str, Any], float]]" = collections.deque()
        # Full, with none on its way out: the oldest process whose page never made contact
        # (a client that runs no JavaScript: a crawler, a script, a link preview) and that
        # has had this long to, is ended to make room rather than turn a person away.
        self.evict_after: float = float(cfg.get("evict_uncontacted_after", 10.0))
        self.started_with = {k: cfg[k] for k in ("process_loop", "batch_scheduling", "log_level") if k in cfg}
        self._kept_warned: List[str] = []
        self.main_path: Optional[str] = cfg.get("main_path")
        self.sel = selectors.DefaultSelector()
        self.children: Dict[str, Child] = {}  # live or starting, by key
        self.by_pidfd: Dict[int, Child] = {}  # every child not yet reaped (incl. replaced ones)
        self.by_ready_fd: Dict[int, Child] = {}
        self.conns: Dict[int, wire.FrameBuffer] = {}
        self.sockets: Dict[int, socket.socket] = {}
        self.presence: set = set()
        self.idle_since: Optional[float] = time.monotonic()
        self.stop = False
        self.apps: Dict[str, type] = {}
        self.stamps: Dict[str, Any] = {}
        self.client_js = ""
        self.listener: Optional[socket.socket] = None
        self.sock_inode = -1
        self.lock_files: List[Any] = []
        self.wake_r, self.wake_w = os.pipe()
        # Only we hold the write end: every session process holds the read end (through the
        # forker) and ends when it reads EOF, so they all end with us, however we end. They
        # do not end with the forker (a parent-death signal would tie them to it): when
        # it is replaced (killed after a timeout, or it died), they live on as ours.
        self.life_r, self.life_w = os.pipe()
        self.forker: Optional[socket.socket] = None
        self.forker_pid = 0
        self.forker_pidfd = -1
        # our own descriptors (the listener, the wake-up pipe, the forker's pidfd) that an
        # error took out of the selector for a moment: descriptor -> (its tag, when it returns)
        self.paused: Dict[Any, Tuple[str, float]] = {}
        self.accept_failing = False
        self._forgotten = False  # set in a child once it has closed what is ours

    # --- start-up ---------------------------------------------------------------------
    def acquire(self, wait_seconds: float = 20.0) -> bool:
        """Take the lifetime lock; False if another zygote already serves this directory.

        A zygote that holds the lock but no longer listens is on its way out (it stops
        listening first, then waits a few seconds for its processes): we wait for its lock,
        ``wait_seconds`` at most, and take over, rather than step aside and have the worker
        start interpreter after interpreter until it is gone."""
        start = open(os.path.join(self.runtime_dir, "zygote.start.lock"), "a+")
        fcntl.flock(start, fcntl.LOCK_EX)  # blocks while another zygote is starting
        life = open(os.path.join(self.runtime_dir, "zygote.life.lock"), "a+")
        try:
            fcntl.flock(life, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            # the holder got past its start (we hold the start lock): it listens, or it stops
            if self._someone_listens() or not _flock_within(life, wait_seconds):
                life.close()
                start.close()
                return False
            logger.info("zygote %s: the previous fork server has stopped; taking over", os.getpid())
        self.lock_files = [start, life]
        return True

    def _someone_listens(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(5)
            probe.connect(os.path.join(self.runtime_dir, "zygote.s"))
            return True
        except OSError:  # no socket file, or nobody accepts on it (ECONNREFUSED)
            return False
        finally:
            probe.close()

    def listen(self) -> None:
        path = os.path.join(self.runtime_dir, "zygote.s")
        tmp = f"{path}.{os.getpid()}.t"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(512)
        os.replace(tmp, path)
        self.sock_inode = os.stat(path).st_ino
        sock.setblocking(False)
        self.listener = sock
        self.sel.register(sock, selectors.EVENT_READ, "listen")
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        # the grace period counts from here: the imports, the warm-up and any wait for a
        # previous zygote's lock are not time in which a worker could have come
        self.idle_since = time.monotonic()
        # release the start lock: waiting zygotes now see us listening and give up
        fcntl.flock(self.lock_files[0], fcntl.LOCK_UN)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop = True

    # --- the loop ---------------------------------------------------------------------
    def run(self) -> None:
        while not self.stop:
            now = time.monotonic()
            timeout: Optional[float] = None
            if not self.presence and self.idle_since is not None:
                timeout = max(0.0, self.idle_since + self.grace - now)
            for child in self.children.values():
                if not child.ready:
                    t = max(0.0, child.deadline - now)
                    timeout = t if timeout is None else min(timeout, t)
            if self.parked:
                t = max(0.0, min(until for _c, _m, until in self.parked) - now)
                timeout = t if timeout is None else min(timeout, t)
            if self.paused:
                t = max(0.0, min(until for _tag, until in self.paused.values()) - now)
                timeout = t if timeout is None else min(timeout, t)
            for key, _events in self.sel.select(timeout):
                if not self._still_registered(key):
                    # its descriptor was closed by an earlier event of this batch (and its
                    # number may already belong to a new child's pipe): stale
                    continue
                try:
                    self._on_event(key)
                except Exception:
                    # one event that could not be handled must not end every session
                    logger.exception("the fork server could not handle a %r event; it carries on", key.data)
                    self._after_error(key)
            now = time.monotonic()
            if self.paused:
                self._resume_paused(now)
            if self.parked:
                self._expire_parked(now)
            for child in list(self.children.values()):
                if not child.ready and now >= child.deadline:
                    logger.warning("process %s for %s did not start within %ss: killed", child.pid, child.key[:8], self.start_timeout)
                    self._kill(child, signal.SIGKILL)
            if not self.presence and self.idle_since is not None and now - self.idle_since >= self.grace:
                logger.info("no web worker left for %ss: stopping %d processes", self.grace, len(self.by_pidfd))
                self.stop = True
                break
        self.shutdown()

    def _on_event(self, key: "selectors.SelectorKey") -> None:
        tag = key.data
        if tag == "listen":
            self._accept()
        elif tag == "wake":
            os.read(self.wake_r, 512)
        elif tag == "conn":
            self._on_conn(key.fileobj)  # type: ignore[arg-type]
        elif tag == "pidfd":
            self._on_exit(key.fd)
        elif tag == "ready":
            self._on_ready(key.fd)
        elif tag == "forker":
            logger.error("the forker (%s) stopped: a new one starts with the next process", self.forker_pid)
            self._drop_forker()
            _reap_children()  # its processes that had already ended are ours now

    def _after_error(self, key: "selectors.SelectorKey") -> None:
        """Stop an event that could not be handled from coming back at once, for ever: a
        worker's connection is closed (the worker notices and tries again); one of our own
        descriptors, which every session needs, is watched again after a second."""
        if not self._still_registered(key):
            return
        if key.data == "conn":
            try:
                self._close_conn(key.fileobj)  # type: ignore[arg-type]
                return
            except Exception:
                logger.exception("the fork server could not close a control connection")
        elif key.data in ("listen", "wake", "forker"):
            self._pause(key, 1.0)
            return
        if self._still_registered(key):
            self.sel.unregister(key.fileobj)

    def _pause(self, key: "selectors.SelectorKey", seconds: float) -> None:
        self.sel.unregister(key.fileobj)
        self.paused[key.fileobj] = (key.data, time.monotonic() + seconds)

    def _resume_paused(self, now: float) -> None:
        for fileobj, (tag, until) in list(self.paused.items()):
            if until > now:
                continue
            del self.paused[fileobj]
            if isinstance(fileobj, socket.socket) and fileobj.fileno() < 0:
                continue  # closed meanwhile
            try:
                self.sel.register(fileobj, selectors.EVENT_READ, tag)
            except (KeyError, ValueError, OSError):  # watched again already, or gone
                pass

    def _still_registered(self, key: "selectors.SelectorKey") -> bool:
        try:
            return self.sel.get_key(key.fd) is key
        except (KeyError, ValueError):
            return False

    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                if self.accept_failing:
                    self.accept_failing = False
                    logger.warning("fork server %s accepts connections again", os.getpid())
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in _ACCEPT_LATER:
                    raise
                # out of descriptors or memory: the connection waits in the backlog; watching
                # the listener now would wake us at once, for ever
                if not self.accept_failing:
                    self.accept_failing = True
                    logger.error("fork server %s cannot accept a connection (%s); it tries again every 0.1 s", os.getpid(), exc)
                self._pause(self.sel.get_key(self.listener), 0.1)
                return
            conn.settimeout(5.0)
            self.conns[conn.fileno()] = wire.FrameBuffer(CONTROL_MAX_FRAME_BYTES)
            self.sockets[conn.fileno()] = conn
            self.sel.register(conn, selectors.EVENT_READ, "conn")

    def _close_conn(self, conn: socket.socket) -> None:
        fd = conn.fileno()
        if fd < 0:
            return
        self.sel.unregister(conn)
        self.conns.pop(fd, None)
        self.sockets.pop(fd, None)
        if conn in self.presence:
            self.presence.discard(conn)
            if not self.presence:
                self.idle_since = time.monotonic()
        for child in self.children.values():
            if conn in child.waiters:
                child.waiters.remove(conn)
        conn.close()

    def _on_conn(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self._close_conn(conn)
            return
        buf = self.conns[conn.fileno()]
        buf.feed(data)
        while True:
            try:
                msg = buf.next_frame()
            except ProtocolError as exc:
                logger.warning("dropping a control connection that broke the protocol: %s", exc)
                self._close_conn(conn)
                return
            if msg is None:
                return
            try:
                self._handle(conn, msg)
            except (ConnectionError, OSError, socket.timeout):
                self._close_conn(conn)
                return
            if conn.fileno() < 0:
                return

    def _reply(self, conn: socket.socket, obj: Dict[str, Any]) -> None:
        try:
            conn.sendall(wire.encode(obj, CONTROL_MAX_FRAME_BYTES))
        except (ConnectionError, OSError, socket.timeout):
            self._close_conn(conn)

    def _handle(self, conn: socket.socket, msg: Dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "hello":
            self.presence.add(conn)
            self.idle_since = None
            if isinstance(msg.get("settings"), dict):
                try:
                    self._adopt(msg["settings"])
                except Exception:  # never the loop every session's process depends on
                    logger.exception("fork server %s: could not take on a worker's settings", os.getpid())
            self._reply(conn, {"ok": True, "pid": os.getpid()})
        elif op == "spawn":
            self._spawn(conn, msg)
        elif op == "kill":
            child = self.children.get(str(msg.get("key")))
            if child is not None and (msg.get("pid") in (None, child.pid)):
                self._kill(child, signal.SIGKILL)
            self._reply(conn, {"ok": True})
        elif op == "kill_owner":
            # a session was dropped (logout, new id after a login): its processes say bye and go
            owner = msg.get("owner")
            ended = [c for c in list(self.children.values()) if owner and c.owner == owner]
            for child in ended:
                self._kill(child, signal.SIGTERM)
            self._reply(conn, {"ok": True, "ended": len(ended)})
        elif op == "preload":
            errors = {}
            for ref in msg.get("apps") or []:
                try:
                    self._app(str(ref))
                except Exception as exc:  # reported to the worker, which logs it
                    errors[str(ref)] = f"{type(exc).__name__}: {exc}"
            self._reply(conn, {"ok": not errors, "errors": errors})
        elif op == "stats":
            self._reply(
                conn,
                {
                    "ok": True,
                    "pid": os.getpid(),
                    "forker": self.forker_pid if self.forker is not None else 0,
                    "count": len(self.children),
                    "pids": sorted(c.pid for c in self.by_pidfd.values()),
                    "presence": len(self.presence),
                },
            )
        elif op == "shutdown":
            self._reply(conn, {"ok": True})
            self.stop = True
        else:
            self._reply(conn, {"ok": False, "error": "protocol", "message": f"unknown op {op!r}"})

    # settings a worker's hello may change here and now, and how each is read
    # (the attribute, the lowest and highest value taken)
    _LIVE_SETTINGS = {
        "max_processes": ("max_processes", 1, 10_000_000),
        "max_starting": ("max_starting", 0, 10_000),
        "grace_seconds": ("grace", 0.0, 86400.0 * 365),
        "start_timeout_seconds": ("start_timeout", 0.001, 86400.0 * 365),
        "full_wait_seconds": ("full_wait", 0.0, 3600.0),
        "evict_uncontacted_after": ("evict_after", -1.0, 86400.0 * 365),
    }

    def _adopt(self, settings: Dict[str, Any]) -> None:
        """Take on the settings of the worker saying hello, where they differ from ours: a
        server restarted with other settings finds this fork server still running (within
        its grace period), or workers run a new configuration. The last one heard wins.
        Those the forker and the session processes were started with (their event loop,
        scheduling and log level) stay until this fork server stops."""
        changed = []
        refused = []
        for name, (attr, lowest, highest) in self._LIVE_SETTINGS.items():
            if name not in settings:
                continue
            value = _setting(settings[name], lowest, highest, integer=name in ("max_processes", "max_starting"))
            if value is None:
                refused.append(f"{name}={settings[name]!r}")
                continue
            if name == "max_starting":
                value = int(value) or (os.cpu_count() or 1)
            if value != getattr(self, attr):
                changed.append(f"{name} {getattr(self, attr)!r} -> {value!r}")
                setattr(self, attr, value)
        if refused:
            logger.error("fork server %s: a worker brought settings out of range, ignored: %s", os.getpid(), ", ".join(refused))
        if changed:
            logger.warning("fork server %s: a worker brought other settings, now in force: %s", os.getpid(), ", ".join(changed))
            self._start_queued()
            if self.parked:
                self._retry_parked()  # a limit raised: room now, perhaps
        kept = [
            f"{name} {settings[name]!r} (still {self.started_with[name]!r})"
            for name in ("process_loop", "batch_scheduling", "log_level")
            if name in settings and name in self.started_with and settings[name] != self.started_with[name]
        ]
        if kept and kept != self._kept_warned:
            self._kept_warned = kept
            logger.warning(
                "fork server %s: a worker asks for %s; that applies once this fork server has "
                "stopped (every worker gone for its grace period) and a new one starts",
                os.getpid(),
                ", ".join(kept),
            )

    def _app(self, ref: str) -> type:
        cls = self.apps.get(ref)
        if cls is None:
            cls = load_app(ref, self.main_path)
            self.apps[ref] = cls
            path = getattr(sys.modules.get(cls.__module__), "__file__", None)
            if path and path not in self.stamps:
                self.stamps[path] = _stamp(path)
        return cls

    def _still_named(self) -> bool:
        """Whether our socket is still there under its name (one stat per new process)."""
        if self.listener is None:
            return True  # not listening yet (tests drive _spawn directly)
        try:
            return os.stat(os.path.join(self.runtime_dir, "zygote.s")).st_ino == self.sock_inode
        except OSError:
            return False

    def _code_changed(self) -> bool:
        """True if a file we imported an app from changed since: our copy is stale. A file
        whose time changed but not its content (a touch, a copy that does not keep times)
        is not a change: restarting ends every session."""
        for path, stamp in self.stamps.items():
            if stamp is None:  # could not be read when imported
                if _stamp(path) is not None:
                    return True
                continue
            try:
                st = os.stat(path)
            except OSError:
                return True
            if [st.st_mtime_ns, st.st_size] == stamp[:2]:
                continue
            now = _stamp(path)
            if now is None or now[2] != stamp[2]:
                return True
            self.stamps[path] = now
        return False

    # --- children ---------------------------------------------------------------------
    def _spawn(self, conn: socket.socket, msg: Dict[str, Any], until: Optional[float] = None) -> None:
        """Answer a ``spawn``: the live process of the key, or a new one (queued while
        ``max_starting`` start; parked while full but processes are on their way out, until
        ``until``)."""
        key = msg.get("key")
        if not isinstance(key, str) or not KEY_RE.match(key):
            self._reply(conn, {"ok": False, "error": "protocol", "message": "bad key"})
            return
        if not self._still_named():
            # Our socket is gone or another's (the runtime dir was removed: a /tmp cleaner,
            # logind emptying $XDG_RUNTIME_DIR): a process we start could not make its own
            # socket there, and no new connection reaches us. Stop, as for new code below.
            logger.error("this fork server's socket in %s is gone: it stops so a new one starts there", self.runtime_dir)
            self.stop = True
            self._retire("its runtime dir was removed")
            self._reply(conn, {"ok": False, "error": "stale", "message": "the runtime dir was removed; restarting the fork server"})
            return
        if self._code_changed():
            # The app's code changed on disk (a deploy, an edit): stop everything we run,
            # free our name and locks, and let the worker start a fresh zygote.
            logger.warning("app code changed on disk: this fork server stops so a fresh one loads it")
            self.stop = True
            self._retire("the app's code changed")
            self._reply(conn, {"ok": False, "error": "stale", "message": "app code changed; restarting the fork server"})
            return
        init = json.dumps(msg.get("init"), sort_keys=True)
        existing = self.children.get(key)
        if existing is not None and existing.init == init and not msg.get("replace"):
            if existing.ready:
                self._reply(conn, {"ok": True, "pid": existing.pid, "token": existing.token, "created": False})
            else:
                existing.waiters.append(conn)
            return
        if len(self.by_ready_fd) >= self.max_starting:
            self.queued.append((conn, msg))
            return
        # every process not yet ended counts, those told to go (a dropped session's, busy in an
        # interaction, may take until its timeout) included; not the one this would replace
        if len(self.by_pidfd) - (existing is not None) >= self.max_processes:
            # processes told to go (no longer in self.children) free their places within
            # moments, unless an interaction keeps them busy: wait for one, not refuse
            leaving = len(self.by_pidfd) - len(self.children)
            now = time.monotonic()
            if until is None:
                until = now + self.full_wait
            if leaving == 0 and now < until and self._end_one_uncontacted(now):
                leaving = 1
            if leaving > 0 and now < until:
                self.parked.append((conn, msg, until))
            else:
                # refused before the process it would replace is touched: that one lives on
                self._reply(conn, _full_reply(self.max_processes))
            return
        waiters: List[socket.socket] = []
        if existing is not None:
            waiters = existing.waiters
            existing.waiters = []
            self._kill(existing, signal.SIGKILL)
        ref = str(msg.get("app"))
        if self.forker is None or ref in self.apps:
            # Loaded here first, so that the forker (forked from us) has it: import errors
            # and code stamps. An app first asked for once the forker runs is imported by
            # the forker alone: its module-level code runs once, not once here and again there.
            try:
                self._app(ref)
            except Exception as exc:
                logger.error("cannot load app %r: %s", ref, exc)
                self._refuse([conn] + waiters, "import", f"cannot load the app: {exc}")
                return
        token = secrets.token_urlsafe(18)
        spec = {
            "key": key,
            "token": token,
            "init": msg.get("init") or [[], {}],
            "session": msg.get("session") or {},
            "opts": msg.get("opts") or {},
            "sock_path": socket_path(self.runtime_dir, key),
        }
        try:
            self._ensure_forker()  # before the pipe: the forker, forked from us, must not hold it
            ready_r, ready_w = os.pipe()
        except OSError as exc:
            # out of descriptors, memory or processes: nothing was asked of a forker, so one
            # that runs is left as it is, and the page is told the server is busy
            logger.error("cannot start a process for %s: %s", key[:8], exc)
            refusal = _refusal(exc)
            self._refuse([conn] + waiters, refusal["error"], refusal["message"])
            return
        try:
            pid, pidfd, loaded_from = self._fork(spec, ref, ready_w)
        except (OSError, ValueError, socket.timeout, ProcessStartError, FrameTooLarge) as exc:
            os.close(ready_r)
            if isinstance(exc, socket.timeout):
                exc = socket.timeout(
                    "the forker did not answer in 30 s (an app that takes that long to import?); it is replaced, "
                    "the processes it started live on"
                )
            logger.error("cannot fork a process for %s: %s", key[:8], exc)
            if not isinstance(exc, (ProcessStartError, FrameTooLarge)):
                self._drop_forker()  # the exchange with it broke off: start afresh
            if isinstance(exc, ProcessStartError) and exc.kind in ("import", "full"):
                self._refuse([conn] + waiters, exc.kind, str(exc))
            else:
                self._refuse([conn] + waiters, "crash", f"cannot start the app process: {exc}")
            return
        finally:
            os.close(ready_w)
        if loaded_from and loaded_from not in self.stamps:
            self.stamps[loaded_from] = _stamp(loaded_from)  # the forker imported it: watch it too
        child = Child(key, pid, pidfd, token, init, ready_r, time.monotonic() + self.start_timeout)
        child.timeout = float((spec["opts"] or {}).get("timeout_interaction") or 0)
        owner = msg.get("owner")
        child.owner = owner if isinstance(owner, str) and KEY_RE.match(owner) else ""
        child.waiters = [conn] + waiters
        self.children[key] = child
        self.by_pidfd[pidfd] = child
        self.by_ready_fd[ready_r] = child
        self.sel.register(pidfd, selectors.EVENT_READ, "pidfd")
        self.sel.register(ready_r, selectors.EVENT_READ, "ready")
        logger.debug("forked process %s for %s", pid, key[:8])

    def _refuse(self, conns: List[socket.socket], kind: str, message: str) -> None:
        """Answer the spawn requests on ``conns`` with an error of ``kind`` (full, import, crash)."""
        reply = {"ok": False, "error": kind, "message": message}
        for conn in conns:
            self._reply(conn, reply)

    # --- the forker -------------------------------------------------------------------
    def _fork(self, spec: Dict[str, Any], ref: str, ready_w: int) -> Tuple[int, int, Optional[str]]:
        """Have the forker fork the process of ``spec``: ``(pid, pidfd, file)``, ``file``
        the app's source when the forker had to import it first. The start-up report pipe
        (``ready_w``) travels with the request (SCM_RIGHTS); the pidfd comes back the same
        way, opened by the forker before the child could be reaped. Raises
        ProcessStartError (``kind`` "import" if the forker could not import the app)."""
        sock = self._ensure_forker()
        # the spec travels as raw JSON that only the new process decodes: the forker reads
        # the app's name and nothing else (see _forker_main)
        frame = wire.encode({"app": ref}, CONTROL_MAX_FRAME_BYTES, raw=json.dumps(spec, separators=(",", ":")).encode())
        socket.send_fds(sock, [frame[: wire.HEADER_SIZE]], [ready_w])
        sock.sendall(frame[wire.HEADER_SIZE :])
        data, fds, flags, _addr = socket.recv_fds(sock, 65536, 1)
        if not data:
            raise ConnectionError("the forker closed its connection")
        reply = json.loads(data)
        if reply.get("ok") and not fds and flags & socket.MSG_CTRUNC and isinstance(reply.get("pid"), int):
            # forked, but its pidfd did not reach us (we are out of descriptors): a process
            # we cannot watch is not kept (it is the forker's child: the forker reaps it)
            try:
                os.kill(reply["pid"], signal.SIGKILL)
            except OSError:
                pass
            if spec["key"] not in self.children:  # what it may have made under its name
                self._remove_files(spec["key"])
            raise ProcessStartError("the fork server is out of file descriptors", "full")
        if not reply.get("ok") or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            kind = reply.get("error") if reply.get("error") in ("import", "full") else "crash"
            raise ProcessStartError(str(reply.get("message") or "the forker did not fork"), kind)
        loaded_from = reply.get("file")
        return int(reply["pid"]), fds[0], loaded_from if isinstance(loaded_from, str) else None

    def _ensure_forker(self) -> socket.socket:
        if self.forker is not None:
            return self.forker
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        gc.freeze()
        try:
            pid = os.fork()
        except OSError:  # out of processes or memory: nothing started, nothing kept
            ours.close()
            theirs.close()
            raise
        if pid == 0:  # pragma: no cover - runs in the forker
            code = 1
            try:
                ours.close()
                self._forget_in_child()
                _forker_main(theirs, self.client_js, dict(self.apps), self.main_path, self.life_r)
                code = 0
            except BaseException:
                logger.exception("the forker failed")
            finally:
                os._exit(code)
        theirs.close()
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # out of descriptors: a forker we could not watch is not kept
            ours.close()  # it exits on EOF
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        ours.settimeout(30.0)
        self.forker, self.forker_pid = ours, pid
        self.forker_pidfd = pidfd
        self.sel.register(self.forker_pidfd, selectors.EVENT_READ, "forker")
        logger.debug("forker %s started", pid)
        return ours

    def _drop_forker(self) -> None:
        """Close our end (the forker exits on it), kill it and reap it."""
        if self.forker is None:
            return
        self.forker.close()
        self.forker = None
        self.paused.pop(self.forker_pidfd, None)
        try:
            self.sel.unregister(self.forker_pidfd)
        except (KeyError, ValueError):
            pass
        try:
            signal.pidfd_send_signal(self.forker_pidfd, signal.SIGKILL)
        except OSError:
            pass
        os.close(self.forker_pidfd)
        self.forker_pidfd = -1
        try:
            os.waitpid(self.forker_pid, 0)
        except ChildProcessError:
            pass

    def _forget_in_child(self) -> None:
        """In a fresh child: close (cleanly, through their Python objects) every descriptor
        of the zygote, so nothing of it leaks into the app process. Runs once per process
        (see :meth:`forget_in_every_child`); its children have nothing more to forget."""
        if self._forgotten:
            return
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        try:
            self.sel.close()
        except OSError:
            pass
        if self.listener is not None:
            self.listener.close()
        for conn in list(self.sockets.values()):
            conn.close()
        for fd in list(self.by_pidfd) + list(self.by_ready_fd) + [self.wake_r, self.wake_w, self.forker_pidfd, self.life_w]:
            try:
                os.close(fd)
            except OSError:
                pass
        for f in self.lock_files:
            f.close()
        if self.forker is not None:
            self.forker.close()
        self._forgotten = True  # only now: a call that failed half-way is made again (each close is idempotent)
        # the zygote's objects stay frozen here: a full collection in the child would touch
        # (and so copy) every page they live on

    def forget_in_every_child(self, status: Any) -> None:
        """Have every process forked from ours forget the zygote, ``status`` (the worker's
        pipe, until READY) included: not only the forker, but a helper the app's module forks
        when it is imported (``multiprocessing.Pool()``, a bare ``os.fork()``). Such a helper
        kept the life pipe's write end, so session processes outlived a killed fork server,
        and the lifetime lock, which kept a new one waiting for it."""

        def after_fork_in_child() -> None:
            try:
                self._forget_in_child()
                if not status.closed:
                    status.close()
            except Exception:  # never a reason for an app's fork to fail
                logger.debug("could not close the fork server's descriptors in a child", exc_info=True)

        os.register_at_fork(after_in_child=after_fork_in_child)

    def _remove_files(self, key: str) -> None:
        """Remove the socket and busy mark of ``key``'s process (gone, and not replaced)."""
        sock = socket_path(self.runtime_dir, key)
        for leftover in (sock, wire.busy_path(sock)):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
            except OSError as exc:  # the runtime dir's permissions changed under us
                logger.warning("cannot remove %s: %s", leftover, exc)

    def _on_ready(self, fd: int) -> None:
        child = self.by_ready_fd.get(fd)
        if child is None:
            return
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        child.buf += data
        if data and not child.buf.endswith(b"\n"):
            return
        self._drop_ready_fd(child)
        if not child.buf:
            return  # died before saying anything: the pidfd tells how
        try:
            msg = json.loads(child.buf)
        except ValueError:
            msg = {"ok": False, "error": "crash", "message": "garbled start-up report"}
        if msg.get("ok"):
            child.ready = True
            child.ready_at = time.monotonic()
            reply = {"ok": True, "pid": child.pid, "token": child.token, "created": True}
            logger.debug("process %s for %s is ready", child.pid, child.key[:8])
        else:
            reply = msg
            logger.error("process %s for %s failed to start: %s", child.pid, child.key[:8], msg.get("message"))
        self._answer_waiters(child, reply)

    def _answer_waiters(self, child: Child, reply: Dict[str, Any]) -> None:
        # taken off the child first: a reply that fails closes its connection, which
        # removes it from child.waiters, and must not make the loop skip the next one
        waiters, child.waiters = child.waiters, []
        for w in waiters:
            self._reply(w, reply)

    def _drop_ready_fd(self, child: Child) -> None:
        if child.ready_fd is not None:
            self.sel.unregister(child.ready_fd)
            self.by_ready_fd.pop(child.ready_fd, None)
            os.close(child.ready_fd)
            child.ready_fd = None
            self._start_queued()

    def _start_queued(self) -> None:
        """A child finished starting (or failed): start what waits, in arrival order."""
        while self.queued and len(self.by_ready_fd) < self.max_starting and not self.stop:
            conn, msg = self.queued.popleft()
            if conn.fileno() >= 0:  # the worker may have given up meanwhile
                self._spawn(conn, msg)

    def _end_one_uncontacted(self, now: float) -> bool:
        """End (SIGTERM) the oldest ready process whose page has not made contact within
        ``evict_after`` seconds; False if there is none."""
        if self.evict_after < 0:
            return False
        oldest: Optional[Tuple[float, Child]] = None
        for child in list(self.children.values()):
            if not child.ready or child.contacted or now - child.ready_at < self.evict_after:
                continue
            contacted, rendered = wire.read_contact(socket_path(self.runtime_dir, child.key))
            if contacted:
                child.contacted = True  # for good: contact is never taken back
                continue
            # the delay counts from the latest time its page was handed out (a reload
            # renders the same process again), never from before it was ready
            since = max(child.ready_at, rendered)
            if now - since >= self.evict_after and (oldest is None or since < oldest[0]):
                oldest = (since, child)
        if oldest is None:
            return False
        since, child = oldest
        logger.warning(
            "max_processes reached: ending process %s for %s, whose page made no contact in %.0fs",
            child.pid,
            child.key[:8],
            now - since,
        )
        self._kill(child, signal.SIGTERM)
        return True

    def _retry_parked(self) -> None:
        """A process ended: the spawns parked at max_processes try again, in arrival order
        (those still without a place park again, until their own deadline)."""
        parked, self.parked = self.parked, collections.deque()
        for conn, msg, until in parked:
            if conn.fileno() < 0:  # the worker gave up meanwhile
                continue
            if self.stop:
                self._reply(conn, _full_reply(self.max_processes))
            else:
                self._spawn(conn, msg, until)

    def _expire_parked(self, now: float) -> None:
        """Spawns parked past their deadline try once more (a limit raised meanwhile, a
        place freed): each is then started, or refused as full."""
        if not any(now >= until for _c, _m, until in self.parked):
            return
        self._retry_parked()

    def _on_exit(self, pidfd: int) -> None:
        child = self.by_pidfd.pop(pidfd, None)
        self.sel.unregister(pidfd)
        os.close(pidfd)
        _reap_children()  # a dead forker's processes come to us (we are their subreaper)
        if child is None:
            return
        self._drop_ready_fd(child)
        # The forker reaps its children (their exit status is its to see). A process that
        # died while starting, past its timeout_interaction, was ended by its own timer.
        lasted = time.monotonic() - child.started
        timed_out = not child.ready and child.timeout > 0 and lasted >= child.timeout * 0.95
        logger.info("process %s for %s ended after %.1fs%s", child.pid, child.key[:8], lasted, " (start timeout)" if timed_out else "")
        owner = self.children.get(child.key)
        if owner is child:
            del self.children[child.key]
        if owner is None or owner is child:  # (None: killed by _kill) no replacement owns the name
            self._remove_files(child.key)
        if child.waiters:
            if timed_out:
                reply = {"ok": False, "error": "timeout", "message": "the app took too long to start"}
            else:
                reply = {"ok": False, "error": "crash", "message": "the app process died while starting"}
            self._answer_waiters(child, reply)
        if self.parked:
            self._retry_parked()

    def _kill(self, child: Child, sig: int) -> None:
        if self.children.get(child.key) is child:
            del self.children[child.key]
        try:
            signal.pidfd_send_signal(child.pidfd, sig)
        except (ProcessLookupError, OSError):
            pass

    def _retire(self, reason: str) -> None:
        """Stop children, unlink our socket and release our locks, now. Every worker is told
        why on its presence connection (see :data:`wire.RETIRING`): the others find us gone
        at their next request and know it was planned."""
        notice = wire.encode({"t": wire.RETIRING, "reason": reason})
        for conn in list(self.presence):
            try:
                conn.send(notice)
            except OSError:
                pass
        self.shutdown()
        for f in self.lock_files:
            f.close()
        self.lock_files = []

    def shutdown(self) -> None:
        """Stop listening (a worker that comes now finds no one and starts a new fork
        server once our lock is free), terminate every child we started, wait a bounded
        time, then kill the rest."""
        self.stop = True  # nothing is forked from here on (see _retry_parked, _start_queued)
        self._close_listener()
        for conn, _msg, _until in self.parked:
            self._reply(conn, _full_reply(self.max_processes))
        self.parked.clear()
        pending = dict(self.by_pidfd)
        for child in pending.values():
            try:
                signal.pidfd_send_signal(child.pidfd, signal.SIGTERM)
            except (ProcessLookupError, OSError):
                pass
        deadline = time.monotonic() + 3.0
        while self.by_pidfd and time.monotonic() < deadline:
            for key, _ in self.sel.select(max(0.0, deadline - time.monotonic())):
                if key.data == "pidfd":
                    self._on_exit(key.fd)
                elif key.data == "ready":
                    self._on_ready(key.fd)
        for child in list(self.by_pidfd.values()):
            try:
                signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
            except (ProcessLookupError, OSError):
                pass
            self._on_exit(child.pidfd)
        self._drop_forker()
        logger.info("zygote %s stopped", os.getpid())

    def _close_listener(self) -> None:
        path = os.path.join(self.runtime_dir, "zygote.s")
        try:
            if self.listener is not None and os.stat(path).st_ino == self.sock_inode:
                os.unlink(path)
        except OSError:
            pass
        if self.listener is not None:
            self.paused.pop(self.listener, None)
            try:
                self.sel.unregister(self.listener)
            except (KeyError, ValueError):
                pass
            self.listener.close()
            self.listener = None


def _setting(value: Any, lowest: float, highest: float, *, integer: bool) -> Optional[float]:
    """``value`` as a finite number within [lowest, highest] (an int if ``integer``), or
    None: a worker's hello must not be able to stop the loop everyone's sessions run on."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or not lowest <= value <= highest:
        return None
    if integer:
        return int(value) if float(value).is_integer() else None
    return float(value)


def _full_reply(max_processes: int) -> Dict[str, Any]:
    """The answer to a spawn when ``max_processes`` run (the worker raises PoolFull: 503)."""
    return {"ok": False, "error": "full", "message": f"{max_processes} processes already run"}


class _LockWaitOver(Exception):
    pass


def _flock_within(f: Any, seconds: float) -> bool:
    """``flock(f, LOCK_EX)``, giving up after ``seconds``. Interrupted by SIGALRM (the
    zygote is single-threaded at this point); a real-time timer already running (none in
    the zygote) is put back afterwards with what it had left, and its handler too."""

    waiting = [True]

    def give_up(signum: int, frame: Any) -> None:
        if waiting[0]:  # not once the lock is ours (the timer may fire on the way out)
            raise _LockWaitOver()

    began = time.monotonic()
    previous = signal.signal(signal.SIGALRM, give_up)
    was_left, was_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        fcntl.flock(f, fcntl.LOCK_EX)
        waiting[0] = False
        return True
    except _LockWaitOver:
        return False  # (if it came just as the lock was taken, closing the file lets it go)
    finally:
        waiting[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if was_left > 0:
            signal.setitimer(signal.ITIMER_REAL, max(0.001, was_left - (time.monotonic() - began)), was_interval)


def _stamp(path: str) -> Any:
    """``[mtime, size, digest of the content]``; the digest is only computed (read) again
    when the time or size moved (see :meth:`Zygote._code_changed`)."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        return [st.st_mtime_ns, st.st_size, digest]
    except OSError:
        return None


try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _prctl: Any = _libc.prctl
    _madvise: Any = _libc.madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _prctl = _madvise = None
_MADV_DONTNEED = 4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def release_zero_pages(address: int, size: int, min_pages: int = 16) -> int:
    """Hand back to the kernel the longest run (at least ``min_pages``) of whole pages in
    ``[address, address + size)`` that hold only zeros: MADV_DONTNEED on private anonymous
    memory, so they read as zeros again and cost no memory until written. Returns the
    bytes released. Only for memory no other thread is writing. Used on uvloop's loop
    object: it embeds a 250 KB receive buffer that CPython zero-fills when it allocates the
    object, about 60 pages per process that hold nothing."""
    if _madvise is None or size <= 0:
        return 0
    zero = bytes(_PAGE)
    page = (address + _PAGE - 1) // _PAGE * _PAGE
    end = address + size
    best_start = best_end = run_start = 0
    while page + _PAGE <= end:
        if ctypes.string_at(page, _PAGE) == zero:
            if not run_start:
                run_start = page
            if page + _PAGE - run_start > best_end - best_start:
                best_start, best_end = run_start, page + _PAGE
        else:
            run_start = 0
        page += _PAGE
    if best_end - best_start < min_pages * _PAGE:
        return 0
    if _madvise(best_start, best_end - best_start, _MADV_DONTNEED) != 0:
        return 0
    return best_end - best_start


def _new_uvloop() -> Any:
    import uvloop

    loop = uvloop.new_event_loop()
    try:
        release_zero_pages(id(loop), type(loop).__basicsize__)
    except Exception:  # an optimisation only
        logger.debug("could not release the loop's zero pages", exc_info=True)
    return loop


def _warm_up(runtime_dir: str) -> None:
    """Run once in the zygote what every child runs (an event loop, a Unix server, an
    HRenderer, the app host answering frames: see :func:`host.warm_up`), so that lazily
    built state lives in pages the children share instead of being rebuilt, privately, in
    each of them."""
    from htag import Tag

    from . import host

    class _Warm(Tag.div):
        def init(self) -> None:
            self <= Tag.button("w", _onclick=self.bind.noop())

        def noop(self) -> None:
            session = self.session
            if session is not None:
                session["w"] = len(session)  # a click that writes the session, now and then

    _run(host.warm_up(_Warm, os.path.join(runtime_dir, f"warm.{os.getpid()}.t")))


_PROCESS_LOOP = "auto"  # set from the zygote's config: see _run
_BATCH_SCHEDULING = True  # set from the zygote's config: the forker and its children under SCHED_BATCH


def _run(coro: Any) -> None:
    """Run ``coro`` to completion on a new event loop: uvloop's when it is installed and
    the ``process_loop`` setting allows it (it relays a frame for less CPU than asyncio's
    selector loop), else asyncio's."""
    import asyncio

    asyncio.set_event_loop_policy(None)
    uvloop: Any = None
    if _PROCESS_LOOP != "asyncio":
        try:
            import uvloop
        except ImportError:
            if _PROCESS_LOOP == "uvloop":
                raise
    if uvloop is None:
        asyncio.run(coro)
    elif hasattr(asyncio, "Runner"):  # Python 3.11+
        with asyncio.Runner(loop_factory=_new_uvloop) as runner:
            runner.run(coro)
    else:

        class _Policy(uvloop.EventLoopPolicy):  # type: ignore[misc, name-defined]
            def _loop_factory(self) -> Any:
                return _new_uvloop()

        asyncio.set_event_loop_policy(_Policy())
        try:
            asyncio.run(coro)
        finally:
            asyncio.set_event_loop_policy(None)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _reap_children() -> None:
    """Reap every child that has ended: the forker's, on SIGCHLD; the fork server's, the
    processes whose forker died before it could reap them (we are their subreaper, so they
    do not go to an init that may never reap them: a container's PID 1 often does not)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# Objects that fill the free blocks of the forker's half-used pymalloc pools: see
# _fill_partial_pools. Kept for the forker's life, never touched again.
_FILLERS: List[Any] = []
_ACCEPT_LATER = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
# what makes a new process impossible for now, though nothing is broken: the page gets a 503
_OUT_OF_RESOURCES = _ACCEPT_LATER | {errno.EAGAIN}


def _mallocstats() -> str:
    """What CPython's ``sys._debugmallocstats()`` reports; empty where it reports nothing."""
    debug_stats = getattr(sys, "_debugmallocstats", None)
    if debug_stats is None:
        return ""
    fd = os.memfd_create("mallocstats")
    try:
        saved = os.dup(2)
        try:
            os.dup2(fd, 2)  # it writes to the C stderr
            debug_stats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        os.lseek(fd, 0, os.SEEK_SET)
        text = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            text += chunk
    finally:
        os.close(fd)
    return text.decode("ascii", "replace")


def _partial_pool_blocks() -> List[Tuple[int, int]]:
    """``(block size, free blocks)`` of the pymalloc pools in use, per size class."""
    found: List[Tuple[int, int]] = []
    for line in _mallocstats().splitlines():
        parts = line.split()  # "class size num_pools blocks_in_use avail_blocks"
        if len(parts) == 5 and all(p.isdigit() for p in parts):
            found.append((int(parts[1]), int(parts[4])))
        elif found:
            break  # the end of that table
    return found


_FREE_LIST_LINE = re.compile(r"^\s*(\d+) free (?:\d+-sized )?Py\w+Objects", re.M)


def _free_list_objects() -> int:
    """How many objects wait in CPython's free lists (dicts, lists, floats, tuples...)."""
    return sum(int(m.group(1)) for m in _FREE_LIST_LINE.finditer(_mallocstats()))


def _prepare_heap_for_forks() -> None:
    """Run once in the forker, before its first fork: empty the free lists, then fill the
    half-used pools (:func:`_fill_partial_pools`).

    The free lists come from the zygote's imports and warm-up (2,000 tuples of a size, 80
    dicts...), spread over many pages. A session process's first full collection clears
    them (CPython does at every full collection), and freeing each one writes to its page:
    a copy of each. Emptied here, the forker pays that once, for all its children: 4.15-4.22
    -> 3.90-3.95 MB per session process after 502 clicks (10 sessions, two rounds)."""
    gc.collect()  # a full collection clears the free lists; the forker's heap is frozen, so it scans little
    try:
        _fill_partial_pools()
    except Exception:  # an optimisation only
        logger.debug("could not fill the forker's pools", exc_info=True)


def _fill_partial_pools() -> None:
    """Take every free block of the forker's half-used pymalloc pools. After a fork those
    pools are shared, and the child's first objects of each size would go into them,
    copying the parent's pages (and the parent's objects in them) for a few bytes each;
    with them full, a child's objects go to pools of its own, packed together. About
    0.08 MB less per session process (10 sessions, 1,700 clicks each)."""
    wants = [(size, n) for size, n in _partial_pool_blocks() if n > 0]
    keep: List[Any] = [None] * sum(n + 100 for _, n in wants)  # one allocation, sized ahead
    i = 0
    for size, n in wants:
        if 16 < size <= 32:
            n += 100  # floats come from a free list of up to 100 first
        for _ in range(n):
            if size <= 16:
                keep[i] = object()  # 16 bytes
            elif size <= 32:
                keep[i] = float(i) + 0.5  # 24 bytes
            else:
                keep[i] = bytes(size - 33)  # a bytes object is 33 bytes + its length
            i += 1
    _FILLERS.append(keep)


def _forker_main(
    sock: socket.socket, client_js: str, apps: Dict[str, type], main_path: Optional[str], life_fd: int = -1
) -> None:  # pragma: no cover
    """Body of the forker: read a request, fork, send back the pid and a pidfd; nothing
    else, so that it writes as few pages as possible between two forks."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the zygote's end is ours
    if os.getppid() == 1:
        return  # the zygote died before the line above
    if _BATCH_SCHEDULING:
        # inherited by every process forked from here: session processes do not preempt
        # each other on every click
        use_batch_scheduling("the session processes")
    signal.signal(signal.SIGCHLD, lambda signum, frame: _reap_children())
    sock.settimeout(None)
    chld = {signal.SIGCHLD}
    _prepare_heap_for_forks()
    while True:
        try:
            head, fds, flags, _addr = socket.recv_fds(sock, 4, 1)
            if not head:
                return
            head += _recv_exactly(sock, wire.HEADER_SIZE - len(head))
            length = wire.decode_length(head, CONTROL_MAX_FRAME_BYTES)
            request, raw_spec = wire.split_payload(_recv_exactly(sock, length))
        except (EOFError, OSError, ProtocolError):
            return
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            if flags & socket.MSG_CTRUNC:  # the pipe was sent, but we are out of descriptors
                sock.sendall(_fork_failed(OSError(errno.EMFILE, os.strerror(errno.EMFILE))))
            else:
                socket.send_fds(sock, [b'{"ok": false, "message": "no start-up pipe"}'], [])
            continue
        ready_w = fds[0]
        ref = str(request.get("app"))
        loaded_from: Optional[str] = None
        try:
            cls = apps.get(ref)
            if cls is None:
                cls = apps[ref] = load_app(ref, main_path)
                loaded_from = getattr(sys.modules.get(cls.__module__), "__file__", None)
        except Exception as exc:
            os.close(ready_w)
            sock.sendall(json.dumps({"ok": False, "error": "import", "message": f"cannot load the app: {exc}"}).encode())
            continue
        # SIGCHLD waits until the pidfd is open: the child cannot be reaped before it is.
        signal.pthread_sigmask(signal.SIG_BLOCK, chld)
        gc.freeze()
        try:
            pid = os.fork()
        except OSError as exc:  # out of processes or memory: this one is refused, we go on
            signal.pthread_sigmask(signal.SIG_UNBLOCK, chld)
            os.close(ready_w)
            sock.sendall(_fork_failed(exc))
            continue
        if pid == 0:
            code = 1
            try:
                sock.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, chld)
                _child_main(json.loads(raw_spec or b"null"), cls, client_js, ready_w, life_fd)
                code = 0
            except BaseException as exc:
                try:
                    from .host import AppInitError

                    # the app's own failure: its text (htag logged its traceback), not ours
                    text = str(exc) if isinstance(exc, AppInitError) else traceback.format_exc(limit=20)
                    err = {"ok": False, "error": "crash", "message": text}
                    os.write(ready_w, (json.dumps(err) + "\n").encode())
                except OSError:
                    pass
            finally:
                os._exit(code)
        os.close(ready_w)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:  # out of descriptors: a process that cannot be handed over is not kept
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            sock.sendall(_fork_failed(exc))
            continue
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, chld)
        try:
            reply = b'{"ok":true,"pid":%d,"file":%s}' % (pid, b"null" if loaded_from is None else json.dumps(loaded_from).encode())
            socket.send_fds(sock, [reply], [pidfd])
        except OSError:
            return
        finally:
            os.close(pidfd)


def _refusal(exc: OSError) -> Dict[str, Any]:
    """The answer to a spawn that ``exc`` made impossible: ``full`` when the host is out of
    processes, memory or descriptors (the page gets a 503, as on a full host), else ``crash``."""
    if exc.errno in _OUT_OF_RESOURCES:
        return {"ok": False, "error": "full", "message": f"the server is out of resources ({exc.strerror})"}
    return {"ok": False, "error": "crash", "message": f"cannot start the app process: {exc}"}


def _fork_failed(exc: OSError) -> bytes:
    """The forker's answer when it could not fork (or hand over) a process."""
    return json.dumps(_refusal(exc)).encode()


def _child_main(spec: Dict[str, Any], cls: type, client_js: str, ready_fd: int, life_fd: int = -1) -> None:  # pragma: no cover
    """Body of a forked per-session process. ``life_fd``: the read end of the fork
    server's life pipe (see :class:`Zygote`)."""
    from .host import serve

    gc.enable()
    _run(serve(spec, cls, client_js, ready_fd, life_fd))


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s asgi_htag[%(process)d] %(levelname)s %(name)s: %(message)s"))
    for name in ("asgi_htag", "htag"):
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        lg.propagate = False
    logging.getLogger("asgi_htag").setLevel(level)
    logging.getLogger("htag").setLevel(max(logging.WARNING, logging.getLevelName(level) if isinstance(logging.getLevelName(level), int) else logging.WARNING))


def _say(status: io.TextIOWrapper, line: str) -> None:
    status.write(line + "\n")
    status.flush()


def main(argv: List[str]) -> int:
    cfg = json.loads(argv[1])
    # The worker reads our first line (READY/EXISTS) from stdout. It gets a descriptor of
    # its own, and stdout goes to stderr from here on: an app module or a library that
    # prints while it is imported lands in the server's log, never before that line.
    sys.stdout.flush()
    status = io.TextIOWrapper(io.FileIO(os.dup(1), "w"), encoding="utf-8")
    os.dup2(2, 1)
    # Detach: the intermediate exits at once (the worker waits for it), so the zygote is
    # nobody's child and a worker's death or exit never touches it.
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if _prctl is not None:
        # the forker's processes come to us, to be reaped, if the forker dies before them
        _prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    gc.disable()  # see Zygote._spawn: the zygote's heap stays dense and shared
    _configure_logging(cfg.get("log_level", "WARNING"))
    global _PROCESS_LOOP, _BATCH_SCHEDULING
    _PROCESS_LOOP = cfg.get("process_loop") or "auto"
    _BATCH_SCHEDULING = bool(cfg.get("batch_scheduling", True))
    for p in reversed(cfg.get("sys_path") or []):
        if p not in sys.path:
            sys.path.insert(0, p)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    zygote = Zygote(cfg)
    if not zygote.acquire():
        _say(status, "EXISTS")
        return 0
    zygote.forget_in_every_child(status)  # before any app's module runs here
    # preload what every child needs, once
    import asyncio  # noqa: F401
    import htag.render  # noqa: F401

    from . import host

    host.install_offer_recorder()
    from importlib import resources

    zygote.client_js = resources.files("asgi_htag").joinpath("static/client.js").read_text("utf-8")
    for ref in cfg.get("apps") or []:
        try:
            zygote._app(ref)
        except Exception:
            logger.exception("cannot preload app %r", ref)
    try:
        _warm_up(zygote.runtime_dir)
    except Exception:  # an optimisation only: never a reason not to start
        logger.exception("warm-up failed")
    zygote.listen()
    _say(status, f"READY {os.getpid()}")
    status.close()  # the worker's pipe ends here: no child of ours holds it
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    try:
        zygote.run()
    except BaseException:
        logger.exception("zygote crashed")
        zygote.shutdown()
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
