"""FastAPI with an htag app mounted under /ui, both reading and writing ONE session.

Run from the repository root::

    uvicorn examples.fastapi.app:app

then open http://127.0.0.1:8000/ . The htag counter lives at /ui/ (one process per browser
session); FastAPI keeps its own routes:

* ``GET /``                 HTML: what the session holds, links to /ui/ and /name
* ``GET /name?value=Bob``   a FastAPI route writes ``request.session["name"]``; the counter
  page greets "Hello Bob"
* ``GET /api/session``      JSON of the session, including ``clicks`` written by the htag app
* ``GET /logout``           clears the session: its cookie and its htag process go too

``asgi_htag.SessionMiddleware`` wraps the whole FastAPI app, so ``request.session`` in the
routes and ``self.session`` in the htag app are the same data (a SQLite store in the state
directory, behind a signed cookie). HtagASGI sees that session in the scope and uses it.
"""
import contextlib
import html
from typing import Any, AsyncIterator, Dict

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from htag import Tag

from asgi_htag import HtagASGI, SessionMiddleware
from asgi_htag.config import default_state_dir, load_secret
from asgi_htag.sessions import default_store


class Greeting(Tag.h1):
    def render(self):
        # render() runs at every page load: a name set by a FastAPI route since this
        # instance was built (a reload reuses it) shows up on the next load.
        self.clear(f"Hello {self.session.get('name', 'world')}")


class Counter(Tag.body):
    """Counts clicks in the session, and greets whoever a FastAPI route named."""

    def init(self):
        self.count = self.session.get("clicks", 0)
        self <= Greeting(_data_test="hello")
        self <= Tag.button("+1", _onclick=self.bind.inc(), _data_test="inc")
        self.value = Tag.span(str(self.count), _data_test="value")
        self <= self.value
        self <= Tag.p(Tag.a("back to FastAPI", _href="../"))

    def inc(self):
        self.count += 1
        self.session["clicks"] = self.count
        self.value.clear(str(self.count))


# One state directory, one store and one secret for FastAPI's routes and the htag app
# ($ASGI_HTAG_STATE_DIR, else ~/.local/state/asgi_htag; $ASGI_HTAG_SECRET, else a secret
# file created there once and shared by every worker).
STATE_DIR = default_state_dir()
store = default_store(STATE_DIR)
secret = load_secret(STATE_DIR)

ui = HtagASGI(Counter, state_dir=STATE_DIR, store=store, secret=secret)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # mount() does not forward lifespan events to the mounted app: start the htag engine
    # (fork server, process pool) with FastAPI's, and stop it at shutdown.
    await ui.startup()
    try:
        yield
    finally:
        await ui.shutdown()


app = FastAPI(lifespan=lifespan)
# on_drop: a logout (session.clear()) or an expired session ends its htag processes
app.add_middleware(SessionMiddleware, store=store, secret=secret, on_drop=ui.session_dropped)
app.mount("/ui", ui)


@app.get("/", response_class=HTMLResponse)
async def home(request: Request) -> str:
    clicks = request.session.get("clicks", 0)
    name = request.session.get("name", "world")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>FastAPI + htag</title></head><body>"
        "<h1>FastAPI home</h1>"
        f"<p>Clicks counted by the htag app: <b data-test='clicks'>{clicks}</b></p>"
        f"<p>Name: <b data-test='name'>{html.escape(str(name))}</b></p>"
        "<p><a href='/ui/' data-test='to-ui'>open the htag counter</a></p>"
        "<form action='/name'><input name='value' data-test='name-input'>"
        "<button data-test='set-name'>set my name</button></form>"
        "</body></html>"
    )


@app.get("/name")
async def set_name(request: Request, value: str = "world") -> RedirectResponse:
    request.session["name"] = value
    return RedirectResponse("/ui/", status_code=303)


@app.get("/logout")
async def logout(request: Request) -> RedirectResponse:
    request.session.clear()  # the session, its cookie and its htag process go
    return RedirectResponse("/", status_code=303)


@app.get("/api/session")
async def read_session(request: Request) -> Dict[str, Any]:
    return {"clicks": request.session.get("clicks", 0), "name": request.session.get("name")}
