"""Where asgi_htag keeps its files, and the signing secret shared by every worker.

Two directories are involved:

* the *state directory* holds what must survive a restart: the signing secret and the
  default SQLite session store;
* the *runtime directory* holds the Unix sockets of the fork server and of every
  per-session process. It is private (0700) and its path is short, because AF_UNIX paths
  are limited to about 100 bytes.

Every worker of one server computes the same two paths from the same settings, which is
how they find each other's processes.

Also here: :func:`use_batch_scheduling`, the scheduling policy the ``*_batch_scheduling``
settings put a process under, and :class:`LoadScheduling`, which puts the web worker under
it only while the worker has many interactions in flight.
"""
import hashlib
import logging
import os
import secrets
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Tuple, Union

from .exceptions import ConfigurationError

logger = logging.getLogger(__name__)

ENV_SECRET = "ASGI_HTAG_SECRET"
ENV_STATE_DIR = "ASGI_HTAG_STATE_DIR"
ENV_RUNTIME_DIR = "ASGI_HTAG_RUNTIME_DIR"

# AF_UNIX sun_path is 108 bytes on Linux; leave room for "/<20 hex>.sock" and a tmp suffix.
_MAX_RUNTIME_DIR_BYTES = 70

PathLike = Union[str, "os.PathLike[str]"]


