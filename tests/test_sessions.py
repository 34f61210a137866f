"""Tests of asgi_htag.sessions: cookie signing, the middleware, the stores."""
import contextlib
import functools
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import anyio
import pytest

from asgi_htag import sessions
from asgi_htag.config import Secret
from asgi_htag.exceptions import ConfigurationError
from asgi_htag.sessions import (
    MemoryStore,
    Session,
    SessionMiddleware,
    SessionStore,
    SQLiteStore,
    default_store,
    sign_sid,
    unsign_cookie,
)

SECRET = "s3cret-for-tests-0123456789"
OTHER_SECRET = "another-secret-abcdefghijkl"
COOKIE = "asgi_htag_session"
REPO_ROOT = Path(__file__).resolve().parent.parent


# -- helpers -----------------------------------------------------------------------------


async def raw_app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
    """A tiny ASGI app driven by its path: /set/<k>/<v>, /append, /clear, /pop/<k>[/<k2>]
    (<k2> written meanwhile by someone else), /regenerate, /invalidate, /get/<k> (reads a
    key before it answers), /peek (reads nothing); it answers with the session id and data."""
    session: Session = scope["session"]
    parts = scope["path"].strip("/").split("/")
    if parts[0] == "set":
        session[parts[1]] = parts[2]
    elif parts[0] == "append":
        session.setdefault("items", [])
        session["items"].append(len(session["items"]))
    elif parts[0] == "clear":
        session.clear()
    elif parts[0] == "pop":
        session.pop(parts[1], None)
        if len(parts) > 2:  # meanwhile another worker writes to the same session
            await session.store.apply(session.sid, {parts[2]: "from-elsewhere"}, [])
    elif parts[0] == "regenerate":
        session.regenerate_id()
    elif parts[0] == "invalidate":
        session.invalidate()
    elif parts[0] == "get":
        session.get(parts[1])
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    # Read after the start, once the middleware has committed and given the session its id.
    if parts[0] == "peek":
        body = b"{}"
    else:
        body = json.dumps({"sid": session.sid, "data": dict(session)}).encode()
    await send({"type": "http.response.body", "body": body})


def http_scope(path: str, headers: List[Tuple[bytes, bytes]], scheme: str = "http") -> Dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": scheme,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 12345),
        "server": ("testserver", 80),
    }


def request(
    app: Any, path: str, *, cookie: Optional[str] = None, headers: Optional[List[Tuple[bytes, bytes]]] = None,
    scheme: str = "http",
) -> Tuple[Dict[str, Any], Any]:
    """Run one GET through ``app``; returns (http.response.start message, decoded JSON body)."""
    all_headers = list(headers or [])
    if cookie is not None:
        all_headers.append((b"cookie", f"{COOKIE}={cookie}".encode()))
    sent: List[Dict[str, Any]] = []

    async def receive() -> Dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Dict[str, Any]) -> None:
        sent.append(message)

    async def main() -> None:
        await app(http_scope(path, all_headers, scheme), receive, send)

    anyio.run(main)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    return sent[0], json.loads(sent[1]["body"])


def set_cookies(start: Dict[str, Any]) -> List[str]:
    return [v.decode("latin-1") for k, v in start.get("headers", []) if k.lower() == b"set-cookie"]


def cookie_value(start: Dict[str, Any]) -> str:
    (header,) = set_cookies(start)
    first = header.split(";")[0]
    name, _, value = first.partition("=")
    assert name == COOKIE
    return value


def run(fn: Any, *args: Any) -> Any:
    return anyio.run(fn, *args)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def app(store: MemoryStore) -> SessionMiddleware:
    return SessionMiddleware(raw_app, store=store, secret=SECRET)


# -- signing -----------------------------------------------------------------------------

VALID_SID = "A" * 16 + "b_-9" * 4


def test_sign_unsign_round_trip() -> None:
    value = sign_sid(SECRET, VALID_SID)
    assert value.startswith(VALID_SID + ".")
    assert "=" not in value
    assert unsign_cookie(SECRET, value) == VALID_SID
    assert unsign_cookie(Secret(SECRET), value.encode()) == VALID_SID
    assert unsign_cookie(SECRET.encode(), value) == VALID_SID


@pytest.mark.parametrize(
    "value",
    [
        "",
        ".",
        "..",
        "../../etc/passwd",
        "../../etc/passwd." + "A" * 43,
        VALID_SID,
        VALID_SID + ".",
        "." + "A" * 43,
        VALID_SID + ".\x00" + "A" * 42,
        VALID_SID + "\x00." + "A" * 43,
        "é" * 16 + "." + "A" * 43,
        VALID_SID + "." + "é" * 43,
        "a.b.c.d.e.f.g.h",
        VALID_SID + "." + "A" * 43 + ".extra",
        "A" * 10_000,
        "A" * 5_000 + "." + "A" * 5_000,
        "A" * 8 + "." + "A" * 43,
        VALID_SID + "." + "A" * 43,
        VALID_SID + "." + "A" * 44,
        "null",
        '"' + VALID_SID + '"',
    ],
)
def test_unsign_rejects_hostile_values(value: str) -> None:
    assert unsign_cookie(SECRET, value) is None
    assert unsign_cookie(SECRET, value.encode("utf-8")) is None


def test_unsign_rejects_other_secret_and_tampering() -> None:
    value = sign_sid(OTHER_SECRET, VALID_SID)
    assert unsign_cookie(SECRET, value) is None
    good = sign_sid(SECRET, VALID_SID)
    sid, _, sig = good.partition(".")
    flipped = sig[:-1] + ("A" if sig[-1] != "A" else "B")
    assert unsign_cookie(SECRET, f"{sid}.{flipped}") is None
    other_sid = "B" + sid[1:]
    assert unsign_cookie(SECRET, f"{other_sid}.{sig}") is None
    # The signature is padded to 44 characters in plain base64: padding is not accepted.
    assert unsign_cookie(SECRET, good + "=") is None


def test_unsign_non_ascii_bytes_and_wrong_types() -> None:
    assert unsign_cookie(SECRET, b"\xff\xfe" * 20) is None
    assert unsign_cookie(SECRET, None) is None  # type: ignore[arg-type]
    assert unsign_cookie(SECRET, 12) is None  # type: ignore[arg-type]


