"""Server-side sessions: a signed random id in a cookie, the data in a store.

The browser only ever holds ``<sid>.<signature>``; the data lives in a :class:`SessionStore`
shared by every worker of a host (:class:`SQLiteStore` by default). A cookie that is
malformed, badly signed, or names a session the store does not know quietly gives a fresh,
empty session, and a session id is always one the server generated.

:class:`SessionMiddleware` is plain ASGI and puts a :class:`Session` at ``scope["session"]``,
which is where Starlette's ``request.session`` and authlib look for it. This module must not
import Starlette.
"""
import base64
import functools
import hashlib
import hmac
import inspect
import json
import logging
import os
import re
import secrets
import sqlite3
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, Iterable, Iterator, List, Mapping, MutableMapping, Optional, Set, Tuple, Union

import anyio
import anyio.to_thread

from ._types import ASGIApp, Message, Receive, Scope, Send
from .config import PathLike, Secret, ensure_private_dir
from .exceptions import ConfigurationError, StoreUnavailable

logger = logging.getLogger(__name__)

DEFAULT_MAX_AGE_SECONDS = 14 * 24 * 3600
DEFAULT_COOKIE_NAME = "asgi_htag_session"
MAX_COOKIE_BYTES = 200

# Separates these HMACs from any other use of the same secret elsewhere in the package.
_SIGN_CONTEXT = b"asgi_htag.session.v1:"
_SID_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")
_SIG_RE = re.compile(r"[A-Za-z0-9_-]{43}")
_COOKIE_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_COOKIE_PATH_RE = re.compile(r"/[\x21-\x3a\x3c-\x7e]*")  # visible ASCII except ';'
_SAME_SITE = {"lax": "Lax", "strict": "Strict", "none": "None"}
# A client may send our cookie several times (other paths, stale copies, or copies planted
# from a sibling domain to hide the real one): up to this many are signature-checked (an
# HMAC each), and only the few whose signature holds are looked up in the store.
_MAX_COOKIE_VALUES = 64
_MAX_COOKIE_CANDIDATES = 4
# expired ids a store keeps for take_expired between two sweeps (older ones are forgotten)
_MAX_PENDING_EXPIRED = 10000
_MAX_REPORTED_DEAD = 1024
_MAX_REFRESHED = 10_000  # session ids whose cookie this worker refreshed lately (an LRU)
# How long a session lives before its browser first comes back with its cookie (then:
# the store's max_age). A client that keeps no cookie (a crawler, a script) starts a new
# session with every request; each would otherwise stay stored for max_age (14 days).
NEW_SESSION_SECONDS = 3600.0

_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _monotonic() -> float:
    """When the next sweep of expired sessions is due (a function, so tests can move it)."""
    return time.monotonic()


def _now() -> float:
    """Wall-clock time; expiries are shared between processes, so not monotonic."""
    return time.time()


def _dump_value(key: str, value: Any) -> str:
    try:
        return _dumps(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"session value for key {key!r} is not JSON-serializable "
            f"({type(value).__name__}): {exc}; store only dicts, lists, str, int, float, bool or None"
        ) from exc


def _check_key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"session keys must be str, not {type(key).__name__}")
    return key


def _encode_changes(changed: Mapping[str, Any], deleted: Iterable[str]) -> Tuple[Dict[str, str], List[str]]:
    """Validate a diff and serialize its values, so errors name the key and stores never alias."""
    encoded = {_check_key(k): _dump_value(k, v) for k, v in changed.items()}
    return encoded, [_check_key(k) for k in deleted]


def _decode_data(text: str) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _check_max_age(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"max_age_seconds must be a positive number of seconds, got {value!r}")
    return float(value)


class SessionStore(ABC):
    """Where session data lives. Every value is JSON: stores hand out fresh copies."""

    @abstractmethod
    async def load(self, sid: str) -> Optional[Dict[str, Any]]:
        """The data of session ``sid``, or None if it is unknown or expired."""

    @abstractmethod
    async def apply(
        self, sid: str, changed: Dict[str, Any], deleted: Iterable[str], *, lifetime: Optional[float] = None
    ) -> Dict[str, Any]:
        """Set the ``changed`` keys and remove the ``deleted`` ones in one atomic
        read-modify-write, so two writers of different keys both win. Creates the session
        if needed and refreshes its expiry: ``lifetime`` seconds from now (at most the
        store's ``max_age_seconds``, which None means). The middleware gives a shorter one
        to a session whose browser has not come back yet (see :data:`NEW_SESSION_SECONDS`);
        :meth:`touch` then gives it the full one.

        Returns:
            The full data of the session after the change.

        Raises:
            TypeError: a key is not a str or a value is not JSON-serializable.
        """

    async def apply_existing(self, sid: str, changed: Dict[str, Any], deleted: Iterable[str]) -> Optional[Dict[str, Any]]:
        """:meth:`apply` to a session that exists (not expired); a session deleted (a logout)
        or expired is left alone and None returned. What the app processes write goes
        through here: a page left open after a logout must not bring its session back.

        This default reads, then applies: a store that can do both in one step overrides it
        (the ones in asgi_htag do).
        """
        if await self.load(sid) is None:
            return None
        return await self.apply(sid, changed, deleted)

    @abstractmethod
    async def touch(self, sid: str) -> None:
        """Push back the expiry of an existing session (may skip if done recently)."""

    @abstractmethod
    async def delete(self, sid: str) -> None:
        """Forget session ``sid``; unknown ids are ignored."""

    @abstractmethod
    async def close(self) -> None:
        """Release the store's resources."""

    async def take_expired(self, limit: int = 256) -> List[str]:
        """Remove up to ``limit`` sessions that have expired and return their ids, each id
        to one caller only, so that what was attached to them (their processes) can be ended.

        This default returns ``[]``: a store whose entries vanish by themselves (Redis keys
        with a TTL) cannot tell which did. The stores in asgi_htag's core implement it.
        """
        return []

    def version(self) -> Optional[Any]:
        """A cheap token that changes whenever any session of this store may have changed,
        as seen from this process; None when the store cannot tell cheaply. A long-lived
        connection (a websocket) re-reads its session only when the token moved."""
        return None


