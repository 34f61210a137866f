"""asgi_htag: serve htag apps on the web, one OS process per user session.

``Runner`` (Starlette, with ``.run()``) is imported lazily so that the raw ASGI pieces can
be used without Starlette.
"""
import logging
from typing import Any

from . import _log
from .app import HtagASGI
from .exceptions import HtagError
from .sessions import MemoryStore, SessionMiddleware, SQLiteStore

__version__ = "0.1.0"

# warnings and errors reach stderr until the application configures logging (see _log)
logging.getLogger(__name__).addHandler(_log.FallbackHandler())


def __getattr__(name: str) -> Any:
    if name == "Runner":
        from .runner import Runner

        return Runner
    raise AttributeError(f"module 'asgi_htag' has no attribute {name!r}")


__all__ = ("__version__", "HtagASGI", "Runner", "SessionMiddleware", "SQLiteStore", "MemoryStore", "HtagError")