def test_sign_rejects_bad_sid_and_short_secret() -> None:
    with pytest.raises(ValueError):
        sign_sid(SECRET, "../../etc/passwd")
    with pytest.raises(ValueError):
        sign_sid(SECRET, "short")
    with pytest.raises(ConfigurationError):
        sign_sid("too-short", VALID_SID)
    with pytest.raises(ConfigurationError):
        unsign_cookie("too-short", VALID_SID)


# -- middleware configuration ------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"secret": "short"},
        {"secret": 1234567890123456789},
        {"cookie_name": "bad name"},
        {"cookie_name": "a;b"},
        {"cookie_name": ""},
        {"max_age_seconds": 0},
        {"max_age_seconds": -5},
        {"max_age_seconds": 1.5},
        {"max_age_seconds": True},
        {"path": "relative"},
        {"path": "/a;b"},
        {"path": "/a b"},
        {"same_site": "sometimes"},
        {"same_site": "none", "https_only": False},
        {"https_only": "yes"},
        {"store": object()},
    ],
)
def test_middleware_validates_arguments(kwargs: Dict[str, Any]) -> None:
    options: Dict[str, Any] = {"store": MemoryStore(), "secret": SECRET}
    options.update(kwargs)
    with pytest.raises(ConfigurationError):
        SessionMiddleware(raw_app, **options)


def test_middleware_repr_hides_secret(app: SessionMiddleware) -> None:
    assert SECRET not in repr(app)
    assert SECRET not in repr(app.__dict__)


# -- middleware over raw http ------------------------------------------------------------


def test_new_session_sets_cookie_without_secure_on_http(app: SessionMiddleware) -> None:
    start, body = request(app, "/set/color/blue")
    (header,) = set_cookies(start)
    attrs = [a.strip() for a in header.split(";")]
    assert attrs[1:] == ["Path=/", f"Max-Age={14 * 24 * 3600}", "HttpOnly", "SameSite=Lax"]
    value = cookie_value(start)
    assert unsign_cookie(SECRET, value) == body["sid"]
    assert body["data"] == {"color": "blue"}
    assert (b"vary", b"Cookie") in start["headers"]


def test_secure_flag_follows_scheme_and_https_only(store: MemoryStore) -> None:
    auto = SessionMiddleware(raw_app, store=store, secret=SECRET)
    start, _ = request(auto, "/set/a/1", scheme="https")
    assert set_cookies(start)[0].endswith("; Secure")
    forced = SessionMiddleware(raw_app, store=store, secret=SECRET, https_only=True, same_site="strict",
                               path="/app", max_age_seconds=60, cookie_name=COOKIE)
    start, _ = request(forced, "/set/a/1")
    assert set_cookies(start)[0].endswith("; Path=/app; Max-Age=60; HttpOnly; SameSite=Strict; Secure")
    never = SessionMiddleware(raw_app, store=store, secret=SECRET, https_only=False)
    start, _ = request(never, "/set/a/1", scheme="https")
    assert "Secure" not in set_cookies(start)[0]
    cross_site = SessionMiddleware(raw_app, store=store, secret=SECRET, same_site="none")
    start, _ = request(cross_site, "/set/a/1")
    assert set_cookies(start)[0].endswith("; SameSite=None; Secure")


def test_value_survives_to_next_request(app: SessionMiddleware, store: MemoryStore) -> None:
    start, first = request(app, "/set/user/alice")
    cookie = cookie_value(start)
    start, second = request(app, "/set/lang/fr", cookie=cookie)
    assert second == {"sid": first["sid"], "data": {"user": "alice", "lang": "fr"}}
    assert set_cookies(start) == []  # the browser already holds this cookie
    assert run(store.load, first["sid"]) == {"user": "alice", "lang": "fr"}


def test_unmodified_session_sends_no_cookie(app: SessionMiddleware) -> None:
    start, first = request(app, "/set/k/v")
    cookie = cookie_value(start)
    start, body = request(app, "/read", cookie=cookie)
    assert body == first
    assert set_cookies(start) == []
    start, _ = request(app, "/peek")
    assert set_cookies(start) == []
    assert not any(k == b"vary" for k, _ in start["headers"])


def test_tampered_cookie_gets_fresh_session(app: SessionMiddleware) -> None:
    start, first = request(app, "/set/secret/42")
    cookie = cookie_value(start)
    tampered = cookie[:-2] + ("xx" if not cookie.endswith("xx") else "yy")
    start, body = request(app, "/read", cookie=tampered)
    assert body == {"sid": None, "data": {}}
    start, body = request(app, "/set/other/1", cookie=tampered)
    assert body["sid"] not in (None, first["sid"])
    assert body["data"] == {"other": "1"}


def test_foreign_secret_cookie_gets_fresh_session(app: SessionMiddleware) -> None:
    start, first = request(app, "/set/a/1")
    forged = sign_sid(OTHER_SECRET, first["sid"])
    _, body = request(app, "/read", cookie=forged)
    assert body == {"sid": None, "data": {}}


def test_unknown_sid_is_never_reused(app: SessionMiddleware) -> None:
    chosen = "C" * 32
    cookie = sign_sid(SECRET, chosen)  # validly signed, but the store never saw it
    start, body = request(app, "/set/a/1", cookie=cookie)
    assert body["sid"] not in (None, chosen)
    assert unsign_cookie(SECRET, cookie_value(start)) == body["sid"]


def test_many_junk_cookies_and_several_headers(app: SessionMiddleware) -> None:
    start, first = request(app, "/set/k/v")
    cookie = cookie_value(start)
    junk = "; ".join(f"junk{i}=../../etc/passwd\x01{i}" for i in range(50))
    headers = [
        (b"cookie", junk.encode("latin-1")),
        (b"cookie", b"=; ;;; novalue; \xff\xfe=\xfe"),
        (b"cookie", f'{COOKIE}=garbage; other=1; {COOKIE}="{cookie}"; tail=2'.encode()),
    ]
    start, body = request(app, "/read", headers=headers)
    assert body == first
    assert set_cookies(start) == []


def test_planted_copies_of_the_cookie_do_not_hide_the_real_one(app: SessionMiddleware) -> None:
    start, first = request(app, "/set/user/alice")
    cookie = cookie_value(start)
    # a browser sends longer-path cookies first: copies planted at a deeper path (say from a
    # sibling subdomain) come before the real one
    planted = "; ".join(f"{COOKIE}=planted{i}.{'A' * 43}" for i in range(20))
    _, body = request(app, "/read", headers=[(b"cookie", f"{planted}; {COOKIE}={cookie}".encode())])
    assert body == first


