"""Quart with an htag app served under /ui, both reading and writing ONE session.

Run from the repository root::

    uvicorn examples.quart.app:app

then open http://127.0.0.1:8000/ (Quart) and http://127.0.0.1:8000/ui/ (the htag counter,
one process per browser session). Quart's routes:

* ``GET /``                 HTML: what the session holds, links to /ui/ and /name
* ``GET /name?value=Bob``   a Quart route writes ``session["name"]``; the counter page
  greets "Hello Bob"
* ``GET /api/session``      JSON of the session, including ``clicks`` written by the htag app
* ``GET /logout``           clears the session: its cookie and its htag process go too
* ``GET /api/ping``         JSON, to show Quart's own routes answer beside the htag app

``asgi_htag.SessionMiddleware`` wraps the whole ASGI app and Quart's ``session_interface``
is :class:`asgi_htag.quart_session.ScopeSessionInterface`, so ``quart.session`` in the
routes and ``self.session`` in the htag app are the same data (a SQLite store in the state
directory, behind one signed cookie; Quart sets no cookie of its own).

Quart has no ``mount()``, so :class:`PathDispatcher` below is a few lines of plain ASGI:
requests and websockets under /ui go to the htag app, everything else (and the lifespan
events) to Quart. Quart's ``before_serving`` / ``after_serving`` hooks start and stop the
htag engine.
"""
import html
from typing import Any, Awaitable, Callable, Dict, MutableMapping

from htag import Tag
from quart import Quart, jsonify, redirect, request, session

from asgi_htag import HtagASGI, SessionMiddleware
from asgi_htag.config import default_state_dir, load_secret
from asgi_htag.quart_session import ScopeSessionInterface
from asgi_htag.sessions import default_store

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class Greeting(Tag.h1):
    def render(self):
        # render() runs at every page load: a name set by a Quart route since this
        # instance was built (a reload reuses it) shows up on the next load.
        self.clear(f"Hello {self.session.get('name', 'world')}")


class Counter(Tag.body):
    """Counts clicks in the session, and greets whoever a Quart route named."""

    def init(self):
        self.count = self.session.get("clicks", 0)
        self <= Greeting(_data_test="hello")
        self <= Tag.button("+1", _onclick=self.bind.inc(), _data_test="inc")
        self.value = Tag.span(str(self.count), _data_test="value")
        self <= self.value
        self <= Tag.p(Tag.a("back to Quart", _href="../"))

    def inc(self):
        self.count += 1
        self.session["clicks"] = self.count
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


# One state directory, one store and one secret for Quart's routes and the htag app
# ($ASGI_HTAG_STATE_DIR, else ~/.local/state/asgi_htag; $ASGI_HTAG_SECRET, else a secret
# file created there once and shared by every worker).
STATE_DIR = default_state_dir()
store = default_store(STATE_DIR)
secret = load_secret(STATE_DIR)

quart_app = Quart(__name__)
quart_app.session_interface = ScopeSessionInterface()
ui = HtagASGI(Counter, state_dir=STATE_DIR, store=store, secret=secret)


@quart_app.before_serving
async def start_htag() -> None:
    await ui.startup()


@quart_app.after_serving
async def stop_htag() -> None:
    await ui.shutdown()


@quart_app.route("/")
async def home() -> str:
    clicks = session.get("clicks", 0)
    name = session.get("name", "world")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Quart + htag</title></head><body>"
        "<h1 data-test='quart-home'>Quart home</h1>"
        f"<p>Clicks counted by the htag app: <b data-test='clicks'>{clicks}</b></p>"
        f"<p>Name: <b data-test='name'>{html.escape(str(name))}</b></p>"
        "<p><a href='/ui/' data-test='to-ui'>open the htag counter</a></p>"
        "<form action='/name'><input name='value' data-test='name-input'>"
        "<button data-test='set-name'>set my name</button></form>"
        "</body></html>"
    )


@quart_app.route("/name")
async def set_name() -> Any:
    session["name"] = request.args.get("value", "world")
    return redirect("/ui/", 303)


@quart_app.route("/logout")
async def logout() -> Any:
    session.clear()  # the session, its cookie and its htag process go
    return redirect("/", 303)


@quart_app.route("/api/session")
async def read_session() -> Any:
    return jsonify(clicks=session.get("clicks", 0), name=session.get("name"))


@quart_app.route("/api/ping")
async def ping() -> Any:
    return jsonify(framework="quart", pong=True)


# on_drop: a logout (session.clear()) or an expired session ends its htag processes
app = SessionMiddleware(PathDispatcher(quart_app, {"/ui": ui}), store=store, secret=secret, on_drop=ui.session_dropped)
