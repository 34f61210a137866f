"""A minimal IN-PROCESS htag runner: the floor asgi_htag is compared with.

A raw ASGI app (no asgi_htag import, no isolation, no session store) that keeps one
``htag.render.HRenderer`` per session in a dict of the web process itself
(cookie -> HRenderer). It is served by the same uvicorn as bench/server.py (same --loop,
same --http), so what separates the two is what asgi_htag adds: the session store, the
process per session and the Unix-socket hop.

Routes:
* ``GET /`` (ws page) and ``GET /http`` (http page): a new session (no or unknown cookie)
  builds a new HRenderer ("cold"), a known one re-renders its HRenderer ("warm").
* ``WEBSOCKET /ws``: each text frame is an htag interaction; the answer is
  ``json.dumps(actions)``.
* ``POST /interact``: one interaction, the actions as JSON.

Pages carry ``var cfg = {...};`` with the same shape as asgi_htag's (mode, ws, post,
token), so one bench client drives both servers.

Run with the repository root on PYTHONPATH:
    uvicorn bench.inprocess_runner:app --loop uvloop
"""
import json
import secrets
from typing import Any, Awaitable, Callable, Dict, Optional, Union

from htag.render import HRenderer

from tests.apps import Counter

COOKIE = "bench_sid"

JS = """
var cfg = %s;
var ws = null;
function interact(o) {
  if (cfg.mode === "http") {
    fetch(cfg.post + "?t=" + cfg.token, {method: "POST", body: JSON.stringify(o)})
      .then(function (r) { return r.text(); }).then(action);
  } else {
    ws.send(JSON.stringify(o));
  }
}
if (cfg.mode === "http") {
  window.addEventListener("load", function () { start(); });
} else {
  ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + cfg.ws + "?t=" + cfg.token);
  ws.onopen = function () { start(); };
  ws.onmessage = function (e) { action(e.data); };
}
"""

# session id -> its HRenderer (and the token its pages carry)
SESSIONS: Dict[str, HRenderer] = {}


def _cookie(scope: Dict[str, Any]) -> Optional[str]:
    for k, v in scope.get("headers") or []:
        if k == b"cookie":
            for part in v.decode("latin-1").split(";"):
                name, _, value = part.strip().partition("=")
                if name == COOKIE:
                    return value
    return None


async def _respond(send: Any, status: int, body: bytes, ctype: bytes, extra: Optional[list] = None) -> None:
    headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})


async def serve_page(scope: Dict[str, Any], send: Any, mode: str, sessions: Dict[str, Any],
                     create: Callable[[str], Awaitable[Any]], render: Callable[[Any], Awaitable[bytes]]) -> None:
    """``GET /`` (``mode`` "ws") or ``/http`` ("http"): a new session (no or unknown cookie)
    gets ``create(the page's JS)``, kept in ``sessions``; the page is ``render(it)``."""
    sid = _cookie(scope)
    extra = []
    target = sessions.get(sid) if sid else None
    if target is None:
        sid = secrets.token_urlsafe(24)
        cfg = {"mode": mode, "ws": "/ws", "post": "/interact", "token": sid[:8], "parano": False}
        target = sessions[sid] = await create(JS % json.dumps(cfg))
        extra.append((b"set-cookie", f"{COOKIE}={sid}; Path=/; HttpOnly; SameSite=Lax".encode()))
    await _respond(send, 200, await render(target), b"text/html; charset=utf-8", extra)


async def _create(js: str) -> HRenderer:
    return HRenderer(Counter, js, init=((), {}))


async def _render(hr: HRenderer) -> bytes:
    return str(hr).encode()


async def _page(scope: Dict[str, Any], send: Any, mode: str) -> None:
    await serve_page(scope, send, mode, SESSIONS, _create, _render)


async def read_body(receive: Any) -> Optional[bytes]:
    """A request's whole body; None if the client went away."""
    body = b""
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


async def _answer(hr: HRenderer, body: Union[str, bytes]) -> str:
    """One interaction (the page's JSON) -> the actions, as JSON."""
    o = json.loads(body)
    actions = await hr.interact(o["id"], o["method"], o.get("args") or [], o.get("kargs") or {}, o.get("event"))
    return json.dumps(actions)


async def serve_post(scope: Dict[str, Any], receive: Any, send: Any, sessions: Dict[str, Any],
                     answer: Callable[[Any, Union[str, bytes]], Awaitable[str]]) -> None:
    """``POST /interact``: one interaction of the cookie's session (``sessions[sid]``),
    answered with ``answer(that session, the body)``."""
    body = await read_body(receive)
    if body is None:
        return
    target = sessions.get(_cookie(scope) or "")
    if target is None:
        await _respond(send, 200, b'{"gone":true}', b"application/json")
        return
    await _respond(send, 200, (await answer(target, body)).encode(), b"application/json")


async def serve_websocket(scope: Dict[str, Any], receive: Any, send: Any, sessions: Dict[str, Any],
                          answer: Callable[[Any, Union[str, bytes]], Awaitable[str]]) -> None:
    """``WEBSOCKET /ws``: each text frame is an interaction of the cookie's session
    (``sessions[sid]``), answered with ``answer(that session, the frame)``."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    target = sessions.get(_cookie(scope) or "")
    if target is None:
        await send({"type": "websocket.close", "code": 4001})
        return
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message["type"] != "websocket.receive":
            continue
        body = message.get("text") or message.get("bytes") or b"{}"
        await send({"type": "websocket.send", "text": await answer(target, body)})


def asgi_app(page: Callable[[Dict[str, Any], Any, str], Awaitable[None]],
             post: Callable[[Dict[str, Any], Any, Any], Awaitable[None]],
             websocket: Callable[[Dict[str, Any], Any, Any], Awaitable[None]],
             stats: Callable[[], Dict[str, Any]],
             on_shutdown: Optional[Callable[[], Awaitable[None]]] = None) -> Callable[..., Awaitable[None]]:
    """The routes both bench runners serve (see the module's docstring), around their
    own page, POST, websocket and stats handlers."""

    async def lifespan(receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if on_shutdown is not None:
                    await on_shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await lifespan(receive, send)
            return
        path = scope.get("path", "/")
        if kind == "websocket":
            if path == "/ws":
                await websocket(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        if kind != "http":
            return
        method = scope.get("method")
        if method in ("GET", "HEAD") and path in ("/", "/http"):
            await page(scope, send, "http" if path == "/http" else "ws")
        elif method == "POST" and path == "/interact":
            await post(scope, receive, send)
        elif method == "GET" and path == "/_stats":
            await _respond(send, 200, json.dumps(stats()).encode(), b"application/json")
        else:
            await _respond(send, 404, b"not found", b"text/plain")

    return app


async def _post(scope: Dict[str, Any], receive: Any, send: Any) -> None:
    await serve_post(scope, receive, send, SESSIONS, _answer)


async def _websocket(scope: Dict[str, Any], receive: Any, send: Any) -> None:
    await serve_websocket(scope, receive, send, SESSIONS, _answer)


app = asgi_app(_page, _post, _websocket, lambda: {"sessions": len(SESSIONS)})