def test_oversized_cookie_is_ignored(app: SessionMiddleware) -> None:
    _, body = request(app, "/read", cookie="A" * 10_000)
    assert body == {"sid": None, "data": {}}


def test_in_place_mutation_is_saved(app: SessionMiddleware) -> None:
    start, _ = request(app, "/append")
    cookie = cookie_value(start)
    request(app, "/append", cookie=cookie)
    _, body = request(app, "/append", cookie=cookie)
    assert body["data"] == {"items": [0, 1, 2]}
    _, body = request(app, "/read", cookie=cookie)
    assert body["data"] == {"items": [0, 1, 2]}


def test_clear_drops_session_and_expires_cookie(app: SessionMiddleware, store: MemoryStore) -> None:
    start, first = request(app, "/set/user/bob")
    cookie = cookie_value(start)
    start, body = request(app, "/clear", cookie=cookie)
    assert body["data"] == {}
    (header,) = set_cookies(start)
    assert header.startswith(f"{COOKIE}=; Path=/; Max-Age=0;")
    assert run(store.load, first["sid"]) is None
    _, body = request(app, "/read", cookie=cookie)
    assert body == {"sid": None, "data": {}}


def test_popping_the_last_keys_drops_the_session_unless_others_wrote_meanwhile(app: SessionMiddleware, store: MemoryStore) -> None:
    start, first = request(app, "/set/flash/saved")
    cookie = cookie_value(start)
    start, body = request(app, "/pop/flash/user", cookie=cookie)  # a one-shot message, shown once
    assert set_cookies(start) == [], "the cookie stays"
    assert run(store.load, first["sid"]) == {"user": "from-elsewhere"}
    _, body = request(app, "/read", cookie=cookie)
    assert body == {"sid": first["sid"], "data": {"user": "from-elsewhere"}}
    start, body = request(app, "/pop/user", cookie=cookie)  # its last key popped (a logout by pop())
    assert "Max-Age=0" in set_cookies(start)[0] and run(store.load, first["sid"]) is None, "dropped"


def test_regenerate_id_moves_data_and_resends_cookie(app: SessionMiddleware, store: MemoryStore) -> None:
    start, first = request(app, "/set/user/carol")
    cookie = cookie_value(start)
    start, body = request(app, "/regenerate", cookie=cookie)
    new_cookie = cookie_value(start)
    assert body["sid"] != first["sid"]
    assert unsign_cookie(SECRET, new_cookie) == body["sid"]
    assert run(store.load, first["sid"]) is None
    _, again = request(app, "/read", cookie=new_cookie)
    assert again["data"] == {"user": "carol"}
    _, old = request(app, "/read", cookie=cookie)
    assert old == {"sid": None, "data": {}}


def test_on_drop_hears_of_every_session_id_the_middleware_deletes(store: MemoryStore) -> None:
    dropped: List[str] = []

    async def on_drop(sid: str) -> None:
        assert await store.load(sid) is None, "called once the row is gone"
        dropped.append(sid)
        if len(dropped) == 2:
            raise RuntimeError("a failing hook is logged, not raised")

    app = SessionMiddleware(raw_app, store=store, secret=SECRET, on_drop=on_drop)
    start, first = request(app, "/set/user/ann")
    cookie = cookie_value(start)
    request(app, "/set/lang/fr", cookie=cookie)
    assert dropped == [], "writes drop nothing"
    start, second = request(app, "/regenerate", cookie=cookie)
    assert dropped == [first["sid"]]
    start, _ = request(app, "/clear", cookie=cookie_value(start))
    assert "Max-Age=0" in set_cookies(start)[0] and dropped == [first["sid"], second["sid"]]
    with pytest.raises(ConfigurationError):
        SessionMiddleware(raw_app, store=store, secret=SECRET, on_drop="nope")  # type: ignore[arg-type]


def test_invalidate_expires_cookie(app: SessionMiddleware, store: MemoryStore) -> None:
    start, first = request(app, "/set/user/dan")
    start, body = request(app, "/invalidate", cookie=cookie_value(start))
    assert body == {"sid": None, "data": {}}
    assert "Max-Age=0" in set_cookies(start)[0]
    assert run(store.load, first["sid"]) is None


