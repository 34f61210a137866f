"""asgi_htag.quart_session: Quart's ``session`` is the asgi_htag session of the request.

In-process (Quart behind SessionMiddleware, driven through httpx's ASGI transport); the
example served by a real uvicorn, with the htag app reading what Quart writes and the
other way round, is in test_frameworks.py."""
import json
from typing import Any, Iterator

import anyio
import httpx
import pytest
from quart import Quart, jsonify, request, session

from asgi_htag import MemoryStore, SessionMiddleware
from asgi_htag.exceptions import ConfigurationError
from asgi_htag.quart_session import ScopeSession, ScopeSessionInterface
from asgi_htag.sessions import Session

SECRET = "s" * 32
COOKIE = "asgi_htag_session"


def make_app() -> Quart:
    q = Quart("quart_session_test")
    q.session_interface = ScopeSessionInterface()

    @q.route("/set")
    async def set_value() -> Any:
        for key, value in request.args.items():
            session[key] = json.loads(value)
        return "ok"

    @q.route("/get")
    async def get_all() -> Any:
        return jsonify(data=dict(session), kind=type(session._get_current_object()).__name__)  # type: ignore[attr-defined]

    @q.route("/pop/<key>")
    async def pop(key: str) -> Any:
        return jsonify(popped=session.pop(key, None))

    @q.route("/logout")
    async def logout() -> Any:
        session.clear()
        return "bye"

    @q.route("/permanent")
    async def permanent() -> Any:
        session.permanent = False
        session["seen"] = True
        return jsonify(permanent=session.permanent, keys=sorted(session))

    @q.route("/nojson")
    async def nojson() -> Any:
        session["bad"] = object()
        return "never sent"

    @q.route("/badkey")
    async def badkey() -> Any:
        try:
            session[1] = "x"  # type: ignore[index]
        except TypeError as exc:
            return jsonify(error=str(exc))
        return "accepted"

    @q.route("/flags")
    async def flags() -> Any:
        before = (session.new, session.modified)
        session["n"] = 1
        return jsonify(new=before[0], modified_before=before[1], modified_after=session.modified)

    return q


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def client(store: MemoryStore) -> Iterator[Any]:
    app = SessionMiddleware(make_app(), store=store, secret=SECRET)

    def call(path: str, cookies: Any = None, raw_cookie: Any = None) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
            headers = {"cookie": raw_cookie} if raw_cookie is not None else None
            async with httpx.AsyncClient(transport=transport, base_url="http://t", cookies=cookies) as c:
                return await c.get(path, headers=headers)

        return anyio.run(go)

    yield call


def _raised(fn: Any, *args: Any) -> BaseException:
    """What ``fn(*args)`` raised, out of the exception group newer Quarts wrap it in."""
    try:
        fn(*args)
    except BaseException as exc:  # noqa: B036 - inspected below
        while hasattr(exc, "exceptions") and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        return exc
    raise AssertionError("nothing was raised")


def _cookie(resp: httpx.Response) -> str:
    [header] = [h for h in resp.headers.get_list("set-cookie") if h.startswith(COOKIE + "=")]
    return header.split(";")[0].split("=", 1)[1]


def test_quart_writes_land_in_the_asgi_htag_store_behind_one_cookie(client: Any, store: MemoryStore) -> None:
    first = client('/set?name="Bob"&n=3')
    assert first.status_code == 200
    assert [h.split("=")[0] for h in first.headers.get_list("set-cookie")] == [COOKIE]  # no Quart cookie
    cookie = _cookie(first)
    [sid] = list(store._rows)  # type: ignore[attr-defined]
    assert anyio.run(store.load, sid) == {"name": "Bob", "n": 3}
    again = client("/get", {COOKIE: cookie})
    assert again.json() == {"data": {"name": "Bob", "n": 3}, "kind": "ScopeSession"}
    assert "set-cookie" not in again.headers  # nothing changed: no cookie to send
    assert "Cookie" in again.headers.get("vary", "")