class MemoryStore(SessionStore):
    """A store in a dict of this process, for tests and single-process experiments."""

    def __init__(self, *, max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS) -> None:
        """
        Raises:
            ConfigurationError: ``max_age_seconds`` is not a positive number.
        """
        self.max_age_seconds = _check_max_age(max_age_seconds)
        self._rows: Dict[str, Tuple[str, float]] = {}
        self._version = 0
        # ids of expired rows dropped on the way (a load after expiry), for take_expired
        self._expired: "deque[str]" = deque(maxlen=_MAX_PENDING_EXPIRED)

    def version(self) -> Optional[Any]:
        """See :meth:`SessionStore.version`: a counter of this store's writes."""
        return self._version

    def _live(self, sid: str) -> Optional[Dict[str, Any]]:
        row = self._rows.get(sid)
        if row is None:
            return None
        if row[1] <= _now():
            del self._rows[sid]
            self._expired.append(sid)
            return None
        return _decode_data(row[0])

    async def take_expired(self, limit: int = 256) -> List[str]:
        """See :meth:`SessionStore.take_expired`."""
        if limit <= 0:
            return []
        now = _now()
        for sid in [sid for sid, (_, expires) in self._rows.items() if expires <= now]:
            del self._rows[sid]
            self._expired.append(sid)
        return [self._expired.popleft() for _ in range(min(limit, len(self._expired)))]

    async def load(self, sid: str) -> Optional[Dict[str, Any]]:
        """See :meth:`SessionStore.load`."""
        return self._live(sid)

    async def apply(
        self, sid: str, changed: Dict[str, Any], deleted: Iterable[str], *, lifetime: Optional[float] = None
    ) -> Dict[str, Any]:
        """See :meth:`SessionStore.apply`."""
        return self._apply(sid, changed, deleted, True, lifetime)  # type: ignore[return-value]

    async def apply_existing(self, sid: str, changed: Dict[str, Any], deleted: Iterable[str]) -> Optional[Dict[str, Any]]:
        """See :meth:`SessionStore.apply_existing`."""
        return self._apply(sid, changed, deleted, False)

    def _apply(
        self, sid: str, changed: Dict[str, Any], deleted: Iterable[str], create: bool, lifetime: Optional[float] = None
    ) -> Optional[Dict[str, Any]]:
        encoded, removed = _encode_changes(changed, deleted)
        # No await between read and write: atomic within the event loop.
        data = self._live(sid)
        if data is None and not create:
            return None
        data = data or {}
        for key, text in encoded.items():
            data[key] = json.loads(text)
        for key in removed:
            data.pop(key, None)
        text = _dumps(data)
        self._rows[sid] = (text, _now() + _lifetime(lifetime, self.max_age_seconds))
        self._version += 1
        return json.loads(text)

    async def touch(self, sid: str) -> None:
        """See :meth:`SessionStore.touch`."""
        if self._live(sid) is not None:
            self._rows[sid] = (self._rows[sid][0], _now() + self.max_age_seconds)

    async def delete(self, sid: str) -> None:
        """See :meth:`SessionStore.delete`."""
        self._rows.pop(sid, None)
        self._version += 1

    async def close(self) -> None:
        """Nothing to release; the data stays readable."""

    def __repr__(self) -> str:
        return f"MemoryStore(sessions={len(self._rows)})"