def test_existing_session_expiry_is_refreshed(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1_000_000.0]
    monkeypatch.setattr(sessions, "_now", lambda: clock[0])
    store = MemoryStore(max_age_seconds=100)
    app = SessionMiddleware(raw_app, store=store, secret=SECRET)
    start, first = request(app, "/set/k/v")
    cookie = cookie_value(start)
    clock[0] += 80
    request(app, "/read", cookie=cookie)  # touches: expiry now at +180
    clock[0] += 80
    _, body = request(app, "/read", cookie=cookie)
    assert body == first
    clock[0] += 101
    _, body = request(app, "/read", cookie=cookie)
    assert body == {"sid": None, "data": {}}


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_new_session_lives_an_hour_until_its_browser_comes_back_then_max_age(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that keeps no cookie (a crawler, a script) starts a session per request:
    each used to stay stored for max_age (14 days by default). A session lives
    NEW_SESSION_SECONDS until its browser first comes back with the cookie, then max_age."""
    clock = [1_000_000.0]
    monkeypatch.setattr(sessions, "_now", lambda: clock[0])
    day = 86400
    store: Any = MemoryStore(max_age_seconds=day) if kind == "memory" else SQLiteStore(tmp_path / "s.db", max_age_seconds=day)
    app = SessionMiddleware(raw_app, store=store, secret=SECRET)
    assert sessions.NEW_SESSION_SECONDS == 3600
    _, crawled = request(app, "/set/k/v")  # never comes back
    start, kept = request(app, "/set/k/v")
    clock[0] += 60
    request(app, "/read", cookie=cookie_value(start))  # back: the full lifetime, from now
    clock[0] += 3600
    assert run(store.load, crawled["sid"]) is None, "gone after an hour"
    assert run(store.load, kept["sid"]) == {"k": "v"}
    clock[0] += day - 3600 - 1
    assert run(store.load, kept["sid"]) == {"k": "v"}, "a day after its return"
    clock[0] += 2
    assert run(store.load, kept["sid"]) is None
    # the store's own parameter: a lifetime, never past max_age; None is max_age
    run(functools.partial(store.apply, lifetime=10), "x" * 20, {"a": 1}, [])
    run(functools.partial(store.apply, lifetime=10 * day), "y" * 20, {"a": 1}, [])
    run(store.apply, "z" * 20, {"a": 1}, [])
    clock[0] += 11
    assert run(store.load, "x" * 20) is None and run(store.load, "y" * 20) == {"a": 1}
    clock[0] += day - 10
    assert run(store.load, "y" * 20) is None and run(store.load, "z" * 20) is None
    run(store.close)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_stores_hand_out_each_expired_session_id_once(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1_000_000.0]
    monkeypatch.setattr(sessions, "_now", lambda: clock[0])
    store: Any = MemoryStore(max_age_seconds=100) if kind == "memory" else SQLiteStore(tmp_path / "s.db", max_age_seconds=100)

    async def main() -> Tuple[Any, ...]:
        for sid in ("a" * 20, "b" * 20, "c" * 20):
            await store.apply(sid, {"k": sid[0]}, [])
        clock[0] += 50
        await store.touch("c" * 20)  # c lives on
        nothing_yet = await store.take_expired()
        clock[0] += 60
        first = sorted(await store.take_expired())
        again = await store.take_expired()
        c_alive = await store.load("c" * 20)
        for i in range(5):
            await store.apply(f"{i}" * 20, {}, [])
        clock[0] += 101  # c and the five expire
        assert await store.take_expired(limit=0) == [] and await store.take_expired(limit=-1) == []
        limited = [await store.take_expired(limit=2) for _ in range(4)]
        return nothing_yet, first, again, c_alive, limited

    nothing_yet, first, again, c_alive, limited = anyio.run(main)
    assert nothing_yet == [] and first == ["a" * 20, "b" * 20] and again == [] and c_alive == {"k": "c"}
    assert [len(batch) for batch in limited] == [2, 2, 2, 0]
    assert sorted(sum(limited, [])) == sorted(["c" * 20] + [f"{i}" * 20 for i in range(5)])
    if kind == "sqlite":
        anyio.run(store.close)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_expired_ids_a_store_drops_on_its_own_are_handed_out_too(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A MemoryStore drops an expired row when it is read, a SQLiteStore in its periodic
    purge (within a write): take_expired still hands those ids out."""
    clock = [1_000_000.0]
    monkeypatch.setattr(sessions, "_now", lambda: clock[0])
    store: Any = MemoryStore(max_age_seconds=100) if kind == "memory" else SQLiteStore(tmp_path / "s.db", max_age_seconds=100)

    async def main() -> List[str]:
        await store.apply("old" * 7, {"k": 1}, [])
        clock[0] += 101
        if kind == "memory":
            assert await store.load("old" * 7) is None
        else:
            store._writes = 0  # the next write purges
            await store.apply("new" * 7, {"k": 2}, [])
            assert store._writer.execute("SELECT count(*) FROM sessions").fetchone()[0] == 1, "purged"
        taken = await store.take_expired()
        if kind == "sqlite":
            await store.close()
        return taken

    assert anyio.run(main) == ["old" * 7]


def test_the_middleware_tells_on_drop_of_an_expired_session_before_the_app_and_of_the_rest_at_its_sweep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1_000_000.0]
    mono = [500.0]
    monkeypatch.setattr(sessions, "_now", lambda: clock[0])
    monkeypatch.setattr(sessions, "_monotonic", lambda: mono[0])
    store = MemoryStore(max_age_seconds=100)
    dropped: List[str] = []
    events: List[str] = []

    async def on_drop(sid: str) -> None:
        dropped.append(sid)
        events.append("drop")
        if sid == "boom":
            raise RuntimeError("logged, not raised")

    async def seen_app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        events.append("app")
        await raw_app(scope, receive, send)

    app = SessionMiddleware(seen_app, store=store, secret=SECRET, on_drop=on_drop)
    assert app.sweep_seconds == 5.0  # a twentieth of the store's lifetime, within 1..60 s
    start, one = request(app, "/set/k/1")
    cookie_one = cookie_value(start)
    _, two = request(app, "/set/k/2")
    clock[0] += 101  # both expire
    # a browser comes back with the (validly signed) cookie of an expired session
    events.clear()
    _, fresh = request(app, "/peek", cookie=cookie_one)
    assert dropped == [one["sid"]], "reported when its cookie comes back"
    assert events == ["drop", "app"], "before the app starts what the new session needs"
    request(app, "/peek", cookie=cookie_one)
    assert dropped == [one["sid"]], "once: the browser sends it until it gets a new one"
    # forged or foreign cookies report nothing
    request(app, "/peek", cookie=cookie_one[:-2] + "xx")
    request(app, "/peek", cookie=sign_sid(Secret(b"o" * 32), two["sid"]))
    assert dropped == [one["sid"]]
    # the sweep: not before its time, then every expired session the store still held
    mono[0] += 4.9
    request(app, "/peek")
    assert dropped == [one["sid"]]
    mono[0] += 0.2
    request(app, "/peek")
    assert dropped == [one["sid"], two["sid"]], "the sweep's ids, each told once (one's was already)"
    count = len(dropped)
    mono[0] += 5.1
    request(app, "/peek")
    assert len(dropped) == count, "each expired id is handed out once"
    # a failing hook: logged, the request unharmed
    store._expired.append("boom")
    mono[0] += 5.1
    start, body = request(app, "/set/k/3")
    assert body["data"] == {"k": "3"} and dropped[-1] == "boom"

    # without on_drop, no sweep takes ids from the store
    quiet = SessionMiddleware(raw_app, store=store, secret=SECRET)
    store._expired.append("kept")
    mono[0] += 100
    request(quiet, "/peek")
    assert list(store._expired) == ["kept"]


