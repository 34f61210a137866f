"""The Runner used by the server-level tests (served by a real uvicorn/gunicorn)."""
import os

from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse

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
        return None
    from asgi_htag.redis_store import RedisStore

    return RedisStore(url)


app = Runner(
    apps.Counter,
    store=_store(),
    max_processes=int(os.environ.get("TEST_MAX_PROCESSES", "1000")),
    zygote_grace_seconds=float(os.environ.get("TEST_ZYGOTE_GRACE", "1")),
    debug=os.environ.get("TEST_DEBUG") == "1",
    middleware=[Middleware(WorkerPid)],
)


async def pusher(request: Request):
    return await request.app.handle(request, apps.Pusher)


async def pusher_http(request: Request):
    return await request.app.handle(request, apps.Pusher, http_only=True)


async def parano(request: Request):
    return await request.app.handle(request, apps.Counter, parano=True)


async def parano_http(request: Request):
    return await request.app.handle(request, apps.Counter, parano=True, http_only=True)


async def parano_pusher(request: Request):
    return await request.app.handle(request, apps.Pusher, parano=True)


async def http_counter(request: Request):
    return await request.app.handle(request, apps.Counter, http_only=True)


async def query(request: Request):
    return await request.app.handle(request, "tests.apps:Query")


async def state(request: Request):
    return await request.app.handle(request, apps.State)


async def slow(request: Request):
    return await request.app.handle(request, apps.Slow, timeout_interaction=1)


async def stuck(request: Request):
    return await request.app.handle(request, apps.Stuck, timeout_interaction=1)


async def crashy(request: Request):
    return await request.app.handle(request, apps.Crashy)


async def inactive(request: Request):
    return await request.app.handle(request, apps.Counter, timeout_inactivity=1)


async def inactive_ticker(request: Request):
    return await request.app.handle(request, apps.Ticker, timeout_inactivity=1)


async def set_value(request: Request):
    request.session["from_route"] = request.query_params.get("v", "")
    return PlainTextResponse("ok")


async def get_value(request: Request):
    return JSONResponse({"from_app": request.session.get("from_app"), "keys": sorted(request.session.keys())})


async def stats(request: Request):
    return JSONResponse(await request.app.engine.pool.stats())


app.add_route("/pusher", pusher)
app.add_route("/http", http_counter)
app.add_route("/parano", parano)
app.add_route("/parano-http", parano_http)
app.add_route("/parano-pusher", parano_pusher)
app.add_route("/pusher-http", pusher_http)
app.add_route("/query", query)
app.add_route("/state", state)
app.add_route("/slow", slow)
app.add_route("/crashy", crashy)
app.add_route("/stuck", stuck)
app.add_route("/inactive", inactive)
app.add_route("/inactive-ticker", inactive_ticker)
app.add_route("/set", set_value)
app.add_route("/get", get_value)
app.add_route("/_stats", stats)