class SQLiteStore(SessionStore):
    """Sessions in one SQLite file (WAL mode), shared by every process of a host.

    Each process opens its own connections lazily and reopens them after a fork. Loads are
    a primary-key SELECT run inline on a reader connection; writes run in a worker thread
    inside ``BEGIN IMMEDIATE``, so concurrent processes serialize and a key-level merge is
    never lost. Expired rows are ignored on load and purged every so many writes.
    """

    _PURGE_EVERY_WRITES = 128
    _MAX_REMEMBERED_EXPIRIES = 10000
    _IDENTITY_CHECK_SECONDS = 5.0

    def __init__(self, path: PathLike, *, max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS) -> None:
        """
        Args:
            path: the database file; its directory is created private (0700), the file 0600.
            max_age_seconds: how long a session lives after its last write or touch.

        Raises:
            ConfigurationError: ``max_age_seconds`` is not a positive number.
        """
        self.path = Path(path)
        self.max_age_seconds = _check_max_age(max_age_seconds)
        # touch() writes at most this often per session and process.
        self._touch_interval = min(self.max_age_seconds / 20, 600.0)
        self._pid = os.getpid()
        self._reader: Optional[sqlite3.Connection] = None
        self._writer: Optional[sqlite3.Connection] = None
        self._open_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._writes = 0
        self._expires: Dict[str, float] = {}
        # ids of expired rows the periodic purge removed, for take_expired
        self._expired: "deque[str]" = deque(maxlen=_MAX_PENDING_EXPIRED)
        # Connections inherited through fork() belong to the parent: closing them here could
        # disturb its locks, so they are kept referenced and never touched again.
        self._inherited: List[sqlite3.Connection] = []
        # writers of a database file replaced under us, closed by the next write (in the
        # write thread, so never under a write still running on them)
        self._retired: List[sqlite3.Connection] = []
        self._write_limiter: Optional["anyio.CapacityLimiter"] = None
        self._write_limiter_pid = 0
        self._identity: Optional[Tuple[int, int]] = None  # (device, inode) of the file opened
        self._next_identity_check = 0.0

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r}, max_age_seconds={self.max_age_seconds})"

    def _limiter(self) -> "anyio.CapacityLimiter":
        # Writes serialize on SQLite's lock anyway: one thread for them, not one per
        # request waiting on that lock (a burst of new sessions must not fill the pool).
        if self._write_limiter is None or self._write_limiter_pid != os.getpid():
            self._write_limiter = anyio.CapacityLimiter(1)
            self._write_limiter_pid = os.getpid()
        return self._write_limiter

    def _check_pid(self) -> None:
        pid = os.getpid()
        if pid == self._pid:
            return
        logger.debug("session store: fork detected (pid %s -> %s), reopening", self._pid, pid)
        self._inherited.extend(c for c in (self._reader, self._writer) if c is not None)
        self._reader = self._writer = None
        # A lock held by a parent thread at fork time would stay held forever in the child.
        self._open_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._expires = {}
        self._pid = pid

    async def _ready(self) -> sqlite3.Connection:
        """Open the connections if needed; the reader, for an inline read."""
        self._check_pid()
        if self._reader is not None and _monotonic() >= self._next_identity_check:
            self._check_identity()
        reader = self._reader
        if reader is None or self._writer is None:
            reader = (await anyio.to_thread.run_sync(self._open_sync))[1]
        return reader

    def _check_identity(self) -> None:
        """Every few seconds: is the file under our path still the one we have open? One
        removed or replaced (a restored backup moved into place, a state dir deleted) would
        otherwise split the workers for good: those started since use the new file, we the
        old one, and a session known to one is unknown (so expired) to the other."""
        self._next_identity_check = _monotonic() + self._IDENTITY_CHECK_SECONDS
        try:
            st = os.stat(self.path)
            now: Optional[Tuple[int, int]] = (st.st_dev, st.st_ino)
        except OSError:
            now = None
        if now == self._identity:
            return
        logger.error(
            "the session database %s was %s while open: opening the one there now (sessions kept only in the old one are gone)",
            self.path,
            "removed" if now is None else "replaced",
        )
        reader, writer = self._reader, self._writer
        self._reader = self._writer = None
        self._expires = {}
        if writer is not None:
            self._retired.append(writer)  # a write thread may be inside it right now
        if reader is not None:
            with self._read_lock:  # reads run inline, on this thread
                reader.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), timeout=5.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _open_sync(self) -> Tuple[sqlite3.Connection, sqlite3.Connection]:
        """(writer, reader), opened if they are not."""
        with self._open_lock:
            if self._reader is not None and self._writer is not None:
                return self._writer, self._reader
            try:
                ensure_private_dir(self.path.parent)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    if os.fstat(fd).st_mode & 0o077:
                        os.fchmod(fd, 0o600)
                finally:
                    os.close(fd)
                writer = self._connect()
                try:
                    writer.execute("PRAGMA journal_mode = WAL")
                    writer.execute(
                        "CREATE TABLE IF NOT EXISTS sessions "
                        "(sid TEXT PRIMARY KEY, data TEXT NOT NULL, expires REAL NOT NULL)"
                    )
                    writer.execute("CREATE INDEX IF NOT EXISTS sessions_expires ON sessions (expires)")
                    reader = self._connect()
                except BaseException:
                    writer.close()
                    raise
            except (OSError, sqlite3.Error, ConfigurationError) as exc:  # the latter: its directory's checks
                raise StoreUnavailable(f"cannot open the session store {self.path}: {exc}") from exc
            st = os.stat(self.path)
            self._identity = (st.st_dev, st.st_ino)
            self._next_identity_check = _monotonic() + self._IDENTITY_CHECK_SECONDS
            self._writer, self._reader = writer, reader
            logger.debug("session store %s opened in pid %s", self.path, self._pid)
            return writer, reader

    def _writer_sync(self) -> sqlite3.Connection:
        """In the write thread: the writer, opened again if the database file was replaced
        since this write was queued."""
        if self._retired:
            with self._write_lock:
                while self._retired:
                    self._retired.pop().close()
        conn = self._writer
        return conn if conn is not None else self._open_sync()[0]

    def _remember(self, sid: str, expires: float) -> None:
        if len(self._expires) >= self._MAX_REMEMBERED_EXPIRIES:
            self._expires.clear()
        self._expires[sid] = expires

    def version(self) -> Optional[Any]:
        """See :meth:`SessionStore.version`: SQLite's ``data_version``, which moves when any
        other connection (any process, or this store's own writer) commits."""
        if self._reader is None or os.getpid() != self._pid:
            return None
        with self._read_lock:
            return self._reader.execute("PRAGMA data_version").fetchone()[0]

    async def load(self, sid: str) -> Optional[Dict[str, Any]]:
        """See :meth:`SessionStore.load`. Runs inline: WAL readers do not wait for writers."""
        if not isinstance(sid, str):
            return None
        reader = await self._ready()
        with self._read_lock:
            row = reader.execute("SELECT data, expires FROM sessions WHERE sid = ?", (sid,)).fetchone()
        if row is None or row[1] <= _now():
            return None
        data = _decode_data(row[0])
        if data is None:
            logger.warning("session store: unreadable row for sid %s..., ignored", sid[:6])
            return None
        self._remember(sid, row[1])
        return data

    def _apply_sync(
        self, sid: str, encoded: Dict[str, str], deleted: List[str], create: bool = True, lifetime: Optional[float] = None
    ) -> Optional[Dict[str, Any]]:
        conn = self._writer_sync()
        with self._write_lock:
            now = _now()
            try:
                conn.execute("BEGIN IMMEDIATE")
                row = conn.execute("SELECT data, expires FROM sessions WHERE sid = ?", (sid,)).fetchone()
                data = _decode_data(row[0]) if row is not None and row[1] > now else None
                if data is None and not create:
                    conn.execute("ROLLBACK")
                    return None
                data = data or {}
                for key, text in encoded.items():
                    data[key] = json.loads(text)
                for key in deleted:
                    data.pop(key, None)
                expires = now + _lifetime(lifetime, self.max_age_seconds)
                conn.execute(
                    "INSERT OR REPLACE INTO sessions (sid, data, expires) VALUES (?, ?, ?)",
                    (sid, _dumps(data), expires),
                )
                purged: List[str] = []
                if self._writes % self._PURGE_EVERY_WRITES == 0:
                    purged = self._take_expired_in(conn, now, _MAX_PENDING_EXPIRED)
                self._writes += 1
                conn.execute("COMMIT")
                if purged:
                    self._expired.extend(purged)
                    logger.debug("session store: purged %s expired sessions", len(purged))
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self._remember(sid, expires)
        return data

    async def apply(
        self, sid: str, changed: Dict[str, Any], deleted: Iterable[str], *, lifetime: Optional[float] = None
    ) -> Dict[str, Any]:
        """See :meth:`SessionStore.apply`. Runs in a worker thread."""
        encoded, removed = _encode_changes(changed, deleted)
        await self._ready()
        return await anyio.to_thread.run_sync(  # type: ignore[return-value]
            self._apply_sync, sid, encoded, removed, True, lifetime, limiter=self._limiter()
        )

    async def apply_existing(self, sid: str, changed: Dict[str, Any], deleted: Iterable[str]) -> Optional[Dict[str, Any]]:
        """See :meth:`SessionStore.apply_existing`: one transaction. Runs in a worker thread."""
        encoded, removed = _encode_changes(changed, deleted)
        await self._ready()
        return await anyio.to_thread.run_sync(self._apply_sync, sid, encoded, removed, False, limiter=self._limiter())

    def _touch_sync(self, sid: str) -> None:
        conn = self._writer_sync()
        with self._write_lock:
            now = _now()
            expires = now + self.max_age_seconds
            # Never revive a session that has already expired.
            cursor = conn.execute(
                "UPDATE sessions SET expires = ? WHERE sid = ? AND expires > ?", (expires, sid, now)
            )
            if cursor.rowcount:
                self._remember(sid, expires)

    async def touch(self, sid: str) -> None:
        """See :meth:`SessionStore.touch`. Skipped if this process refreshed ``sid`` recently."""
        self._check_pid()
        known = self._expires.get(sid)
        if known is not None and known - _now() > self.max_age_seconds - self._touch_interval:
            return
        await self._ready()
        await anyio.to_thread.run_sync(self._touch_sync, sid, limiter=self._limiter())

    def _delete_sync(self, sid: str) -> None:
        conn = self._writer_sync()
        with self._write_lock:
            conn.execute("DELETE FROM sessions WHERE sid = ?", (sid,))
            self._expires.pop(sid, None)

    @staticmethod
    def _take_expired_in(conn: sqlite3.Connection, now: float, limit: int) -> List[str]:
        """Inside a write transaction: delete up to ``limit`` expired rows, return their ids."""
        sids = [row[0] for row in conn.execute("SELECT sid FROM sessions WHERE expires <= ? LIMIT ?", (now, limit))]
        for i in range(0, len(sids), 500):  # under SQLite's limit of variables per statement
            chunk = sids[i : i + 500]
            conn.execute(f"DELETE FROM sessions WHERE sid IN ({','.join('?' * len(chunk))})", chunk)
        return sids

    def _take_expired_sync(self, limit: int) -> List[str]:
        conn = self._writer_sync()
        with self._write_lock:
            fresh: List[str] = []
            if len(self._expired) < limit:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    fresh = self._take_expired_in(conn, _now(), limit - len(self._expired))
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            taken = [self._expired.popleft() for _ in range(min(limit, len(self._expired)))] + fresh
            for sid in taken:
                self._expires.pop(sid, None)
            return taken

    async def take_expired(self, limit: int = 256) -> List[str]:
        """See :meth:`SessionStore.take_expired`: one transaction, in a worker thread, so
        that of several processes sweeping at once each expired id goes to one of them."""
        if limit <= 0:  # (SQLite reads a negative LIMIT as none)
            return []
        await self._ready()
        return await anyio.to_thread.run_sync(self._take_expired_sync, limit, limiter=self._limiter())

    async def delete(self, sid: str) -> None:
        """See :meth:`SessionStore.delete`. Runs in a worker thread."""
        await self._ready()
        await anyio.to_thread.run_sync(self._delete_sync, sid, limiter=self._limiter())

    def _close_sync(self) -> None:
        with self._write_lock:
            while self._retired:
                self._retired.pop().close()
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    async def close(self) -> None:
        """Close this process's connections; the store reopens them if used again."""
        self._check_pid()
        if self._reader is None and self._writer is None:
            return
        await anyio.to_thread.run_sync(self._close_sync)