def test_a_session_in_use_gets_its_cookie_again_every_twentieth_of_its_max_age(monkeypatch: pytest.MonkeyPatch) -> None:
    """Max-Age counts from when the browser got the cookie: without a new Set-Cookie now
    and then, an active user's session would end max_age_seconds after it began."""
    mono = [1000.0]
    monkeypatch.setattr(sessions, "_monotonic", lambda: mono[0])
    store = MemoryStore()
    app = SessionMiddleware(raw_app, store=store, secret=SECRET, max_age_seconds=400)
    assert app.refresh_seconds == 20.0
    start, body = request(app, "/set/k/1")
    (first,) = set_cookies(start)
    value = first.split(";")[0].split("=", 1)[1]
    assert "Max-Age=400" in first
    for step in (5.0, 14.9):  # within a twentieth: nothing to refresh
        mono[0] += step
        start, _ = request(app, "/get/k", cookie=value)
        assert set_cookies(start) == []
    mono[0] += 0.2
    start, _ = request(app, "/peek", cookie=value)
    assert set_cookies(start) == [], "a response that does not use the session (a static file) gets none"
    start, _ = request(app, "/get/k", cookie=value)
    (again,) = set_cookies(start)
    assert again == first, "the same value and attributes, so a new Max-Age"
    assert any(k == b"vary" for k, _ in start["headers"])
    start, _ = request(app, "/get/k", cookie=value)
    assert set_cookies(start) == []
    # another worker (a middleware that never saw this cookie) refreshes it at once
    other = SessionMiddleware(raw_app, store=store, secret=SECRET, max_age_seconds=400)
    start, _ = request(other, "/get/k", cookie=value)
    assert set_cookies(start) == [first]
    # a forged cookie refreshes nothing (it gets a new session, if anything)
    start, _ = request(app, "/get/k", cookie=value[:-2] + "xx")
    assert all(value not in c for c in set_cookies(start))
    # dropped meanwhile (a logout in another request): not handed back to the browser
    third = SessionMiddleware(raw_app, store=store, secret=SECRET, max_age_seconds=400)
    run(store.delete, body["sid"])
    start, _ = request(third, "/get/k", cookie=value)
    assert all(value not in c for c in set_cookies(start)), set_cookies(start)
    # bounded: the least recently refreshed ids are forgotten first
    monkeypatch.setattr(sessions, "_MAX_REFRESHED", 3)
    for i in range(5):
        app._cookie_refreshed(f"{i}" * 32)
    assert list(app._refreshed) == ["2" * 32, "3" * 32, "4" * 32]
    assert SessionMiddleware(raw_app, store=store, secret=SECRET, max_age_seconds=10).refresh_seconds == 1.0
    assert SessionMiddleware(raw_app, store=store, secret=SECRET).refresh_seconds == 14 * 86400 / 20
    assert SessionMiddleware(raw_app, store=store, secret=SECRET, max_age_seconds=400 * 86400).refresh_seconds == 86400.0


def test_a_request_that_loaded_a_session_dropped_meanwhile_does_not_bring_it_back(store: MemoryStore) -> None:
    """A slow request B loads the session; a logout (another request, another worker)
    deletes it; B then writes. B's write must not recreate the session, and B's answer
    expires the cookie rather than hand the logged-out id back to the browser."""
    start, first = request(SessionMiddleware(raw_app, store=store, secret=SECRET), "/set/user/dan")
    cookie = cookie_value(start)

    async def slow_b(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        session: Session = scope["session"]
        assert session["user"] == "dan"
        await store.delete(session.sid)  # the logout lands meanwhile
        session["last_page"] = "/report"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps({"sid": session.sid}).encode()})

    b = SessionMiddleware(slow_b, store=store, secret=SECRET)  # a worker that never saw this cookie
    start, body = request(b, "/", cookie=cookie)
    assert run(store.load, first["sid"]) is None, "not recreated"
    assert body == {"sid": None}
    (expired,) = set_cookies(start)
    assert "Max-Age=0" in expired and cookie not in expired


def test_a_store_written_before_apply_took_a_lifetime_still_works(monkeypatch: pytest.MonkeyPatch) -> None:
    """SessionStore.apply gained ``lifetime``: a store of one's own with the old signature
    gets the new sessions at its full lifetime, as before, instead of a TypeError."""

    class OldStore(MemoryStore):
        async def apply(self, sid: str, changed: Dict[str, Any], deleted: Any) -> Dict[str, Any]:  # type: ignore[override]
            return await super().apply(sid, changed, deleted)

    clock = [1_000_000.0]
    monkeypatch.setattr(sessions, "_now", lambda: clock[0])
    store = OldStore(max_age_seconds=86400)
    start, body = request(SessionMiddleware(raw_app, store=store, secret=SECRET), "/set/k/v")
    clock[0] += 7200  # past NEW_SESSION_SECONDS: the old store gave it its full day
    assert run(store.load, body["sid"]) == {"k": "v"}


def test_lifespan_passes_through() -> None:
    seen: List[Dict[str, Any]] = []

    async def inner(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(dict(scope))

    async def main() -> None:
        app = SessionMiddleware(inner, store=MemoryStore(), secret=SECRET)
        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, None, None)

    anyio.run(main)
    assert len(seen) == 1 and "session" not in seen[0]


def test_non_json_value_fails_at_response_start(app: SessionMiddleware) -> None:
    async def bad_app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        scope["session"]["when"] = {1, 2}
        await send({"type": "http.response.start", "status": 200, "headers": []})

    wrapped = SessionMiddleware(bad_app, store=MemoryStore(), secret=SECRET)

    async def main() -> None:
        async def send(message: Dict[str, Any]) -> None:
            raise AssertionError("nothing may be sent")

        await wrapped(http_scope("/", []), None, send)

    with pytest.raises(TypeError, match="'when'"):
        anyio.run(main)


def test_a_store_that_cannot_be_opened_at_run_time_gets_a_503_not_a_traceback(tmp_path: Path) -> None:
    """The state dir became unusable (here a file where the directory was; a read-only or
    full disk, a removed dir): the store's first open in a worker fails. A returning
    visitor and a new one writing its first value both get the 503 page, not a bare 500."""
    from asgi_htag.exceptions import StoreUnavailable

    (tmp_path / "state").write_text("not a directory")
    store = SQLiteStore(tmp_path / "state" / "sessions.sqlite3")
    with pytest.raises(StoreUnavailable, match="cannot open the session store") as info:
        anyio.run(store.load, VALID_SID)
    assert isinstance(info.value, ConfigurationError) and sessions.store_failure(info.value)
    wrapped = SessionMiddleware(raw_app, store=store, secret=SECRET)
    for path, cookie in (("/get/a", sign_sid(SECRET, VALID_SID)), ("/set/a/b", None)):
        sent: List[Dict[str, Any]] = []

        async def receive() -> Dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Dict[str, Any]) -> None:
            sent.append(message)

        headers = [] if cookie is None else [(b"cookie", f"{COOKIE}={cookie}".encode())]
        anyio.run(wrapped, http_scope(path, headers), receive, send)
        assert sent[0]["status"] == 503, (path, sent[0])
        assert b"cannot keep sessions right now" in b"".join(m.get("body", b"") for m in sent[1:])
        assert not set_cookies(sent[0])


