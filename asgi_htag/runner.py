"""Runner: a Starlette application wired with asgi_htag's pieces, plus ``.run()``.

This is the only module that imports Starlette and uvicorn.
"""
import contextlib
import dataclasses
import logging
from typing import Any, AsyncIterator, List, Optional, Sequence

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute

from ._types import Receive, Scope, Send
from .app import ROOT_PATH_KEY, AppOptions, Engine, app_reference

logger = logging.getLogger(__name__)


class _LazySession:
    """SessionMiddleware built at first use, so that constructing a Runner (which happens
    again in the fork server when it imports the server module) has no side effect."""

    def __init__(self, app: Any, engine: Engine) -> None:
        self.app = app
        self.engine = engine
        self._mw: Optional[Any] = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self._mw is None:
            self._mw = self.engine.session_middleware(self.app)
        await self._mw(scope, receive, send)


class _InteractionEndpoint:
    """ASGI endpoint for ``/_htag/{app_id}/ws`` and ``/_htag/{app_id}/interact``."""

    def __init__(self, engine: Engine, kind: str) -> None:
        self.engine = engine
        self.kind = kind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app_id = scope.get("path_params", {}).get("app_id", "")
        await self.engine.interaction_endpoint(scope, receive, send, app_id, self.kind)


class Runner(Starlette):
    """Serve htag apps with Starlette: ``Runner(App).run()``.

    Args:
        obj: the app served at ``/`` (a Tag subclass or a "module:Class" string), or None.
        host, port: where :meth:`run` listens.
        debug: Python tracebacks in the page (and Starlette's debug mode).
        parano: encrypt every interaction and push payload (see asgi_htag.crypto).
        http_only, timeout_interaction, timeout_inactivity, timeout_abandoned: defaults for
            every app served (see HtagASGI);
            :meth:`handle` can override them per route.
        routes, middleware: more Starlette routes and middleware (they run inside the
            session middleware, so ``request.session`` is the apps' session).
        **engine_options: ``state_dir``, ``runtime_dir``, ``secret``, ``store``,
            ``max_processes``, ``max_message_bytes``, ``allowed_origins``,
            ``process_loop``, ``gc_freeze``, ``process_batch_scheduling``,
            ``worker_batch_scheduling``, ``session_cookie``... (see Engine).
    """

    def __init__(
        self,
        obj: Any = None,
        *,
        host: str = "0.0.0.0",
        port: int = 8000,
        debug: bool = False,
        parano: bool = False,
        http_only: bool = False,
        timeout_interaction: float = 60,
        timeout_inactivity: float = 0,
        timeout_abandoned: float = 120,
        routes: Optional[Sequence[BaseRoute]] = None,
        middleware: Optional[Sequence[Middleware]] = None,
        **engine_options: Any,
    ) -> None:
        self.engine = Engine(**engine_options)
        self.server_host = host
        self.server_port = port
        self.defaults = AppOptions(
            http_only=http_only,
            parano=parano,
            debug=debug,
            timeout_interaction=timeout_interaction,
            timeout_inactivity=timeout_inactivity,
            timeout_abandoned=timeout_abandoned,
        )
        self._refs: List[str] = []
        all_routes: List[BaseRoute] = [
            WebSocketRoute("/_htag/{app_id}/ws", _InteractionEndpoint(self.engine, "ws")),
            Route("/_htag/{app_id}/interact", _InteractionEndpoint(self.engine, "interact"), methods=["POST"]),
        ]
        all_routes.extend(routes or [])
        if obj is not None:
            ref = app_reference(obj)
            self._refs.append(ref)

            async def index(request: Request) -> Response:
                return await self.handle(request, ref)

            all_routes.append(Route("/", index, methods=["GET", "HEAD"]))
        super().__init__(
            debug=debug,
            routes=all_routes,
            middleware=[Middleware(_LazySession, engine=self.engine), *(middleware or [])],
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[None]:
        await self.engine.startup(self._refs)
        self.engine.server_started()
        try:
            yield
        finally:
            await self.engine.shutdown()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # where this Runner's /_htag/... routes are: a page rendered by a route inside a
        # Mount of this Runner has a longer root_path, but its interactions come here
        scope[ROOT_PATH_KEY] = scope.get("root_path", "")
        await super().__call__(scope, receive, send)

    async def handle(
        self,
        request: Request,
        obj: Any,
        *,
        http_only: Optional[bool] = None,
        parano: Optional[bool] = None,
        debug: Optional[bool] = None,
        timeout_interaction: Optional[float] = None,
        timeout_inactivity: Optional[float] = None,
        timeout_abandoned: Optional[float] = None,
    ) -> Response:
        """Render the page of ``obj`` (a Tag subclass or "module:Class") for this request;
        the keyword arguments override the Runner's defaults for this app."""
        ref = app_reference(obj)
        overrides = {
            k: v
            for k, v in dict(
                http_only=http_only,
                parano=parano,
                debug=debug,
                timeout_interaction=timeout_interaction,
                timeout_inactivity=timeout_inactivity,
                timeout_abandoned=timeout_abandoned,
            ).items()
            if v is not None
        }
        opts = dataclasses.replace(self.defaults, **overrides)
        status, page = await self.engine.render_page(request.scope, ref, opts)
        return HTMLResponse(page, status_code=status, headers={"cache-control": "no-store"})

    def run(self, **uvicorn_options: Any) -> None:
        """Serve with uvicorn on ``host``:``port`` (extra keyword arguments go to uvicorn)."""
        import uvicorn

        options = {"host": self.server_host, "port": self.server_port, "log_level": "info"}
        options.update(uvicorn_options)
        uvicorn.run(self, **options)


__all__ = ("Runner",)
