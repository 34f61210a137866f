"""A session store on Redis, for several hosts sharing sessions (``pip install redis``).

Each session is one Redis hash (field = session key, value = JSON), so the key-level merge
that :meth:`SessionStore.apply` promises is what Redis does natively, in one MULTI/EXEC.
Expiry is Redis's own (PEXPIRE).
"""
import json
import logging
from typing import Any, Dict, Iterable, Optional

from .exceptions import ConfigurationError
from .sessions import DEFAULT_MAX_AGE_SECONDS, SessionStore, _check_max_age, _encode_changes, _lifetime

logger = logging.getLogger(__name__)

# a field that is always there, so an empty session still exists
_MARK = "\x00asgi_htag"

# apply_existing: KEYS[1] the session; ARGV: expiry (ms), n, n field/value pairs, fields to delete
_APPLY_EXISTING = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local n = tonumber(ARGV[2])
for i = 0, n - 1 do redis.call('HSET', KEYS[1], ARGV[3 + 2 * i], ARGV[4 + 2 * i]) end
for i = 3 + 2 * n, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return redis.call('HGETALL', KEYS[1])
"""


class RedisStore(SessionStore):
    """Sessions in Redis.

    Args:
        url: a redis URL, e.g. ``redis://127.0.0.1:6379/0``.
        max_age_seconds: idle lifetime of a session.
        prefix: prefix of the Redis keys.

    It runs on asyncio only (``redis.asyncio``); its first use under trio raises a
    ConfigurationError that says so.

    Sessions expire as Redis keys with a TTL, silently: :meth:`take_expired` (inherited)
    has nothing to hand out, so an expired session's processes end when its browser comes
    back with the old cookie (see :class:`~asgi_htag.sessions.SessionMiddleware`'s
    ``on_drop``), or after ``timeout_inactivity``.

    Raises:
        ConfigurationError: ``max_age_seconds`` is not a positive number.
        ImportError: the ``redis`` package is not installed.
    """

    def __init__(self, url: str, *, max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS, prefix: str = "asgi_htag:s:") -> None:
        import redis.asyncio  # noqa: F401  (fail early, with a clear ImportError)

        self.url = url
        self.max_age_seconds = _check_max_age(max_age_seconds)
        self.prefix = prefix
        self._client: Any = None

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self.prefix!r})"  # the URL may hold a password

    def _redis(self) -> Any:
        if self._client is None:
            import asyncio

            import redis.asyncio

            try:
                asyncio.get_running_loop()
            except RuntimeError:  # redis.asyncio needs asyncio's loop; it would fail obscurely
                raise ConfigurationError(
                    "RedisStore works on asyncio (uvicorn, gunicorn's uvicorn workers, hypercorn's "
                    "asyncio worker), not on another event loop such as trio's: use SQLiteStore there"
                ) from None

            self._client = redis.asyncio.Redis.from_url(self.url, decode_responses=True)
        return self._client

    def _key(self, sid: str) -> str:
        return self.prefix + sid

    @staticmethod
    def _decode(fields: Dict[str, str]) -> Optional[Dict[str, Any]]:
        if _MARK not in fields:
            return None
        data: Dict[str, Any] = {}
        for k, v in fields.items():
            if k == _MARK:
                continue
            try:
                data[k] = json.loads(v)
            except ValueError:
                logger.error("session field %r in Redis is not JSON; ignored", k)
        return data

    async def load(self, sid: str) -> Optional[Dict[str, Any]]:
        """See :meth:`SessionStore.load`."""
        return self._decode(await self._redis().hgetall(self._key(sid)))

    async def apply(
        self, sid: str, changed: Dict[str, Any], deleted: Iterable[str], *, lifetime: Optional[float] = None
    ) -> Dict[str, Any]:
        """See :meth:`SessionStore.apply`."""
        encoded, removed = _encode_changes(changed, deleted)
        key = self._key(sid)
        async with self._redis().pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={_MARK: "1", **encoded})
            removed = [k for k in removed if k != _MARK and k not in encoded]
            if removed:
                pipe.hdel(key, *removed)
            pipe.pexpire(key, max(1, int(_lifetime(lifetime, self.max_age_seconds) * 1000)))
            pipe.hgetall(key)
            results = await pipe.execute()
        return self._decode(results[-1]) or {}

    async def apply_existing(self, sid: str, changed: Dict[str, Any], deleted: Iterable[str]) -> Optional[Dict[str, Any]]:
        """See :meth:`SessionStore.apply_existing`: one Lua script, atomic in Redis."""
        encoded, removed = _encode_changes(changed, deleted)
        removed = [k for k in removed if k != _MARK and k not in encoded]
        pairs = [x for item in encoded.items() for x in item]
        flat = await self._redis().eval(
            _APPLY_EXISTING, 1, self._key(sid), int(self.max_age_seconds * 1000), len(encoded), *pairs, *removed
        )
        if not flat:
            return None
        return self._decode(dict(zip(flat[::2], flat[1::2]))) or {}

    async def touch(self, sid: str) -> None:
        """See :meth:`SessionStore.touch`."""
        await self._redis().pexpire(self._key(sid), int(self.max_age_seconds * 1000))

    async def delete(self, sid: str) -> None:
        """See :meth:`SessionStore.delete`."""
        await self._redis().delete(self._key(sid))

    async def close(self) -> None:
        """Close the connection pool."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None


__all__ = ("RedisStore",)