def test_what_the_store_holds_from_elsewhere_is_what_quart_reads(client: Any, store: MemoryStore) -> None:
    cookie = _cookie(client('/set?a=1'))
    [sid] = list(store._rows)  # type: ignore[attr-defined]
    anyio.run(store.apply, sid, {"clicks": 7}, [])  # as the htag app's process diff does
    assert client("/get", {COOKIE: cookie}).json()["data"] == {"a": 1, "clicks": 7}


def test_clear_is_a_logout_and_popping_the_last_key_drops_the_session(client: Any, store: MemoryStore) -> None:
    cookie = _cookie(client('/set?a=1'))
    out = client("/logout", {COOKIE: cookie})
    assert out.status_code == 200 and "Max-Age=0" in out.headers["set-cookie"]
    assert store._rows == {}  # type: ignore[attr-defined]
    cookie = _cookie(client('/set?only=1'))
    gone = client("/pop/only", {COOKIE: cookie})
    assert gone.json() == {"popped": 1} and "Max-Age=0" in gone.headers["set-cookie"]
    assert store._rows == {}  # type: ignore[attr-defined]


def test_permanent_writes_no_key_into_the_shared_session(client: Any, store: MemoryStore) -> None:
    resp = client("/permanent")
    assert resp.json() == {"permanent": True, "keys": ["seen"]}
    [sid] = list(store._rows)  # type: ignore[attr-defined]
    assert anyio.run(store.load, sid) == {"seen": True}


def test_new_and_modified_follow_the_asgi_htag_session(client: Any) -> None:
    assert client("/flags").json() == {"new": True, "modified_before": False, "modified_after": True}
    cookie = _cookie(client("/set?x=1"))
    assert client("/flags", {COOKIE: cookie}).json() == {"new": False, "modified_before": False, "modified_after": True}


def test_a_value_json_cannot_hold_fails_the_request_and_loses_nothing(client: Any, store: MemoryStore) -> None:
    cookie = _cookie(client('/set?keep="me"'))
    exc = _raised(client, "/nojson", {COOKIE: cookie})  # under a server: a 500, the error in the log
    assert isinstance(exc, TypeError) and "'bad' is not JSON-serializable" in str(exc)
    [sid] = list(store._rows)  # type: ignore[attr-defined]
    assert anyio.run(store.load, sid) == {"keep": "me"}
    assert client("/get", {COOKIE: cookie}).json()["data"] == {"keep": "me"}


def test_a_key_that_is_not_a_string_is_refused(client: Any) -> None:
    assert client("/badkey").json() == {"error": "session keys must be str, not int"}


@pytest.mark.parametrize(
    "cookie",
    [b"", b"x", b"a.b", b"\x01" * 10, b"A" * 5000, b"%00%ff", b"not.a.signature", "é".encode() * 10, b"\xff\xfe"],
)
def test_hostile_cookies_give_quart_a_fresh_empty_session(client: Any, store: MemoryStore, cookie: bytes) -> None:
    client('/set?secret="mine"')
    resp = client("/get", raw_cookie=COOKIE.encode() + b"=" + cookie)
    assert resp.status_code == 200 and resp.json()["data"] == {}


def test_without_the_middleware_quart_gets_a_clear_configuration_error() -> None:
    app = make_app()

    async def go() -> None:
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            await c.get("/get")

    exc = _raised(anyio.run, go)
    assert isinstance(exc, ConfigurationError) and "needs asgi_htag.SessionMiddleware" in str(exc)


def test_scope_session_is_a_plain_view_of_the_session() -> None:
    inner = Session(MemoryStore(), sid="S" * 32, data={"a": 1})
    view = ScopeSession(inner)
    view["b"] = [1, 2]
    assert dict(inner) == {"a": 1, "b": [1, 2]} and "b" in view and len(view) == 2
    del view["a"]
    assert sorted(view) == ["b"] and inner.changed_keys() == {"a", "b"}
    view.accessed = False  # Quart may reset it: what the session saw stays seen
    assert view.accessed is True
    assert ScopeSessionInterface().is_null_session(view) is False
    assert ScopeSessionInterface().is_null_session({}) is True
