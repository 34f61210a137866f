"""The asgi_htag server the benchmark measures (served by uvicorn, started by bench/run.py).

Run with the repository root on PYTHONPATH:
    uvicorn bench.server:app --loop uvloop

Routes: ``/`` the Counter over a websocket, ``/http`` the same Counter in http_only mode,
``/_stats`` the fork server's view (its pid and its children's pids) with the worker's
``worker_batch_scheduling`` (as configured) and how many times "auto" switched the
worker's policy (and backed off), ``/_ping`` a route that does nothing (the head-of-line measurement's
reference burst).
"""
import os

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from asgi_htag import Runner
from tests.apps import Counter

# bench/run.py --worker-batch on|off|auto; without it, the Engine's default
_WORKER_BATCH = {"on": True, "off": False, "auto": "auto"}
_options = {}
if os.environ.get("BENCH_WORKER_BATCH"):
    _options["worker_batch_scheduling"] = _WORKER_BATCH[os.environ["BENCH_WORKER_BATCH"]]
app = Runner(
    Counter,
    max_processes=int(os.environ.get("BENCH_MAX_PROCESSES", "2000")),
    zygote_grace_seconds=2,
    **_options,
)


async def http_counter(request: Request) -> Response:
    return await request.app.handle(request, Counter, http_only=True)


async def stats(request: Request) -> Response:
    engine = request.app.engine
    out = await engine.pool.stats()
    load = engine.load_scheduling
    out["worker_batch_scheduling"] = engine.worker_batch_scheduling  # as configured
    out["worker_policy_switches"] = load.switches if load is not None else 0
    out["worker_policy_backoffs"] = load.backoffs if load is not None else 0
    return JSONResponse(out)


async def ping(request: Request) -> Response:
    return PlainTextResponse("pong")


app.add_route("/http", http_counter)
app.add_route("/_stats", stats)
app.add_route("/_ping", ping)
