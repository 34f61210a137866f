"""The asgi_htag server the benchmark measures (served by uvicorn, started by bench/run.py).

Run with the repository root on PYTHONPATH:
    uvicorn bench.server:app --loop uvloop

Routes: ``/`` the Counter over a websocket, ``/http`` the same Counter in http_only mode,
``/_stats`` the fork server's view (its pid and its children's pids), ``/_ping`` a route that
does nothing (the head-of-line measurement's reference burst).
"""
import os

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from asgi_htag import Runner
from tests.apps import Counter

app = Runner(
    Counter,
    max_processes=int(os.environ.get("BENCH_MAX_PROCESSES", "2000")),
    zygote_grace_seconds=2,
    worker_batch_scheduling=os.environ.get("BENCH_WORKER_BATCH") == "1",  # bench/run.py --worker-batch
)


async def http_counter(request: Request) -> Response:
    return await request.app.handle(request, Counter, http_only=True)


async def stats(request: Request) -> Response:
    return JSONResponse(await request.app.engine.pool.stats())


async def ping(request: Request) -> Response:
    return PlainTextResponse("pong")


app.add_route("/http", http_counter)
app.add_route("/_stats", stats)
app.add_route("/_ping", ping)
