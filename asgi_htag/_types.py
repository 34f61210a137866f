"""ASGI type aliases used across asgi_htag (kept loose where asgiref's TypedDicts get in the way)."""
from typing import Any, Awaitable, Callable, MutableMapping

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = ("Scope", "Message", "Receive", "Send", "ASGIApp")