# -- Starlette ---------------------------------------------------------------------------


def starlette_client(store: Any) -> Any:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocket

    async def write(request: Request) -> JSONResponse:
        request.session["x"] = 1
        return JSONResponse({"ok": True})

    async def read(request: Request) -> JSONResponse:
        return JSONResponse({"x": request.session.get("x")})

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"x": websocket.session.get("x")})
        websocket.session["from_ws"] = True
        await websocket.close()

    app = Starlette(
        routes=[Route("/write", write), Route("/read", read), WebSocketRoute("/ws", ws)],
        middleware=[Middleware(SessionMiddleware, store=store, secret=SECRET)],
    )
    return TestClient(app)


# starlette.testclient warns on import that it prefers httpx2, which is not a dependency here.
@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient` is deprecated")
def test_starlette_request_session(store: MemoryStore) -> None:
    with starlette_client(store) as client:
        assert client.get("/read").json() == {"x": None}
        response = client.get("/write")
        assert response.status_code == 200
        assert "HttpOnly" in response.headers["set-cookie"]
        assert client.get("/read").json() == {"x": 1}
        with client.websocket_connect("/ws") as websocket:
            assert websocket.receive_json() == {"x": 1}
        sid = unsign_cookie(SECRET, client.cookies[COOKIE])
    assert sid is not None
    assert run(store.load, sid) == {"x": 1, "from_ws": True}


# -- websocket, message by message -------------------------------------------------------


def ws_scope(headers: List[Tuple[bytes, bytes]]) -> Dict[str, Any]:
    return {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 12345),
        "server": ("testserver", 80),
        "subprotocols": [],
    }


def test_websocket_new_session_cookie_on_accept_and_commit_on_close() -> None:
    from asgiref.testing import ApplicationCommunicator

    store = MemoryStore()

    async def ws_app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        session: Session = scope["session"]
        assert (await receive())["type"] == "websocket.connect"
        session.ensure_id()
        await send({"type": "websocket.accept"})
        message = await receive()
        session["said"] = message["text"]
        await send({"type": "websocket.close", "code": 1000})

    app = SessionMiddleware(ws_app, store=store, secret=SECRET)

    async def main() -> Tuple[Dict[str, Any], Dict[str, Any]]:
        communicator = ApplicationCommunicator(app, ws_scope([]))
        await communicator.send_input({"type": "websocket.connect"})
        accept = await communicator.receive_output(2)
        await communicator.send_input({"type": "websocket.receive", "text": "hello"})
        close = await communicator.receive_output(2)
        await communicator.wait(2)
        return accept, close

    accept, close = anyio.run(main)
    assert accept["type"] == "websocket.accept"
    assert close == {"type": "websocket.close", "code": 1000}
    (header,) = set_cookies(accept)
    assert "Secure" not in header and "HttpOnly" in header
    sid = unsign_cookie(SECRET, header.split(";")[0].partition("=")[2])
    assert sid is not None
    assert run(store.load, sid) == {"said": "hello"}


def test_websocket_existing_session_and_reload() -> None:
    from asgiref.testing import ApplicationCommunicator

    store = MemoryStore()
    sid = "W" * 32
    run(store.apply, sid, {"n": 1}, [])
    seen: List[Any] = []

    async def ws_app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        session: Session = scope["session"]
        await receive()
        session.get("n")  # in use before the accept (the htag engine's websocket uses its id)
        await send({"type": "websocket.accept"})
        seen.append(dict(session))
        await receive()  # meanwhile, another process changes the session
        await session.reload()
        seen.append(dict(session))
        session["n"] += 1

    app = SessionMiddleware(ws_app, store=store, secret=SECRET)

    async def main() -> Dict[str, Any]:
        headers = [(b"cookie", f"{COOKIE}={sign_sid(SECRET, sid)}".encode())]
        communicator = ApplicationCommunicator(app, ws_scope(headers))
        await communicator.send_input({"type": "websocket.connect"})
        accept = await communicator.receive_output(2)
        await store.apply(sid, {"n": 10, "other": "x"}, [])
        await communicator.send_input({"type": "websocket.receive", "text": "go"})
        await communicator.wait(2)
        return accept

    accept = anyio.run(main)
    # this middleware had not seen the cookie: it sets it again (same value, a new Max-Age)
    assert [c.split(";")[0] for c in set_cookies(accept)] == [f"{COOKIE}={sign_sid(SECRET, sid)}"]
    assert seen == [{"n": 1}, {"n": 10, "other": "x"}]
    assert run(store.load, sid) == {"n": 11, "other": "x"}


# -- Session -----------------------------------------------------------------------------


def test_session_tracks_changes_key_by_key() -> None:
    store = MemoryStore()
    session = Session(store, sid="S" * 32, data={"keep": 1, "items": [1], "gone": True})
    assert session.changed_keys() == set()
    assert not session.modified
    session["items"].append(2)
    del session["gone"]
    session["new"] = {"a": [1]}
    assert session.changed_keys() == {"items", "new", "gone"}
    changed, deleted = session.changes()
    assert changed == {"items": [1, 2], "new": {"a": [1]}} and deleted == ["gone"]
    with pytest.raises(TypeError):
        session[3] = "x"  # type: ignore[index]
    assert "SSSSSS" in repr(session) and "S" * 7 not in repr(session)


def test_session_commit_and_apply_changes() -> None:
    store = MemoryStore()

    async def main() -> None:
        session = Session(store)
        await session.commit()
        assert session.sid is None  # nothing to store, no id
        session["a"] = 1
        await session.commit()
        assert session.sid is not None and session.is_new
        assert not session.modified
        other = Session(store, sid=session.sid, data=await store.load(session.sid))
        other["b"] = 2
        await other.commit()
        session["c"] = 3  # pending locally
        await session.apply_changes({"d": [4]}, ["a"])
        assert dict(session) == {"b": 2, "c": 3, "d": [4]}
        assert session.changed_keys() == {"c"}
        assert await store.load(session.sid) == {"b": 2, "d": [4]}
        await session.commit()
        assert await store.load(session.sid) == {"b": 2, "c": 3, "d": [4]}

    anyio.run(main)


def test_session_clear_and_ensure_id() -> None:
    store = MemoryStore()

    async def main() -> None:
        session = Session(store)
        sid = session.ensure_id()
        assert session.ensure_id() == sid and session.is_new
        await session.commit()
        assert await store.load(sid) == {}  # the id exists, so a cookie for it is valid
        session.update(a=1, b=2)
        session.clear()
        assert len(session) == 0
        await session.commit()
        assert await store.load(sid) == {}

    anyio.run(main)


def test_session_commit_rejects_non_json_naming_key() -> None:
    session = Session(MemoryStore())
    session["fine"] = 1
    session["bad"] = object()
    with pytest.raises(TypeError, match="'bad'"):
        anyio.run(session.commit)


# -- MemoryStore -------------------------------------------------------------------------


def test_memory_store_basics(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [5_000.0]
    monkeypatch.setattr(sessions, "_now", lambda: clock[0])
    store = MemoryStore(max_age_seconds=10)

    async def main() -> None:
        assert await store.load("nope") is None
        value = {"nested": [1, 2]}
        data = await store.apply("sid1", {"a": value, "b": 2}, [])
        assert data == {"a": value, "b": 2}
        value["nested"].append(3)  # the caller's object is not the stored one
        data["b"] = 99
        loaded = await store.load("sid1")
        assert loaded == {"a": {"nested": [1, 2]}, "b": 2}
        loaded["a"]["nested"].clear()
        assert await store.load("sid1") == {"a": {"nested": [1, 2]}, "b": 2}
        assert await store.apply("sid1", {"c": 3}, ["b", "missing"]) == {"a": {"nested": [1, 2]}, "c": 3}
        with pytest.raises(TypeError, match="'d'"):
            await store.apply("sid1", {"d": b"bytes"}, [])
        clock[0] += 9
        await store.touch("sid1")
        clock[0] += 9
        assert await store.load("sid1") is not None
        clock[0] += 11
        assert await store.load("sid1") is None
        await store.touch("sid1")  # does not revive
        assert await store.load("sid1") is None
        assert await store.apply("sid1", {"z": 1}, []) == {"z": 1}  # expired data does not come back
        await store.delete("sid1")
        await store.delete("sid1")
        assert await store.load("sid1") is None
        await store.close()

    anyio.run(main)


@pytest.mark.parametrize("bad", [0, -1, "10", True, None])
def test_stores_validate_max_age(bad: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        MemoryStore(max_age_seconds=bad)
    with pytest.raises(ConfigurationError):
        SQLiteStore(tmp_path / "s.db", max_age_seconds=bad)


class _ReadThenApply(MemoryStore):
    """A store that does not override apply_existing: SessionStore's default is used."""

    apply_existing = SessionStore.apply_existing  # type: ignore[assignment]


@pytest.mark.parametrize("kind", ["memory", "sqlite", "default"])
def test_apply_existing_writes_to_live_sessions_only(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sid, gone, expired = "e" * 32, "g" * 32, "x" * 32

    async def main() -> None:
        store: SessionStore = {"memory": MemoryStore, "default": _ReadThenApply}[kind](max_age_seconds=60) if kind != "sqlite" \
            else SQLiteStore(tmp_path / "s.db", max_age_seconds=60)
        try:
            await store.apply(sid, {"a": 1, "b": 2}, [])
            assert await store.apply_existing(sid, {"c": 3}, ["a"]) == {"b": 2, "c": 3}
            assert await store.load(sid) == {"b": 2, "c": 3}
            await store.apply(gone, {"user": "alice"}, [])
            await store.delete(gone)  # a logout
            assert await store.apply_existing(gone, {"user": "alice"}, []) is None
            assert await store.load(gone) is None, "a deleted session is not brought back"
            assert await store.apply_existing("n" * 32, {"k": 1}, []) is None and await store.load("n" * 32) is None
            await store.apply(expired, {"k": 1}, [])
            later = sessions._now() + 61
            monkeypatch.setattr(sessions, "_now", lambda: later)
            assert await store.apply_existing(expired, {"k": 2}, []) is None
            assert await store.load(expired) is None
        finally:
            monkeypatch.undo()
            await store.close()

    anyio.run(main)


# -- SQLiteStore -------------------------------------------------------------------------


def test_sqlite_store_shared_between_instances(tmp_path: Path) -> None:
    path = tmp_path / "state" / "sessions.sqlite3"

    async def main() -> None:
        one, two = SQLiteStore(path), SQLiteStore(path)
        try:
            assert await two.load("x" * 32) is None
            await one.apply("x" * 32, {"a": 1}, [])
            assert await two.load("x" * 32) == {"a": 1}
            await two.apply("x" * 32, {"b": [1, {"c": None}]}, ["a"])
            assert await one.load("x" * 32) == {"b": [1, {"c": None}]}
            await one.touch("x" * 32)
            await two.touch("x" * 32)
            await one.delete("x" * 32)
            assert await two.load("x" * 32) is None
        finally:
            await one.close()
            await two.close()

    anyio.run(main)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    with contextlib.closing(sqlite3.connect(str(path))) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_store_merges_keys_with_another_process(tmp_path: Path) -> None:
    path = tmp_path / "sessions.sqlite3"
    sid = "P" * 32
    child_code = textwrap.dedent(
        """
        import sys, anyio
        from asgi_htag.sessions import SQLiteStore

        async def main():
            store = SQLiteStore(sys.argv[1])
            try:
                for i in range(30):
                    await store.apply(sys.argv[2], {"child%d" % i: i}, [])
            finally:
                await store.close()

        anyio.run(main)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))

    async def main() -> None:
        store = SQLiteStore(path)
        try:
            await store.apply(sid, {"start": True}, [])
            proc = subprocess.Popen([sys.executable, "-c", child_code, str(path), sid], env=env)
            try:
                for i in range(30):
                    await store.apply(sid, {f"parent{i}": i}, [])
            finally:
                returncode = await anyio.to_thread.run_sync(lambda: proc.wait(timeout=60))
            assert returncode == 0
            data = await store.load(sid)
        finally:
            await store.close()
        expected = {"start": True}
        expected.update({f"parent{i}": i for i in range(30)})
        expected.update({f"child{i}": i for i in range(30)})
        assert data == expected

    anyio.run(main)


def test_sqlite_store_ignores_and_purges_expired_rows(tmp_path: Path) -> None:
    path = tmp_path / "sessions.sqlite3"

    async def write(store: SQLiteStore, sid: str, changed: Dict[str, Any]) -> None:
        try:
            await store.apply(sid, changed, [])
        finally:
            await store.close()

    anyio.run(write, SQLiteStore(path), "E" * 32, {"old": "data"})
    with contextlib.closing(sqlite3.connect(str(path))) as conn:
        with conn:
            conn.execute("UPDATE sessions SET expires = 1.0 WHERE sid = ?", ("E" * 32,))

    async def main() -> None:
        store = SQLiteStore(path)
        try:
            assert await store.load("E" * 32) is None
            await store.touch("E" * 32)  # does not revive
            assert await store.load("E" * 32) is None
            # A write to the expired id starts from nothing, and the first write purges.
            assert await store.apply("E" * 32, {"new": 1}, []) == {"new": 1}
            await store.apply("F" * 32, {"x": 1}, [])
        finally:
            await store.close()

    anyio.run(main)
    with contextlib.closing(sqlite3.connect(str(path))) as conn:
        with conn:
            conn.execute("UPDATE sessions SET expires = 1.0 WHERE sid = ?", ("F" * 32,))
    anyio.run(write, SQLiteStore(path), "G" * 32, {"y": 1})
    with contextlib.closing(sqlite3.connect(str(path))) as conn:
        sids = {row[0] for row in conn.execute("SELECT sid FROM sessions")}
    assert sids == {"E" * 32, "G" * 32}


def test_sqlite_store_expiry_with_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [2_000_000.0]
    monkeypatch.setattr(sessions, "_now", lambda: clock[0])

    async def main() -> None:
        store = SQLiteStore(tmp_path / "s.db", max_age_seconds=100)
        try:
            await store.apply("T" * 32, {"a": 1}, [])
            clock[0] += 99
            assert await store.load("T" * 32) == {"a": 1}
            clock[0] += 2
            assert await store.load("T" * 32) is None
        finally:
            await store.close()

    anyio.run(main)


def test_sqlite_store_rejects_non_json(tmp_path: Path) -> None:
    async def main() -> None:
        store = SQLiteStore(tmp_path / "s.db")
        try:
            with pytest.raises(TypeError, match="'when'"):
                await store.apply("J" * 32, {"ok": 1, "when": object()}, [])
            with pytest.raises(TypeError):
                await store.apply("J" * 32, {1: "int key"}, [])  # type: ignore[dict-item]
            assert await store.load("J" * 32) is None
        finally:
            await store.close()

    anyio.run(main)


def test_sqlite_store_reopens_after_fork(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SQLiteStore(tmp_path / "s.db")

    async def main() -> None:
        try:
            await store.apply("K" * 32, {"a": 1}, [])
            monkeypatch.setattr(sessions.os, "getpid", lambda: -1)  # as if in a forked child
            assert await store.load("K" * 32) == {"a": 1}
            assert len(store._inherited) == 2
        finally:
            await store.close()
            for conn in store._inherited:
                conn.close()

    anyio.run(main)


def test_sqlite_store_unusable_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    async def main() -> None:
        store = SQLiteStore(blocker / "sessions.sqlite3")
        with pytest.raises(ConfigurationError):
            await store.load("x" * 32)

    anyio.run(main)


def test_sqlite_store_with_middleware(tmp_path: Path) -> None:
    store = default_store(tmp_path / "state")
    assert store.path == tmp_path / "state" / "sessions.sqlite3"
    app = SessionMiddleware(raw_app, store=store, secret=SECRET)
    try:
        start, first = request(app, "/set/k/v")
        _, body = request(app, "/append", cookie=cookie_value(start))
        assert body == {"sid": first["sid"], "data": {"k": "v", "items": [0]}}
    finally:
        run(store.close)


def test_a_sqlite_state_dir_removed_under_a_worker_is_opened_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A worker that kept the old file open would split the workers for good: those
    started since use a new file, it the old one, and a session known to one is unknown
    (so expired) to the other. Within a few seconds it opens the file there now."""
    mono = [1000.0]
    monkeypatch.setattr(sessions, "_monotonic", lambda: mono[0])
    path = tmp_path / "state" / "s.db"
    old_worker = SQLiteStore(path)

    async def main() -> Tuple[Any, ...]:
        await old_worker.apply("a" * 20, {"who": "a"}, [])
        shutil.rmtree(tmp_path / "state")  # the state dir deleted while the server runs
        new_worker = SQLiteStore(path)  # a worker started since
        await new_worker.apply("c" * 20, {"who": "c"}, [])
        mono[0] += 5  # the check's interval
        seen = [await old_worker.load(sid) for sid in ("a" * 20, "c" * 20)]
        await old_worker.apply("d" * 20, {"who": "d"}, [])
        shared = await new_worker.load("d" * 20)
        await new_worker.close()
        await old_worker.close()
        return seen, shared

    seen, shared = anyio.run(main)
    assert seen == [None, {"who": "c"}]
    assert shared == {"who": "d"}, "both workers see one database again"
    # removed, then made again by the new worker: replaced, as the old one finds it
    assert f"the session database {path} was replaced while open" in caplog.text


def test_a_write_queued_while_the_sqlite_file_is_replaced_goes_to_the_new_file(tmp_path: Path) -> None:
    """A write that passed its readiness check waits for the one write thread; meanwhile
    another request finds the file replaced and drops the connections. The write then
    opens the new file instead of failing on a connection that is gone (an assertion, so a
    bare 500), and the old file's connections are closed, not kept until the worker ends."""
    path = tmp_path / "state" / "s.db"
    store = SQLiteStore(path)

    async def main() -> Tuple[Any, ...]:
        await store.apply("a" * 20, {"who": "a"}, [])
        old_writer, old_reader = store._writer, store._reader
        limiter = store._limiter()
        await limiter.acquire()  # the write thread is busy
        results: List[Any] = []
        async with anyio.create_task_group() as tg:

            async def queued() -> None:
                results.append(await store.apply("b" * 20, {"who": "b"}, []))

            tg.start_soon(queued)
            await anyio.wait_all_tasks_blocked()  # past _ready(), waiting for the thread
            shutil.rmtree(tmp_path / "state")
            store._check_identity()  # what another request's readiness check does
            limiter.release()
        after = await store.load("b" * 20)
        await store.close()
        return results, after, old_writer, old_reader

    results, after, old_writer, old_reader = anyio.run(main)
    assert results == [{"who": "b"}] and after == {"who": "b"}
    db = sqlite3.connect(str(path))
    try:
        assert [r[0] for r in db.execute("SELECT sid FROM sessions")] == ["b" * 20], "in the file there now"
    finally:
        db.close()
    for conn in (old_writer, old_reader):
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            conn.execute("SELECT 1")
