"""The Runner used by the server-level tests (served by a real uvicorn/gunicorn)."""
import json
import os

from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route

from asgi_htag import Runner
from tests import apps

class WorkerPid:
    """Tells the tests which worker answered: an x-worker-pid header on every HTTP response
    and on every websocket handshake."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        pid = str(os.getpid()).encode()

        async def send_with_pid(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [(b"x-worker-pid", pid)]
            elif message["type"] == "websocket.accept":
                message["headers"] = list(message.get("headers", [])) + [(b"x-worker-pid", pid)]
            await send(message)

        await self.app(scope, receive, send_with_pid)


def _store():
    url = os.environ.get("TEST_REDIS_URL")
    if not url:
        if os.environ.get("TEST_STORE_MAX_AGE"):  # sessions that expire within a test
            from asgi_htag.sessions import SQLiteStore

            return SQLiteStore(
                os.path.join(os.environ["ASGI_HTAG_STATE_DIR"], "sessions.sqlite3"),
                max_age_seconds=float(os.environ["TEST_STORE_MAX_AGE"]),
            )
        return None
    from asgi_htag.redis_store import RedisStore

    return RedisStore(url)


# unset: the Engine's default (False)
_WORKER_BATCH = {"1": True, "0": False, "auto": "auto"}
_options = {}
if os.environ.get("TEST_WORKER_BATCH_SCHEDULING"):
    _options["worker_batch_scheduling"] = _WORKER_BATCH[os.environ["TEST_WORKER_BATCH_SCHEDULING"]]

app = Runner(
    apps.Counter,
    store=_store(),
    max_processes=int(os.environ.get("TEST_MAX_PROCESSES", "1000")),
    zygote_grace_seconds=float(os.environ.get("TEST_ZYGOTE_GRACE", "1")),
    debug=os.environ.get("TEST_DEBUG") == "1",
    process_loop=os.environ.get("TEST_PROCESS_LOOP", "auto"),
    gc_freeze=os.environ.get("TEST_GC_FREEZE", "1") == "1",
    process_batch_scheduling=os.environ.get("TEST_BATCH_SCHEDULING", "1") == "1",
    middleware=[Middleware(WorkerPid)],
    session_cookie=json.loads(os.environ.get("TEST_SESSION_COOKIE", "{}")),
    **_options,
)


def page_of(obj, **overrides):
    """A route serving another htag app, the way users write it:
    ``async def route(request): return await request.app.handle(request, App, ...)``."""

    async def route(request: Request):
        return await request.app.handle(request, obj, **overrides)

    return route


PAGES = {
    "/pusher": page_of(apps.Pusher),
    "/pusher-http": page_of(apps.Pusher, http_only=True),
    "/http": page_of(apps.Counter, http_only=True),
    "/parano": page_of(apps.Counter, parano=True),
    "/parano-http": page_of(apps.Counter, parano=True, http_only=True),
    "/parano-pusher": page_of(apps.Pusher, parano=True),
    "/query": page_of("tests.apps:Query"),  # an app given by name
    "/state": page_of(apps.State),
    "/state-http": page_of(apps.State, http_only=True),
    "/slow": page_of(apps.Slow, timeout_interaction=1),
    "/stuck": page_of(apps.Stuck, timeout_interaction=1),
    "/slow-init": page_of(apps.SlowInit, timeout_interaction=1),
    "/bad-init": page_of(apps.BadInit),
    "/replacer": page_of(apps.Replacer),
    "/rows": page_of(apps.Rows),
    "/lister": page_of(apps.Lister),
    "/bad-init-debug": page_of(apps.BadInit, debug=True),
    "/slow-render": page_of(apps.SlowRender, timeout_interaction=1),
    "/crashy": page_of(apps.Crashy),
    "/crashy-http": page_of(apps.Crashy, http_only=True),
    "/crashy-parano": page_of(apps.Crashy, parano=True),
    "/crashy-parano-http": page_of(apps.Crashy, parano=True, http_only=True),
    "/quitter": page_of(apps.Quitter),
    "/loop": page_of(apps.LoopName),
    "/napper-http": page_of(apps.Napper, http_only=True),
    "/long-nap": page_of(apps.LongNap, timeout_interaction=1),
    "/background-block": page_of(apps.BackgroundBlock, timeout_interaction=1),
    "/progress": page_of(apps.Progress),
    "/flash": page_of(apps.Flash),
    "/huge": page_of(apps.Huge),
    "/bad-render": page_of(apps.BadRender),
    "/holder": page_of(apps.Holder),
    "/holder-http": page_of(apps.Holder, http_only=True),
    "/inactive": page_of(apps.Counter, timeout_inactivity=1),
    "/inactive-ticker": page_of(apps.Ticker, timeout_inactivity=1),
    "/inactive-sleeper": page_of(apps.Sleeper, timeout_inactivity=1),
    "/abandon": page_of(apps.Counter, timeout_abandoned=1),
    "/abandon-http": page_of(apps.Counter, timeout_abandoned=1, http_only=True),
    "/abandon-parano-http": page_of(apps.Counter, timeout_abandoned=1, http_only=True, parano=True),
    "/inactive-http": page_of(apps.Counter, timeout_inactivity=1, http_only=True),
}


async def set_value(request: Request):
    request.session["from_route"] = request.query_params.get("v", "")
    return PlainTextResponse("ok")


async def logout(request: Request):
    request.session.clear()
    return PlainTextResponse("out")


async def logout_by_pop(request: Request):
    request.session.pop("from_route", None)  # a logout written the Starlette way
    return PlainTextResponse("out")


async def revoke(request: Request):
    """The session's row deleted from the store directly (an admin tool, another host's
    logout): unlike clear(), its processes are not told."""
    await request.app.engine.store.delete(request.session.sid)
    return PlainTextResponse("revoked")


async def login(request: Request):
    request.session["user"] = request.query_params.get("user", "alice")
    request.session.regenerate_id()  # what to do after a login: the id seen before is worthless
    return PlainTextResponse("in")


async def get_value(request: Request):
    return JSONResponse({"from_app": request.session.get("from_app"), "keys": sorted(request.session.keys())})


async def gc_state(request: Request):
    import gc

    return JSONResponse({"frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())})


async def backend(request: Request):
    import sniffio

    return PlainTextResponse(sniffio.current_async_library())


async def stats(request: Request):
    return JSONResponse(await request.app.engine.pool.stats())


for path, route in PAGES.items():
    app.add_route(path, route)
app.add_route("/set", set_value)
app.add_route("/get", get_value)
app.add_route("/logout", logout)
app.add_route("/login", login)
app.add_route("/revoke", revoke)
app.add_route("/logout-pop", logout_by_pop)
app.add_route("/_stats", stats)
app.add_route("/_gc", gc_state)
app.add_route("/_backend", backend)
# a route inside a Mount of the Runner: its page's interactions still go to the Runner's /_htag/
app.router.routes.append(Mount("/admin", routes=[Route("/", page_of(apps.Counter)), Route("/http", page_of(apps.Counter, http_only=True))]))
