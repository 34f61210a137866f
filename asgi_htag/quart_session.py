"""Quart's ``session`` as asgi_htag's session: one session for Quart's routes and the htag app.

Quart keeps its own session in a cookie of its own by default, which an htag app never sees.
Wrap the whole ASGI app (Quart and the htag app beside it) in
:class:`asgi_htag.SessionMiddleware`, and give Quart this interface::

    quart_app.session_interface = ScopeSessionInterface()
    app = SessionMiddleware(PathDispatcher(quart_app, {"/ui": ui}), store=store, secret=secret)

``quart.session`` is then the :class:`asgi_htag.sessions.Session` of the request (read
from ``request.scope["session"]``): what a route writes, the htag app reads as
``self.session`` on its next render or interaction, and the other way round. The
middleware stores it and sends its cookie; Quart's own cookie is never set. Needs Quart
(``pip install quart``), which asgi_htag does not depend on.
"""
import logging
from typing import Any, Iterator, Optional

from quart.sessions import SessionInterface, SessionMixin

from .exceptions import ConfigurationError
from .sessions import Session

logger = logging.getLogger("asgi_htag.quart_session")


class ScopeSession(SessionMixin):
    """Quart's view of an asgi_htag :class:`Session`: every read and write goes to it.

    ``permanent`` is always True and setting it changes nothing: the cookie's lifetime is
    the middleware's ``max_age_seconds``, and a ``_permanent`` key would otherwise be
    written into the shared session.
    """

    def __init__(self, session: Session) -> None:
        self.session = session

    def __getitem__(self, key: str) -> Any:
        return self.session[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.session[key] = value

    def __delitem__(self, key: str) -> None:
        del self.session[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.session)

    def __len__(self) -> int:
        return len(self.session)

    def __contains__(self, key: object) -> bool:
        return key in self.session

    def clear(self) -> None:
        """A logout: the middleware drops the session and expires its cookie (see
        :meth:`Session.clear`)."""
        self.session.clear()

    @property  # type: ignore[override]
    def permanent(self) -> bool:
        return True

    @permanent.setter
    def permanent(self, value: bool) -> None:
        pass

    @property  # type: ignore[override]
    def modified(self) -> bool:
        return self.session.modified

    @property  # type: ignore[override]
    def new(self) -> bool:
        return self.session.is_new or self.session.sid is None

    @property  # type: ignore[override]
    def accessed(self) -> bool:
        return self.session.accessed

    @accessed.setter
    def accessed(self, value: bool) -> None:
        self.session.accessed = self.session.accessed or bool(value)

    def __repr__(self) -> str:
        return f"<ScopeSession {self.session!r}>"


class ScopeSessionInterface(SessionInterface):
    """A Quart session interface that hands out the asgi_htag session of each request
    (``request.scope["session"]``, set by :class:`asgi_htag.SessionMiddleware` around the
    app) and leaves storing it, and its cookie, to that middleware."""

    async def open_session(self, app: Any, request: Any) -> Optional[SessionMixin]:
        """Raises:
        ConfigurationError: no asgi_htag SessionMiddleware wraps the app (a request
            without it would otherwise get a session nobody stores)."""
        session = request.scope.get("session")
        if not isinstance(session, Session):
            raise ConfigurationError(
                "ScopeSessionInterface needs asgi_htag.SessionMiddleware around the ASGI app "
                f"(scope['session'] is {type(session).__name__}, not an asgi_htag Session)"
            )
        return ScopeSession(session)

    async def save_session(self, app: Any, session: Any, response: Any) -> None:
        """Nothing to do: the middleware commits the session when the response starts (or
        when a websocket closes) and sets the cookie."""

    def is_null_session(self, instance: object) -> bool:
        return not isinstance(instance, ScopeSession)


__all__ = ("ScopeSession", "ScopeSessionInterface")