@functools.lru_cache(maxsize=64)
def _store_takes_lifetime(store_type: type) -> bool:
    try:
        params = inspect.signature(store_type.apply).parameters
    except (TypeError, ValueError):
        return False
    return "lifetime" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _takes_lifetime(store: "SessionStore") -> bool:
    """Whether ``store.apply`` takes ``lifetime`` (a store written before it did: its new
    sessions get the store's full lifetime, as they used to)."""
    return _store_takes_lifetime(type(store))


def cookie_refresh_seconds(max_age_seconds: float) -> float:
    """How often :class:`SessionMiddleware` sets the cookie of a session in use again: a
    twentieth of its ``Max-Age``, 1 s to a day."""
    return max(1.0, min(86400.0, max_age_seconds / 20))


def _lifetime(lifetime: Optional[float], max_age: float) -> float:
    return max_age if lifetime is None else max(0.0, min(float(lifetime), max_age))


def default_store(state_dir: PathLike) -> SQLiteStore:
    """The default store: ``<state_dir>/sessions.sqlite3``."""
    return SQLiteStore(Path(state_dir) / "sessions.sqlite3")


class Session(MutableMapping[str, Any]):
    """The mapping at ``scope["session"]``: JSON values, tracked key by key.

    Changes are found by comparing each value's JSON with what was loaded, so mutating a
    nested list in place counts. ``sid`` is None until the session is stored; ``is_new``
    means the browser does not have the cookie for ``sid`` yet.
    """

    def __init__(
        self,
        store: SessionStore,
        *,
        sid: Optional[str] = None,
        data: Optional[Mapping[str, Any]] = None,
        is_new: bool = False,
    ) -> None:
        """
        Args:
            store: where :meth:`commit` writes.
            sid: the id of a stored session, or None.
            data: the stored data of ``sid`` (becomes the baseline for change tracking).
            is_new: ``sid`` was just created and must be written and sent to the browser.
        """
        self.store = store
        self.sid = sid
        self.is_new = is_new
        self.accessed = False
        self._data: Dict[str, Any] = {}
        self._baseline: Dict[str, str] = {}
        self._needs_create = is_new and sid is not None
        self._doomed: List[str] = []
        self.cleared = False  # clear() was called: an empty session is then dropped, not kept
        self.emptied = False  # a key was deleted: if none is left in the store either, it is dropped
        if data:
            self._data = {_check_key(k): v for k, v in data.items()}
            self._baseline = {k: _dump_value(k, v) for k, v in self._data.items()}

    def __getitem__(self, key: str) -> Any:
        self.accessed = True
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.accessed = True
        self._data[_check_key(key)] = value

    def __delitem__(self, key: str) -> None:
        self.accessed = True
        del self._data[key]
        self.emptied = True

    def __iter__(self) -> Iterator[str]:
        self.accessed = True
        return iter(self._data)

    def __len__(self) -> int:
        self.accessed = True
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        self.accessed = True
        return key in self._data

    def clear(self) -> None:
        """Remove every key; if the session is still empty when the response starts, the
        middleware drops its row and expires its cookie (a logout). Deleting the keys one by
        one does the same, unless someone else wrote to the session meanwhile (a request
        that pops a one-shot message must not drop what others just wrote)."""
        self.accessed = True
        self.cleared = True
        self._data.clear()

    def __repr__(self) -> str:
        sid = f"{self.sid[:6]}..." if self.sid else None
        return f"<Session sid={sid!r} keys={len(self._data)} is_new={self.is_new}>"

    def changes(self) -> Tuple[Dict[str, Any], List[str]]:
        """The pending diff against the stored data: ``(changed, deleted)``.

        Raises:
            TypeError: a value is not JSON-serializable (the message names its key).
        """
        changed = {k: v for k, v in self._data.items() if self._baseline.get(k) != _dump_value(k, v)}
        deleted = [k for k in self._baseline if k not in self._data]
        return changed, deleted

    def changed_keys(self) -> Set[str]:
        """The keys set, modified (also in place) or deleted since the last load or commit."""
        changed, deleted = self.changes()
        return set(changed) | set(deleted)

    @property
    def modified(self) -> bool:
        """Whether :meth:`commit` has something to write."""
        if self._needs_create or self._doomed:
            return True
        changed, deleted = self.changes()
        return bool(changed or deleted)

    def ensure_id(self) -> str:
        """The session id, creating a new random one (to be written and sent) if there is none."""
        if self.sid is None:
            self.sid = secrets.token_urlsafe(24)
            self.is_new = True
            self._needs_create = True
            logger.debug("new session %s...", self.sid[:6])
        return self.sid

    def regenerate_id(self) -> str:
        """Move the data to a new id and drop the old one on commit; call it after a login
        so an id seen before authentication is worthless afterwards.

        Returns:
            The new session id.
        """
        if self.sid is not None:
            self._doomed.append(self.sid)
            self.sid = None
        self._baseline = {}
        return self.ensure_id()

    def invalidate(self) -> None:
        """Empty the session and drop its id on commit (logout); a later write starts a new one."""
        self.accessed = True
        if self.sid is not None:
            self._doomed.append(self.sid)
        self.sid = None
        self.is_new = False
        self._needs_create = False
        self._data = {}
        self._baseline = {}

    def _rebase(self, stored: Dict[str, Any]) -> None:
        """Take ``stored`` as the new baseline; local edits not yet written stay pending."""
        changed, deleted = self.changes()
        data = dict(stored)
        data.update(changed)
        for key in deleted:
            data.pop(key, None)
        self._data = data
        self._baseline = {k: _dump_value(k, v) for k, v in stored.items()}

    async def reload(self) -> None:
        """Re-read the data from the store, dropping local changes (the id is kept).

        A session deleted or expired meanwhile reads as empty.
        """
        stored = await self.store.load(self.sid) if self.sid is not None else None
        stored = stored or {}
        self._data = dict(stored)
        self._baseline = {k: _dump_value(k, v) for k, v in stored.items()}

    async def commit(self) -> None:
        """Write the pending changes (creating the session and its id if needed), then take
        the stored data as the new baseline. Does nothing when nothing changed.

        Raises:
            TypeError: a value is not JSON-serializable (the message names its key).
        """
        changed, deleted = self.changes()
        if self.sid is None and changed:
            self.ensure_id()
        if self.sid is not None and (changed or deleted or self._needs_create):
            stored = await self._apply(changed, deleted)
            if stored is None:
                # dropped meanwhile (a logout in another request, another worker) or
                # expired: its changes must not bring it back
                logger.info("session %s... is gone from the store: this request's changes are dropped", self.sid[:6])
                self.sid = None
                self.is_new = self._needs_create = False
                self._data, self._baseline = {}, {}
            else:
                self._needs_create = False
                self._rebase(stored)
        elif self.sid is None:
            self._baseline = {}
        # Old ids go only once the data is safe under the new one.
        while self._doomed:
            await self.store.delete(self._doomed[0])
            self._doomed.pop(0)

    async def _apply(self, changed: Dict[str, Any], deleted: Iterable[str]) -> Optional[Dict[str, Any]]:
        """Write to the store: a session this request created is created there (with
        NEW_SESSION_SECONDS: its browser has not come back with the cookie yet); one it
        loaded is only written if it still exists (else None)."""
        assert self.sid is not None
        if not (self.is_new or self._needs_create):
            return await self.store.apply_existing(self.sid, changed, deleted)
        if _takes_lifetime(self.store):
            return await self.store.apply(self.sid, changed, deleted, lifetime=NEW_SESSION_SECONDS)
        return await self.store.apply(self.sid, changed, deleted)

    async def apply_changes(self, changed: Dict[str, Any], deleted: Iterable[str], *, create: bool = True) -> bool:
        """Apply a diff made elsewhere (e.g. by another process) to the store and to this
        mapping; this mapping's own pending changes to other keys stay pending.

        A session that no longer exists in the store (deleted by a logout, or expired) is
        left alone: nothing changes and False is returned. ``create=True`` creates only a
        session this request started (no id yet, or a new one).

        Raises:
            TypeError: a key is not a str or a value is not JSON-serializable.
        """
        encoded, removed = _encode_changes(changed, deleted)
        if create:
            self.ensure_id()
            existing = await self._apply(changed, removed)  # creates only a session this request made
        else:
            existing = await self.store.apply_existing(self.sid, changed, removed) if self.sid is not None else None
        if existing is None:
            return False
        self._needs_create = False
        stored = existing
        for key, text in encoded.items():
            self._data[key] = json.loads(text)
            self._baseline[key] = text
        for key in removed:
            self._data.pop(key, None)
            self._baseline.pop(key, None)
        self._rebase(stored)
        return True


