"""Quart with an htag app served under /ui.

Run from the repository root::

    uvicorn examples.quart.app:app

then open http://127.0.0.1:8000/ (Quart) and http://127.0.0.1:8000/ui/ (the htag counter,
one process per browser session).

Quart has no ``mount()``, so :class:`PathDispatcher` below is a few lines of plain ASGI:
requests and websockets under /ui go to the htag app, everything else (and the lifespan
events) to Quart. Quart's ``before_serving`` / ``after_serving`` hooks start and stop the
htag engine.
"""
from typing import Any, Awaitable, Callable, Dict, MutableMapping

from htag import Tag
from quart import Quart, jsonify

from asgi_htag import HtagASGI

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class Counter(Tag.body):
    def init(self):
        self.count = 0
        self <= Tag.h1("htag inside Quart")
        self <= Tag.button("+1", _onclick=self.bind.inc(), _data_test="inc")
        self.value = Tag.span("0", _data_test="value")
        self <= self.value
        self <= Tag.p(Tag.a("back to Quart", _href="../"))

    def inc(self):
        self.count += 1
        self.value.clear(str(self.count))


class PathDispatcher:
    """Route by path prefix to sub-applications, the ASGI way.

    For a prefix ``/ui``, requests and websockets under ``/ui/`` go to the sub-app with
    ``path`` left whole and ``root_path`` extended by ``/ui``: the sub-app builds its URLs
    from root_path and finds its own routes as path minus root_path. ``/ui`` itself is
    redirected to ``/ui/`` (as Starlette's mount does). Anything else, lifespan included,
    goes to ``default``.
    """

    def __init__(self, default: ASGIApp, mounts: Dict[str, ASGIApp]) -> None:
        for prefix in mounts:
            if not prefix.startswith("/") or prefix.endswith("/"):
                raise ValueError(f"mount prefixes look like '/ui', not {prefix!r}")
        self.default = default
        self.mounts = mounts

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            root_path = scope.get("root_path", "") or ""
            path = scope["path"]
            rel = path[len(root_path):] if root_path and path.startswith(root_path) else path
            for prefix, sub_app in self.mounts.items():
                if rel == prefix and scope["type"] == "http":
                    # "/ui" -> "/ui/", so that relative links in the sub-app resolve under it
                    await _redirect(send, root_path + prefix + "/", scope.get("query_string", b""))
                    return
                if rel == prefix or rel.startswith(prefix + "/"):
                    await sub_app({**scope, "root_path": root_path + prefix}, receive, send)
                    return
        await self.default(scope, receive, send)


async def _redirect(send: Any, location: str, query_string: bytes) -> None:
    target = location.encode("latin-1") + (b"?" + query_string if query_string else b"")
    await send({"type": "http.response.start", "status": 307, "headers": [(b"location", target), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


quart_app = Quart(__name__)
ui = HtagASGI(Counter)


@quart_app.before_serving
async def start_htag() -> None:
    await ui.startup()


@quart_app.after_serving
async def stop_htag() -> None:
    await ui.shutdown()


@quart_app.route("/")
async def home() -> str:
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Quart + htag</title></head><body>"
        "<h1 data-test='quart-home'>Quart home</h1>"
        "<p><a href='/ui/' data-test='to-ui'>open the htag counter</a></p></body></html>"
    )


@quart_app.route("/api/ping")
async def ping() -> Any:
    return jsonify(framework="quart", pong=True)


app = PathDispatcher(quart_app, {"/ui": ui})
