"""HtagASGI mounted under /ui in a plain Starlette app."""
import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from asgi_htag import HtagASGI
from tests import apps


async def home(request):
    return PlainTextResponse("home")


app = Starlette(
    routes=[
        Route("/", home),
        Mount(
            "/ui",
            HtagASGI(
                apps.Counter,
                zygote_grace_seconds=float(os.environ.get("TEST_ZYGOTE_GRACE", "1")),
                worker_batch_scheduling=True,  # asked for, and still not applied: a mount has no lifespan
            ),
        ),
    ]
)