class Secret:
    """A string that never shows itself in a repr, a str() or a log line."""

    __slots__ = ("_value",)

    def __init__(self, value: Union[str, bytes]) -> None:
        if isinstance(value, str):
            value = value.encode()
        if len(value) < 16:
            raise ConfigurationError(
                "the session secret must be at least 16 bytes long; "
                f"set {ENV_SECRET} or pass secret=... with a longer value"
            )
        self._value = bytes(value)

    def __bytes__(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__


def default_state_dir() -> Path:
    """The state directory: ``$ASGI_HTAG_STATE_DIR``, else ``$XDG_STATE_HOME/asgi_htag``,
    else ``~/.local/state/asgi_htag``."""
    env = os.environ.get(ENV_STATE_DIR)
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return (base / "asgi_htag").absolute()


def default_runtime_dir(state_dir: PathLike) -> Path:
    """The runtime directory for a state directory: ``$ASGI_HTAG_RUNTIME_DIR``, else a short,
    per-user, per-state-dir folder under ``$XDG_RUNTIME_DIR`` or the system temp dir."""
    env = os.environ.get(ENV_RUNTIME_DIR)
    if env:
        return Path(env).expanduser().absolute()
    digest = hashlib.sha256(os.fsencode(Path(state_dir).absolute())).hexdigest()[:12]
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    candidate = Path(base) / f"asgi_htag-{digest}"
    if len(os.fsencode(candidate)) > _MAX_RUNTIME_DIR_BYTES:
        candidate = Path(tempfile.gettempdir()) / f"ahtag-{os.getuid()}-{digest}"
    return candidate


def ensure_private_dir(path: PathLike) -> Path:
    """Create ``path`` (mode 0700) if needed and check that it is ours and private.

    Raises:
        ConfigurationError: the directory belongs to another user or is open to others.
    """
    p = Path(path)
    try:
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise ConfigurationError(f"{p} exists and is not a directory") from exc
    st = os.lstat(p)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigurationError(f"{p} exists and is not a directory")
    if st.st_uid != os.getuid():
        raise ConfigurationError(f"{p} belongs to uid {st.st_uid}, not to us ({os.getuid()}); pick another directory")
    if st.st_mode & 0o077:
        os.chmod(p, 0o700)
    return p


def check_runtime_dir(path: PathLike) -> Path:
    """:func:`ensure_private_dir`, plus a check that socket paths inside will fit AF_UNIX."""
    p = ensure_private_dir(path)
    if len(os.fsencode(p)) > _MAX_RUNTIME_DIR_BYTES:
        raise ConfigurationError(
            f"runtime directory {p} is too long for Unix socket paths "
            f"(max {_MAX_RUNTIME_DIR_BYTES} bytes); set {ENV_RUNTIME_DIR} to a shorter path"
        )
    return p


PROCESS_LOOPS = ("auto", "uvloop", "asyncio")


def check_process_loop(name: str) -> str:
    """Validate the ``process_loop`` setting: "auto" (uvloop when it is installed, else
    asyncio), "uvloop" (required: an error now rather than in every process later) or
    "asyncio"."""
    if name not in PROCESS_LOOPS:
        raise ConfigurationError(f"process_loop must be one of {', '.join(PROCESS_LOOPS)}, not {name!r}")
    if name == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError as exc:
            raise ConfigurationError("process_loop='uvloop' but uvloop is not installed") from exc
    return name


def _batch_policy() -> Optional[int]:
    """``os.SCHED_BATCH`` where this platform has it and a way to set it, else None."""
    if getattr(os, "sched_setscheduler", None) is None:
        return None
    return getattr(os, "SCHED_BATCH", None)


def use_batch_scheduling(what: str) -> bool:
    """Put the calling thread (and the threads and processes it creates from now on) under
    Linux's SCHED_BATCH: the same share of CPU at the same nice, but its wake-ups do not
    preempt whoever is running. Unprivileged, and reversible without privileges. Where the
    platform has no such policy nothing changes; where the kernel refuses, ``what`` is
    named in a warning. Returns whether the policy is now in force."""
    policy = _batch_policy()
    if policy is None:
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError as exc:
        logger.warning("cannot use SCHED_BATCH for %s: %s", what, exc)
        return False
    return True


class LoadScheduling:
    """SCHED_BATCH for one thread (the web worker's event loop) while it has many
    interactions in flight and it pays, the default policy otherwise.

    Under load each click wakes the worker twice, and under the default policy each of
    those wake-ups preempts the session process running on that CPU in the middle of its
    click; under SCHED_BATCH the worker waits for it to block or use up its slice. With
    few interactions in flight the CPUs have room and the worker keeps its quick wake-ups.

    ``high`` interactions in flight (default: twice the CPUs this process may use) switch
    to SCHED_BATCH, ``low`` or fewer (default: the CPUs) back. While batched, the thread's
    average wait for a CPU per time slice (``/proc/.../schedstat``) is checked every
    ``check_seconds``: above ``max_wait_seconds`` something other than a click's worth of
    session work keeps the CPUs (CPU-bound programs beside the server, or a session
    computing for long), and waiting for it at every wake-up costs more than preempting
    it, so the thread goes back to the default policy for ``backoff_seconds``.

    Called from the event loop only: :meth:`started` when an interaction is sent to a
    session process, :meth:`finished` when its answer is back (or will never come).
    """

    def __init__(
        self,
        high: Optional[int] = None,
        low: Optional[int] = None,
        *,
        max_wait_seconds: float = 300e-6,
        check_seconds: float = 0.25,
        backoff_seconds: float = 10.0,
    ) -> None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.high = high if high is not None else 2 * cpus
        self.low = low if low is not None else cpus
        if not 0 <= self.low < self.high:
            raise ConfigurationError(f"LoadScheduling needs 0 <= low < high, got low={self.low}, high={self.high}")
        self.max_wait_ns = max_wait_seconds * 1e9
        self.check_seconds = check_seconds
        self.backoff_seconds = backoff_seconds
        self.inflight = 0
        self.batch = False
        self.switches = 0
        self.backoffs = 0
        self._tid: Optional[int] = None
        self._next_check = 0.0
        self._hold_until = 0.0
        self._waited = self._slices = 0  # batched stretches since the last check
        self._stint = (0, 0)  # schedstat when the current batched stretch began

    def attach(self) -> bool:
        """Follow the calling thread from now on. False where the platform has no
        SCHED_BATCH (nothing will change then)."""
        if _batch_policy() is None:
            return False
        self._tid = threading.get_native_id()
        return True

    def started(self) -> None:
        self.inflight += 1
        if self.batch:
            now = time.monotonic()
            if now >= self._next_check:
                self._check(now)
        elif self.inflight >= self.high and self._tid is not None:
            now = time.monotonic()
            if now >= self._hold_until and self._set(True):
                self._stint = self.schedstat()
                if not self._next_check:  # the first time; later, an overdue check comes at the next click
                    self._next_check = now + self.check_seconds

    def finished(self, count: int = 1) -> None:
        self.inflight = max(0, self.inflight - count)
        if self.batch and self.inflight <= self.low and self._set(False):
            self._end_stint()

    def schedstat(self) -> Tuple[int, int]:
        """``(ns spent waiting for a CPU, time slices)`` of the followed thread so far;
        ``(0, 0)`` where the kernel does not tell."""
        try:
            with open(f"/proc/self/task/{self._tid}/schedstat", "rb") as f:
                fields = f.read().split()
            return int(fields[1]), int(fields[2])
        except (OSError, ValueError, IndexError):
            return 0, 0

    def _end_stint(self) -> None:
        """Add the current batched stretch to the waits being averaged."""
        waited, slices = self.schedstat()
        self._waited += waited - self._stint[0]
        self._slices += slices - self._stint[1]
        self._stint = (waited, slices)

    def _check(self, now: float) -> None:
        """Batched stretches since the last check (under load the policy may go back and
        forth many times in between): back off if they waited too long per slice."""
        self._next_check = now + self.check_seconds
        self._end_stint()
        waited, slices = self._waited, self._slices
        self._waited = self._slices = 0
        if slices and waited / slices > self.max_wait_ns:
            logger.debug(
                "the web worker waited %.0f us per time slice under SCHED_BATCH: back to the default policy for %gs",
                waited / slices / 1e3,
                self.backoff_seconds,
            )
            if self._set(False):
                self.backoffs += 1
                self._hold_until = now + self.backoff_seconds

    def _set(self, batch: bool) -> bool:
        if self._tid is None:  # given up after a refusal
            return False
        try:
            os.sched_setscheduler(self._tid, os.SCHED_BATCH if batch else os.SCHED_OTHER, os.sched_param(0))
        except OSError as exc:  # a thread that is gone, a seccomp filter...: stop trying
            logger.warning("cannot switch the web worker's scheduling policy; keeping the current one: %s", exc)
            self._tid = None
            return False
        self.batch = batch
        self.switches += 1
        return True


def load_secret(state_dir: PathLike, secret: Optional[Union[str, bytes, Secret]] = None) -> Secret:
    """The cookie-signing secret: the argument, else ``$ASGI_HTAG_SECRET``, else a random one
    created once in ``<state_dir>/secret`` (mode 0600) and shared by every worker and restart."""
    if isinstance(secret, Secret):
        return secret
    if secret:
        return Secret(secret)
    env = os.environ.get(ENV_SECRET)
    if env:
        return Secret(env)
    d = ensure_private_dir(state_dir)
    path = d / "secret"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    if len(data) >= 32:
        return Secret(data.strip())
    # Write to a unique temp name, then link(): link never overwrites, so when several workers
    # race at first start exactly one secret wins and everybody reads that one.
    value = secrets.token_hex(32).encode()
    tmp = d / f".secret.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, value)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
        logger.info("created a new session secret in %s", d)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    data = path.read_bytes().strip()
    if len(data) < 32:
        raise ConfigurationError(f"{path} holds a truncated secret; delete it or set {ENV_SECRET}")
    return Secret(data)


__all__ = (
    "Secret",
    "default_state_dir",
    "default_runtime_dir",
    "ensure_private_dir",
    "check_runtime_dir",
    "load_secret",
    "ENV_SECRET",
    "ENV_STATE_DIR",
    "ENV_RUNTIME_DIR",
)