def _secret_bytes(secret: Union[Secret, str, bytes]) -> bytes:
    if isinstance(secret, Secret):
        return bytes(secret)
    if isinstance(secret, (str, bytes)):
        return bytes(Secret(secret))
    raise ConfigurationError(f"the session secret must be a Secret, str or bytes, not {type(secret).__name__}")


def _signature(key: bytes, sid: str) -> str:
    digest = hmac.new(key, _SIGN_CONTEXT + sid.encode("ascii"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def sign_sid(secret: Union[Secret, str, bytes], sid: str) -> str:
    """The cookie value for ``sid``: ``<sid>.<base64url(HMAC-SHA256)>`` without padding.

    Raises:
        ValueError: ``sid`` is not 16-128 URL-safe base64 characters.
        ConfigurationError: the secret is too short.
    """
    if not isinstance(sid, str) or not _SID_RE.fullmatch(sid):
        raise ValueError("a session id is 16 to 128 characters of [A-Za-z0-9_-]")
    return f"{sid}.{_signature(_secret_bytes(secret), sid)}"


def unsign_cookie(secret: Union[Secret, str, bytes], value: Union[str, bytes]) -> Optional[str]:
    """The session id inside a cookie value made by :func:`sign_sid`, or None if the value
    is malformed, too long or not signed with ``secret``.

    Raises:
        ConfigurationError: the secret is too short.
    """
    key = _secret_bytes(secret)
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str) or len(value) > MAX_COOKIE_BYTES:
        return None
    sid, dot, sig = value.partition(".")
    if not dot or not _SID_RE.fullmatch(sid) or not _SIG_RE.fullmatch(sig):
        return None
    if not hmac.compare_digest(sig.encode("ascii"), _signature(key, sid).encode("ascii")):
        return None
    return sid


def store_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the session store failed (its disk is full or read-only, its
    database locked or corrupt, its server unreachable), not that the code using it is
    wrong (a value that is not JSON)."""
    if isinstance(exc, (sqlite3.Error, OSError, StoreUnavailable)):
        return True
    redis = sys.modules.get("redis.exceptions")  # only where a Redis store is in use
    return redis is not None and isinstance(exc, redis.RedisError)


def _failure(exc: BaseException) -> str:
    """An exception for a one-line log message."""
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


_STORE_DOWN_PAGE = (
    b"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Service unavailable</title></head>"
    b"<body><h1>Service unavailable</h1><p>The server cannot keep sessions right now. "
    b"Please try again in a moment.</p></body></html>"
)
_STORE_DOWN_START = {
    "type": "http.response.start",
    "status": 503,
    "headers": [
        (b"content-type", b"text/html; charset=utf-8"),
        (b"content-length", str(len(_STORE_DOWN_PAGE)).encode()),
        (b"cache-control", b"no-store"),
        (b"retry-after", b"5"),
    ],
}


async def _refuse(scope: Scope, send: Send) -> None:
    """The answer when the session store cannot be read: 503, or a websocket refused."""
    if scope["type"] == "http":
        await send(_STORE_DOWN_START)
        await send({"type": "http.response.body", "body": _STORE_DOWN_PAGE})
    else:
        await send({"type": "websocket.close", "code": 1011})


def _cookie_values(headers: Iterable[Tuple[bytes, bytes]], name: str) -> List[str]:
    """The values of cookie ``name`` in every Cookie header, in order; junk is skipped."""
    found: List[str] = []
    for header_name, header_value in headers:
        if header_name.lower() != b"cookie":
            continue
        for part in header_value.decode("latin-1").split(";"):
            cookie_name, eq, cookie_value = part.partition("=")
            if not eq or cookie_name.strip() != name:
                continue
            cookie_value = cookie_value.strip()
            if len(cookie_value) >= 2 and cookie_value[0] == cookie_value[-1] == '"':
                cookie_value = cookie_value[1:-1]
            found.append(cookie_value)
            if len(found) >= _MAX_COOKIE_VALUES:
                return found
    return found


class SessionMiddleware:
    """Pure ASGI middleware putting a :class:`Session` at ``scope["session"]`` for HTTP and
    websocket connections; other scope types pass through untouched.

    HTTP: pending changes are committed when the response starts, and a ``Set-Cookie`` is
    added when the browser needs a new cookie (or an expired one, after a logout), and
    again now and then while the session is in use, so that the cookie's ``Max-Age``
    slides as the store's expiry does (see ``refresh_seconds``). Bodies
    are never buffered. Websocket: committed on accept (where the cookie may be sent), on
    close and when the app returns. A session id created *after* accept cannot reach the
    browser, so call ``session.ensure_id()`` before accepting if the app may write.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: SessionStore,
        secret: Union[Secret, str, bytes],
        cookie_name: str = DEFAULT_COOKIE_NAME,
        max_age_seconds: int = DEFAULT_MAX_AGE_SECONDS,
        path: str = "/",
        same_site: str = "lax",
        https_only: Optional[bool] = None,
        on_drop: Optional[Callable[[str], Awaitable[None]]] = None,
    ) -> None:
        """
        Args:
            app: the wrapped ASGI app.
            store: where session data lives (share one store between workers of a host).
            secret: signs the cookie; at least 16 bytes.
            cookie_name: the cookie's name (an RFC 6265 token).
            max_age_seconds: the cookie's ``Max-Age``.
            path: the cookie's ``Path``.
            same_site: ``"lax"``, ``"strict"`` or ``"none"`` (``"none"`` implies ``Secure``).
            https_only: add ``Secure`` always (True), never (False) or when the request came
                over https/wss (None).
            on_drop: awaited with each session id this middleware deletes from the store
                (after ``clear()`` or ``invalidate()``, and the old id of ``regenerate_id()``),
                once it is deleted; what it raises is logged, not raised. Also with the ids
                of sessions found expired: the one a browser still holds the (validly
                signed) cookie of, before the request goes on to the app, and, once a
                response is sent, every so often (a twentieth of the store's
                ``max_age_seconds``, 1 to 60 s), those the store's
                :meth:`SessionStore.take_expired` hands out. So an expired session's
                processes end too, rather than wait for ``timeout_inactivity`` (never, by
                default) while counting against ``max_processes``.

        Raises:
            ConfigurationError: an argument is missing, malformed or out of range.
        """
        if not callable(app):
            raise ConfigurationError("SessionMiddleware needs an ASGI app as its first argument")
        missing = [m for m in ("load", "apply", "touch", "delete", "close") if not callable(getattr(store, m, None))]
        if missing:
            raise ConfigurationError(
                f"store must be a SessionStore (e.g. SQLiteStore or MemoryStore); it lacks {', '.join(missing)}"
            )
        if not isinstance(cookie_name, str) or not _COOKIE_NAME_RE.fullmatch(cookie_name):
            raise ConfigurationError(
                f"cookie_name must be a cookie token such as 'asgi_htag_session', got {cookie_name!r}"
            )
        if isinstance(max_age_seconds, bool) or not isinstance(max_age_seconds, int) or max_age_seconds <= 0:
            raise ConfigurationError(f"max_age_seconds must be a positive int, got {max_age_seconds!r}")
        if not isinstance(path, str) or not _COOKIE_PATH_RE.fullmatch(path):
            raise ConfigurationError(
                f"path must start with '/' and hold no spaces, ';' or control characters, got {path!r}"
            )
        if not isinstance(same_site, str) or same_site.lower() not in _SAME_SITE:
            raise ConfigurationError(f"same_site must be 'lax', 'strict' or 'none', got {same_site!r}")
        if https_only is not None and not isinstance(https_only, bool):
            raise ConfigurationError(f"https_only must be True, False or None, got {https_only!r}")
        same_site_attr = _SAME_SITE[same_site.lower()]
        if same_site_attr == "None" and https_only is False:
            raise ConfigurationError("same_site='none' requires Secure cookies; drop https_only=False")
        self.app = app
        self.store = store
        self._secret = secret if isinstance(secret, Secret) else Secret(_secret_bytes(secret))
        self.cookie_name = cookie_name
        self.max_age_seconds = max_age_seconds
        self.path = path
        self.same_site = same_site_attr
        self.https_only = True if same_site_attr == "None" else https_only
        if on_drop is not None and not callable(on_drop):
            raise ConfigurationError("on_drop must be an async callable taking a session id")
        self.on_drop = on_drop
        max_age = getattr(store, "max_age_seconds", DEFAULT_MAX_AGE_SECONDS)
        self.sweep_seconds = max(1.0, min(60.0, float(max_age) / 20))
        self._next_sweep = _monotonic() + self.sweep_seconds
        self._sweeping = False
        # expired ids already told to on_drop: a browser sends its dead cookie with every
        # request until it gets a new one, and one report per id is enough
        self._reported: "OrderedDict[str, None]" = OrderedDict()
        # The cookie's Max-Age counts from when it was set: a session in use gets it again
        # (a sliding expiry, as the store's) once every twentieth of it (1 s to a day), and
        # at its first request to this worker, whose age it cannot know.
        self.refresh_seconds = cookie_refresh_seconds(max_age_seconds)
        self._refreshed: "OrderedDict[str, float]" = OrderedDict()

    def __repr__(self) -> str:
        return f"SessionMiddleware(app={self.app!r}, store={self.store!r}, cookie_name={self.cookie_name!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app with ``scope["session"]`` set; see the class docstring."""
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        dead: List[str] = []  # validly signed ids the store no longer has (expired)
        try:
            session = await self._load(scope, dead)
        except Exception as exc:  # the store cannot be read (its disk, its server)
            if not store_failure(exc):
                raise
            logger.error("the session store cannot be read, answering 503: %s", _failure(exc))
            await _refuse(scope, send)
            return
        scope["session"] = session
        if dead and self.on_drop is not None:
            # before the app runs: what it starts for the new session (a process, on a
            # server at max_processes) may need the place the expired one holds
            for sid in dead:
                await self._report_expired(sid)
        # The sid whose cookie the browser holds; only it may be touched or dropped.
        browser_sid = session.sid
        secure = self._secure(scope)

        if scope["type"] == "http":
            failed = False  # the store failed at the response's start: a 503 went instead

            async def send_http(message: Message) -> None:
                nonlocal browser_sid, failed
                if failed:  # the app's response, which a 503 replaced
                    if message["type"] == "http.response.body" and not message.get("more_body", False):
                        await send({"type": "http.response.body", "body": _STORE_DOWN_PAGE})
                    return
                if message["type"] == "http.response.start":
                    try:
                        cookie, browser_sid = await self._settle(session, browser_sid, secure)
                    except Exception as exc:
                        if not store_failure(exc):
                            raise  # a bug (a value that is not JSON...): the server's 500
                        failed = True
                        await self._store_failed(session, browser_sid, exc)
                        await send(_STORE_DOWN_START)
                        return
                    extra: List[Tuple[bytes, bytes]] = []
                    if cookie is not None:
                        extra.append((b"set-cookie", cookie))
                    if session.accessed or cookie is not None:
                        extra.append((b"vary", b"Cookie"))
                    if extra:
                        message = {**message, "headers": [*message.get("headers", ()), *extra]}
                await send(message)

            await self.app(scope, receive, send_http)
            await self._after()
            return

        accepted = False
        refused = False  # the store failed at the handshake: closed instead of accepted

        async def send_ws(message: Message) -> None:
            nonlocal browser_sid, accepted, refused
            if refused:
                return
            if message["type"] == "websocket.accept":
                try:
                    cookie, browser_sid = await self._settle(session, browser_sid, secure)
                except Exception as exc:
                    if not store_failure(exc):
                        raise
                    refused = True
                    await self._store_failed(session, browser_sid, exc)
                    await send({"type": "websocket.close", "code": 1011})
                    return
                accepted = True
                if cookie is not None:
                    message = {**message, "headers": [*message.get("headers", ()), (b"set-cookie", cookie)]}
            elif message["type"] == "websocket.close" and accepted:
                await self._commit_after_accept(session, browser_sid)
            await send(message)

        await self.app(scope, receive, send_ws)
        if accepted:
            await self._commit_after_accept(session, browser_sid)
        await self._after()

    async def _after(self) -> None:
        """Once the response is sent: the periodic sweep of expired sessions (see __init__)."""
        if self.on_drop is None:
            return
        if self._sweeping or _monotonic() < self._next_sweep:
            return
        self._sweeping = True
        try:
            expired = await self.store.take_expired()
        except Exception:
            logger.exception("could not take the expired sessions from the store")
            expired = []
        finally:
            self._next_sweep = _monotonic() + self.sweep_seconds
            self._sweeping = False
        if expired:
            logger.info("%s expired session(s) removed from the store", len(expired))
        for sid in expired:
            await self._report_expired(sid)

    async def _report_expired(self, sid: str) -> None:
        """``on_drop(sid)`` once per expired id in this worker: a browser sends its dead
        cookie with every request until it gets a new one, and the sweep may hand out an id
        whose cookie came back before."""
        if sid in self._reported:
            return
        self._reported[sid] = None
        if len(self._reported) > _MAX_REPORTED_DEAD:
            self._reported.popitem(last=False)
        await self._report_drop(sid)

    async def _report_drop(self, sid: str) -> None:
        assert self.on_drop is not None
        try:
            await self.on_drop(sid)
        except Exception:
            logger.exception("on_drop failed for session %s...", sid[:6])

    async def _load(self, scope: Scope, dead: List[str]) -> Session:
        lookups = 0
        for value in _cookie_values(scope.get("headers") or (), self.cookie_name):
            sid = unsign_cookie(self._secret, value)
            if sid is None:
                continue
            lookups += 1
            if lookups > _MAX_COOKIE_CANDIDATES:
                break
            data = await self.store.load(sid)
            if data is not None:
                return Session(self.store, sid=sid, data=data)
            logger.debug("session %s... is unknown or expired; starting a new one", sid[:6])
            dead.append(sid)
        return Session(self.store)

    def _secure(self, scope: Scope) -> bool:
        if self.https_only is not None:
            return self.https_only
        return scope.get("scheme") in ("https", "wss")

    def _cookie(self, value: str, max_age: int, secure: bool) -> bytes:
        header = f"{self.cookie_name}={value}; Path={self.path}; Max-Age={max_age}"
        if max_age == 0:
            header += "; Expires=Thu, 01 Jan 1970 00:00:00 GMT"
        header += f"; HttpOnly; SameSite={self.same_site}"
        if secure:
            header += "; Secure"
        return header.encode("latin-1")

    async def _settle(
        self, session: Session, browser_sid: Optional[str], secure: bool
    ) -> Tuple[Optional[bytes], Optional[str]]:
        """Commit, refresh the expiry, and return the Set-Cookie value the browser needs
        (or None) with the sid the browser holds afterwards."""
        if browser_sid is not None and session.sid == browser_sid and not session._data:
            if session.cleared:  # clear() at logout: drop the row and the cookie, not an empty row
                session.invalidate()
            elif session.emptied and session.modified:
                # its last keys deleted (a logout by pop()): dropped too, unless the store has
                # keys this request did not see (written meanwhile by another request or an app)
                await session.commit()
                if not session._data:
                    session.invalidate()
        session.cleared = session.emptied = False
        wrote = session.modified
        await self._commit(session)
        if session.sid is not None and session.sid == browser_sid and not wrote:
            await self.store.touch(session.sid)
        if session.sid is not None and session.sid != browser_sid:
            session.is_new = False
            self._cookie_refreshed(session.sid)
            return self._cookie(sign_sid(self._secret, session.sid), self.max_age_seconds, secure), session.sid
        if (
            session.sid is not None
            and (session.accessed or wrote)  # in use: not a static file's response, say
            and self._cookie_due(session.sid)
            and (wrote or await self.store.load(session.sid) is not None)  # not dropped meanwhile
        ):
            return self._cookie(sign_sid(self._secret, session.sid), self.max_age_seconds, secure), session.sid
        if session.sid is None and browser_sid is not None:
            logger.debug("session %s... dropped; expiring its cookie", browser_sid[:6])
            return self._cookie("", 0, secure), None
        return None, browser_sid

    def _cookie_due(self, sid: str) -> bool:
        """True (and noted) if the cookie of ``sid``, in use, is to be set again."""
        last = self._refreshed.get(sid)
        if last is not None and _monotonic() - last < self.refresh_seconds:
            return False
        self._cookie_refreshed(sid)
        return True

    def _cookie_refreshed(self, sid: str) -> None:
        self._refreshed[sid] = _monotonic()
        self._refreshed.move_to_end(sid)
        if len(self._refreshed) > _MAX_REFRESHED:
            self._refreshed.popitem(last=False)

    async def _commit(self, session: Session) -> None:
        dropped = list(session._doomed)
        await session.commit()
        if self.on_drop is not None:
            for sid in dropped:
                await self._report_drop(sid)

    async def _store_failed(self, session: Session, browser_sid: Optional[str], exc: Exception) -> None:
        """The store failed to save this request's session (its disk is full or read-only,
        its server is down): one log line, and what was started for a session the browser
        will not hold (a new one: its cookie does not go out) is ended."""
        logger.error("the session store failed to save session %s..., answering 503: %s", (session.sid or "-")[:6], _failure(exc))
        if session.sid is not None and session.sid != browser_sid and self.on_drop is not None:
            await self._report_drop(session.sid)

    async def _commit_after_accept(self, session: Session, browser_sid: Optional[str]) -> None:
        if not session.modified:
            return
        try:
            await self._commit(session)
        except Exception as exc:
            if not store_failure(exc):
                raise
            logger.error("the session store failed to save session %s... after its websocket: %s", (session.sid or "-")[:6], _failure(exc))
            return
        if session.sid is not None and session.sid != browser_sid:
            logger.warning(
                "session %s... was created or renamed after the websocket was accepted; the browser "
                "cannot receive its cookie (call session.ensure_id() before accepting)",
                session.sid[:6],
            )


__all__ = (
    "SessionStore",
    "MemoryStore",
    "SQLiteStore",
    "Session",
    "SessionMiddleware",
    "sign_sid",
    "unsign_cookie",
    "default_store",
    "DEFAULT_COOKIE_NAME",
    "DEFAULT_MAX_AGE_SECONDS",
    "MAX_COOKIE_BYTES",
)
