"""Unit tests of the parsers and validators, with malformed, oversized and hostile input."""
import asyncio
import json
import struct
from types import SimpleNamespace
import weakref

import anyio
import pytest
from htag import Tag

from asgi_htag.app import AppOptions, Engine, HtagASGI, app_reference, url_to_init
from asgi_htag.exceptions import ConfigurationError, FrameTooLarge, ProtocolError
from asgi_htag.process import wire
from asgi_htag.process.host import SyncedSession, _Peer


def test_app_reference_accepts_classes_and_strings():
    from tests.apps import Counter

    assert app_reference(Counter) == "tests.apps:Counter"
    assert app_reference("tests.apps:Counter") == "tests.apps:Counter"
    assert app_reference("tests.apps.Counter") == "tests.apps:Counter"


@pytest.mark.parametrize("bad", ["", "Counter", "a:", ":b", "os:system;rm -rf", "../x:Y", "a b:C", 42, object, str])
def test_app_reference_refuses_garbage(bad):
    with pytest.raises(ConfigurationError):
        app_reference(bad)


def test_app_reference_refuses_local_classes():
    class Local(Tag.body):
        pass

    with pytest.raises(ConfigurationError, match="module level"):
        app_reference(Local)


def test_options_are_validated():
    with pytest.raises(ConfigurationError):
        AppOptions(timeout_interaction=-1)
    with pytest.raises(ConfigurationError):
        Engine(max_processes=0)
    with pytest.raises(ConfigurationError):
        HtagASGI("tests.apps:Counter", max_message_bytes=10)
    with pytest.raises(ConfigurationError):
        Engine(max_message_bytes=32 * 1024 * 1024)  # more than a frame to a process can hold
    for bad in ({"secure": True}, {"same_site": "sometimes"}, {"cookie_name": "a b"}, {"max_age_seconds": 0},
                {"path": "no-slash"}, {"https_only": "yes"}):
        with pytest.raises(ConfigurationError):
            Engine(session_cookie=bad)  # at construction, not at the first request


@pytest.mark.parametrize(
    "qs, expected",
    [
        ("", [[], {}]),
        ("john&age=12", [["john"], {"age": "12"}]),
        ("a=&b=%20x", [[], {"a": None, "b": " x"}]),
        ("%00&%ff", [["\x00", "\ufffd"], {}]),
    ],
)
def test_url_to_init(qs, expected):
    assert url_to_init(qs) == expected


def _scope(origin=None, host="example.com"):
    headers = [(b"host", host.encode())]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    return {"type": "websocket", "headers": headers}


@pytest.mark.parametrize(
    "origin, ok",
    [
        (None, True),
        ("http://example.com", True),
        ("https://example.com/", True),
        ("http://evil.com", False),
        ("http://example.com.evil.com", False),
        ("null", False),
        ("", False),
    ],
)
def test_origin_check(origin, ok, tmp_path):
    engine = Engine(state_dir=tmp_path)
    assert engine.origin_ok(_scope(origin)) is ok


def test_allowed_origins(tmp_path):
    engine = Engine(state_dir=tmp_path, allowed_origins=["https://app.example.org/"])
    assert engine.origin_ok(_scope("https://app.example.org"))
    # written as people write them, compared as browsers send them (lower case)
    engine = Engine(state_dir=tmp_path, allowed_origins=["https://App.Example.org"])
    assert engine.origin_ok(_scope("https://app.example.org"))
    assert not engine.origin_ok(_scope("https://app.example.org.evil.com"))


def test_wire_round_trip_and_limits():
    frame = wire.encode({"a": "é" * 3})
    buf = wire.FrameBuffer(100)
    buf.feed(frame[:3])
    assert buf.next_frame() is None
    buf.feed(frame[3:] + frame)
    assert buf.next_frame() == {"a": "ééé"}
    assert buf.next_frame() == {"a": "ééé"}
    assert buf.next_frame() is None
    with pytest.raises(FrameTooLarge):
        wire.encode({"a": "x" * 200}, max_frame_bytes=100)
    with pytest.raises(FrameTooLarge):
        wire.decode_length(struct.pack(">I", 2**31), 1000)
    with pytest.raises(ProtocolError):
        wire.decode_length(b"\x00\x01")


@pytest.mark.parametrize("payload", [b"\xff\xfe\xfd", b"[1,2]", b"12", b"{bad json", b"null"])
def test_frame_buffer_refuses_bad_payloads(payload):
    buf = wire.FrameBuffer()
    buf.feed(struct.pack(">I", len(payload)) + payload)
    with pytest.raises(ProtocolError):
        buf.next_frame()


def test_raw_bytes_ride_after_the_json_untouched():
    raw = b'{"id": 1}\n\x00\xff anything'
    frame = wire.encode({"t": "interact", "s": "line\nbreak"}, raw=raw)
    meta, got = wire.split_payload(frame[wire.HEADER_SIZE:])
    assert meta == {"t": "interact", "s": "line\nbreak"} and got == raw
    assert wire.split_payload(wire.encode({"a": 1})[wire.HEADER_SIZE:]) == ({"a": 1}, None)


def test_frames_encoded_ahead_and_common_answers_match_the_general_path():
    meta = {"t": "interact", "token": "é" * 4}
    assert wire.encode_json(wire.compact_json(meta), raw=b"r") == wire.encode(meta, raw=b"r")
    assert wire.encode_json(wire.compact_json(meta)) == wire.encode(meta)
    with pytest.raises(FrameTooLarge):
        wire.encode_json(wire.compact_json(meta), 40, raw=b"x" * 40)
    # the answer every click without a session change gets is this meta, read without JSON
    assert wire.compact_json({"t": "actions", "diff": None}) == wire.ACTIONS_META
    payload = wire.encode({"t": "actions", "diff": None}, raw=b'{"update":1}')[wire.HEADER_SIZE:]
    first, raw = wire.split_payload(payload)
    assert (first, raw) == ({"t": "actions", "diff": None}, b'{"update":1}')
    first["raw"] = raw  # ChildConnection.receive adds to it: each answer is a dict of its own
    assert wire.split_payload(payload)[0] == {"t": "actions", "diff": None}
    assert wire.split_payload(wire.ACTIONS_META) == ({"t": "actions", "diff": None}, None)
    # near misses take the general path, and are still refused when they are not JSON objects
    assert wire.split_payload(b'{"t": "actions", "diff": null}\nx') == ({"t": "actions", "diff": None}, b"x")
    with pytest.raises(ProtocolError):
        wire.split_payload(wire.ACTIONS_META[:-1] + b"\nx")


def test_frame_buffer_refuses_oversized_header_before_buffering():
    buf = wire.FrameBuffer(1024)
    buf.feed(struct.pack(">I", 10 * 1024 * 1024))
    with pytest.raises(FrameTooLarge):
        buf.next_frame()


def test_synced_session_diffs():
    s = SyncedSession({"a": 1, "l": [1]})
    assert s.take_diff() is None
    s["b"] = 2
    s["l"].append(2)
    del s["a"]
    assert s.take_diff() == {"set": {"b": 2, "l": [1, 2]}, "del": ["a"]}
    assert s.take_diff() is None
    s["local"] = "mine"
    s.sync({"b": 2, "l": [1, 2], "remote": "theirs"})  # a worker's fresh view keeps local edits
    assert s["remote"] == "theirs" and s["local"] == "mine"
    assert s.take_diff() == {"set": {"local": "mine"}, "del": []}
    s["bad"] = object()  # not JSON: logged and never sent
    assert s.take_diff() is None
    assert json.dumps(dict((k, v) for k, v in s.items() if k != "bad"))


def test_synced_session_compares_scalars_by_type_and_value():
    s = SyncedSession({"n": 1, "f": 1.5, "b": False, "s": "x", "z": None, "nan": float("nan"), "d": {"k": [1]}})
    assert s.take_diff() is None  # NaN included: it is the same value
    s["n"] = True  # equal to 1 in Python, not in JSON
    s["f"] = 1  # 1.5 -> 1: a different type and value
    s["b"] = 0
    assert s.take_diff() == {"set": {"n": True, "f": 1, "b": 0}, "del": []}
    s["z"] = -0.0
    s["nan"] = float("nan")  # another NaN object: the same value in JSON
    assert s.take_diff() == {"set": {"z": -0.0}, "del": []}
    s["z"] = 0.0  # equal to -0.0 in Python, not in JSON
    assert s.take_diff() == {"set": {"z": 0.0}, "del": []}
    s["d"]["k"].append(2)  # a nested edit in place
    s["s"] = {"now": "a dict"}
    diff = s.take_diff()
    assert diff == {"set": {"d": {"k": [1, 2]}, "s": {"now": "a dict"}}, "del": []}
    s["d"]["k"].append(3)  # the diff held a copy, not the live list
    assert diff["set"]["d"] == {"k": [1, 2]}
    assert s.take_diff() == {"set": {"d": {"k": [1, 2, 3]}}, "del": []}


def test_synced_session_dumps_no_scalar_to_diff_it(monkeypatch):
    s = SyncedSession({"user": "ann", "count": 3, "prefs": {"dark": True}})
    dumped = []
    real = SyncedSession._dump
    monkeypatch.setattr(SyncedSession, "_dump", staticmethod(lambda k, v: dumped.append(k) or real(k, v)))
    for _ in range(5):
        assert s.take_diff() is None
    assert dumped == ["prefs"] * 5  # only the container is re-serialized to be compared
    dumped.clear()
    s["prefs"]["dark"] = False
    assert s.take_diff() == {"set": {"prefs": {"dark": False}}, "del": []}
    assert dumped == ["prefs"]  # once: the new baseline is the text the diff was found with
    s.sync({"user": "bob", "count": 3})
    assert s.take_diff() is None and s["user"] == "bob" and "prefs" not in s


class _FlowTransport:
    def __init__(self) -> None:
        self.calls: list = []

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")


def test_session_process_connection_pauses_reading_while_frames_queue_up():
    peer = _Peer(SimpleNamespace(max_frame_bytes=wire.DEFAULT_MAX_FRAME_BYTES))
    peer.transport = _FlowTransport()
    one = wire.encode({"t": "ping"}, raw=b"x" * 100_000)
    for _ in range(30):
        peer.data_received(one[:7])  # cut anywhere: only whole frames are queued
        peer.data_received(one[7:])
    assert peer.transport.calls == [] and len(peer.frames) == 30
    for _ in range(12):
        peer.data_received(one)
    assert peer.transport.calls == ["pause"]  # above 4 MB queued
    while peer.frames:
        peer.release(len(peer.frames.popleft()))
    assert peer.transport.calls == ["pause", "resume"] and peer.held == 0


def test_session_process_connection_refuses_an_oversized_frame_before_buffering_it():
    peer = _Peer(SimpleNamespace(max_frame_bytes=1024))
    peer.transport = _FlowTransport()
    good = wire.encode({"t": "ping"})
    peer.data_received(good + struct.pack(">I", 10 * 1024 * 1024) + b"x" * 100)
    peer.data_received(b"y" * 100_000 + good)  # after the refusal nothing more is taken in
    assert list(peer.frames) == [good[4:], None]
    assert isinstance(peer.error, FrameTooLarge) and not len(peer.incoming)


def test_session_process_connection_wakes_every_writer_waiting_for_a_drain():
    """A reply and pushes from other tasks may wait on one paused transport together: all
    of them go on when it drains, and all of them learn it when the worker is gone."""

    async def scenario():
        peer = _Peer(SimpleNamespace(max_frame_bytes=1024))
        peer.pause_writing()
        waiting = [asyncio.ensure_future(peer.drain()) for _ in range(3)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiting)
        peer.resume_writing()
        await asyncio.wait_for(asyncio.gather(*waiting), 5)  # bounded: a forgotten waiter fails here
        peer.pause_writing()
        waiting = [asyncio.ensure_future(peer.drain()) for _ in range(2)]
        await asyncio.sleep(0)
        peer.connection_lost(None)
        results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)
        return [type(r).__name__ for r in results]

    assert asyncio.run(scenario()) == ["ConnectionResetError", "ConnectionResetError"]


def test_engine_shutdown_closes_the_store_it_made_and_not_one_it_was_given(tmp_path):
    from asgi_htag.sessions import MemoryStore, SQLiteStore

    closed = []

    class Given(MemoryStore):
        async def close(self):
            closed.append("given")

    async def go():
        own = Engine(state_dir=tmp_path / "a")
        assert isinstance(own.store, SQLiteStore)
        await own.store.apply("s" * 32, {"k": 1}, [])
        assert own.store._writer is not None
        await own.shutdown()
        assert own.store._writer is None and own.store._reader is None, "its connections are closed"
        given = Engine(state_dir=tmp_path / "b", store=Given())
        _ = given.store
        await given.shutdown()

    anyio.run(go)
    assert closed == []


def test_busy_mark_reads(tmp_path):
    sock = str(tmp_path / ("ab" * 10 + ".s"))
    assert wire.busy_path(sock) == str(tmp_path / ("ab" * 10 + ".busy"))
    assert wire.read_busy(sock) is None, "no mark"
    with open(wire.busy_path(sock), "wb") as f:
        f.write(b"\x01\x02")
    assert wire.read_busy(sock) is None, "a truncated mark"
    with open(wire.busy_path(sock), "wb") as f:
        f.write(wire.BUSY.pack(12.5))
    assert wire.read_busy(sock) == 12.5


class _WarmCounter(Tag.div):
    calls = 0

    def init(self) -> None:
        self <= Tag.button("w", _onclick=self.bind.noop())

    def noop(self) -> None:
        type(self).calls += 1
        self.session["w"] = type(self).calls


def test_warm_up_answers_real_frames_and_leaves_nothing_behind(tmp_path):
    """The fork server's warm-up of the session-process code: every click goes through the
    host's checks to the app, and no socket or offered method is left for the children."""
    from asgi_htag.process import host

    path = str(tmp_path / "warm.s")
    _WarmCounter.calls = 0
    asyncio.run(host.warm_up(_WarmCounter, path, clicks=20))
    assert _WarmCounter.calls == 20  # refused clicks (not offered) would not reach the app
    assert not host._offered
    assert not (tmp_path / "warm.s").exists()


@pytest.mark.parametrize(
    "data",
    [
        b'{"id":1,"method":"inc","args":[],"kargs":{},"event":{"x":1.5e3}}',
        b"{}",
        b'{"a":"\\u00e9\\ud800","b":[1,{"c":null}],"a":2}',  # lone surrogate, duplicate key
        b'{"n":NaN,"i":-Infinity}',
        '{"é":"ü"}'.encode(),
        b"{} ",
        b" {}",
        b"{}\n",
        b'{"a":1}x',
        b'{"a":1}{"b":2}',
        b"{",
        b'{"a":',
        b'{"a" 1}',
        b"{'a':1}",
        b"[1,2]",
        b"1",
        b"",
        b"\xef\xbb\xbf{}",  # a UTF-8 BOM: json.loads of bytes accepts it
        b'{"a":"\xff"}',  # not UTF-8
        b"\xff\xfe{\x00}\x00",  # UTF-16
        b'{"a":' + b"[" * 50 + b"]" * 50 + b"}",
    ],
)
def test_wire_loads_matches_json_loads(data):
    """The frames' fast JSON parse gives json.loads's value, or json.loads's error."""
    try:
        expected = ("ok", json.loads(data))
    except Exception as exc:
        expected = ("err", type(exc), str(exc))
    try:
        got = ("ok", wire.loads(data))
    except Exception as exc:
        got = ("err", type(exc), str(exc))
    if expected[0] == "ok" and got[0] == "ok":
        assert json.dumps(got[1]) == json.dumps(expected[1])  # NaN != NaN: compare the texts
    else:
        assert got == expected


class _CycleMaker(Tag.div):
    collected = 0

    def init(self) -> None:
        self <= Tag.button("c", _onclick=self.bind.noop())

    def noop(self) -> None:
        import weakref

        junk: dict = {}
        junk["self"] = junk  # a reference cycle, as htag's Stater leaves per interaction
        holder = type("Holder", (), {})()
        holder.junk = junk
        junk["holder"] = holder
        weakref.finalize(holder, _CycleMaker._count)

    @staticmethod
    def _count() -> None:
        _CycleMaker.collected += 1


def test_session_process_frees_an_interactions_reference_cycles_after_answering(tmp_path):
    """A click's cyclic garbage is freed once its answer is written, not whenever the
    collector's allocation counters say: the next click reuses that memory."""
    import gc

    from asgi_htag.process import host

    async def main() -> list:
        host.install_offer_recorder()
        spec = {"key": "k", "token": "t", "opts": {}, "init": [[], {}], "session": {}}
        app = host.AppHost(spec, _CycleMaker, "")
        path = str(tmp_path / "c.s")
        server = await asyncio.get_running_loop().create_unix_server(lambda: host._Peer(app), path=path)
        reader, writer = await asyncio.open_unix_connection(path)

        async def exchange(obj: dict, raw: bytes = None) -> dict:
            writer.write(wire.encode(obj, raw=raw))
            header = await reader.readexactly(wire.HEADER_SIZE)
            return wire.split_payload(await reader.readexactly(wire.decode_length(header)))[0]

        await exchange({"t": "render", "token": "t"})
        click = json.dumps({"id": id(app.hr.tag), "method": "noop", "args": [], "kargs": {}, "event": {}}).encode()
        seen = []
        for _ in range(5):
            assert (await exchange({"t": "interact", "token": "t"}, click))["t"] == "actions"
            await exchange({"t": "ping", "token": "t"})  # the click's answer was written before this one
            seen.append(_CycleMaker.collected)
        writer.close()
        server.close()
        host._offered.clear()
        return seen

    _CycleMaker.collected = 0
    thresholds = gc.get_threshold()
    gc.set_threshold(100_000)  # the collector's own turn never comes during the test
    try:
        assert asyncio.run(main()) == [1, 2, 3, 4, 5]
    finally:
        gc.set_threshold(*thresholds)


class _Replacer(Tag.div):
    """Each click replaces its rows: the old ones, with their parent/child cycles, have
    lived through a click (so sit in the oldest generation) when they are dropped."""

    def init(self) -> None:
        self <= Tag.button("r", _onclick=self.bind.replace())
        self.rows = Tag.div()
        self <= self.rows
        self.replace()

    def replace(self) -> None:
        self.rows.clear()
        for i in range(20):
            self.rows <= Tag.div(Tag.span(str(i)))


def test_session_process_runs_full_collections_so_dropped_tags_do_not_pile_up(tmp_path):
    """The young-generation collection after each answer resets the counters that would
    start CPython's full collections: the process runs them itself, or every tag an app
    drops after one click stays for the life of the process."""
    import gc
    import weakref

    from asgi_htag.process import host

    async def main() -> tuple:
        host.install_offer_recorder()
        spec = {"key": "k", "token": "t", "opts": {}, "init": [[], {}], "session": {}}
        app = host.AppHost(spec, _Replacer, "")
        path = str(tmp_path / "r.s")
        server = await asyncio.get_running_loop().create_unix_server(lambda: host._Peer(app), path=path)
        reader, writer = await asyncio.open_unix_connection(path)

        async def exchange(obj: dict, raw: bytes = None) -> dict:
            writer.write(wire.encode(obj, raw=raw))
            header = await reader.readexactly(wire.HEADER_SIZE)
            return wire.split_payload(await reader.readexactly(wire.decode_length(header)))[0]

        await exchange({"t": "render", "token": "t"})
        first = [weakref.ref(row) for row in app.hr.tag.rows.childs]
        click = json.dumps({"id": id(app.hr.tag), "method": "replace", "args": [], "kargs": {}, "event": {}}).encode()
        for _ in range(300):
            assert (await exchange({"t": "interact", "token": "t"}, click))["t"] == "actions"
        await exchange({"t": "ping", "token": "t"})
        alive = sum(w() is not None for w in first)
        writer.close()
        server.close()
        host._offered.clear()
        return alive, getattr(getattr(app, "collector", None), "full_collections", None)

    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()  # as in a session process: what it inherited is not its to collect
    gc.set_threshold(100_000, thresholds[1], thresholds[2])  # CPython's own turn never comes
    try:
        alive, full = asyncio.run(main())
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
    assert alive == 0, "the rows dropped by the second click were freed"
    assert 0 < full < 300


class _Deletable(Tag.div):
    # instances larger than pymalloc's 512 bytes come from malloc, whose cache of freed
    # chunks of one size hands the last one back first: the test below needs that reuse
    __slots__ = tuple(f"_pad{i}" for i in range(64))
    deleted: list = []

    def __init__(self, *args, **kargs) -> None:
        for name in self.__slots__:  # set: htag reads every attribute it lists
            object.__setattr__(self, name, None)
        super().__init__(*args, **kargs)

    def init(self, name: str, offered: bool) -> None:
        self.name = name
        if offered:
            self <= Tag.button("del", _onclick=self.bind.delete())

    def delete(self) -> None:
        _Deletable.deleted.append(self.name)


class _Listing(Tag.div):
    def init(self) -> None:
        self.box = Tag.div()
        self <= self.box
        self.box <= _Deletable("mine", True)


def test_an_offer_does_not_pass_to_a_new_element_at_the_freed_ones_address():
    """The page sends ids (addresses); once an offered element is freed, CPython may put a
    new one, never offered that method, at the same address."""
    import gc

    from asgi_htag.process import host

    async def main() -> tuple:
        host.install_offer_recorder()
        spec = {"key": "k", "token": "t", "opts": {}, "init": [[], {}], "session": {}}
        app = host.AppHost(spec, _Listing, "")
        await app.render({"t": "render", "token": "t"})
        box = app.hr.tag.box
        offered = weakref.ref(box.childs[0])
        oid = id(box.childs[0])
        box.clear()
        gc.collect()
        freed = offered() is None
        others = []
        for i in range(10_000):  # until one lands where the offered one was (at once, in practice)
            row = _Deletable(f"bob-{i}", False)
            box <= row
            others.append(row)
            if id(row) == oid:
                break
        if id(others[-1]) != oid:
            # malloc handed that chunk to something else this time (the state a long test
            # run leaves it in): register the new row under the old id, as htag does when
            # the address is reused
            Tag.__instances__[oid] = others[-1]
        actions, _ = await app.interact({"id": oid, "method": "delete", "args": [], "kargs": {}, "event": {}}, None)
        host._offered.clear()
        return freed, actions

    _Deletable.deleted = []
    freed, actions = asyncio.run(main())
    assert freed, "the offered element is gone once the page no longer holds it"
    assert "refused" in actions.get("err", ""), actions
    assert _Deletable.deleted == []


def test_forker_fills_its_half_used_pools_before_forking():
    """The forker takes the free blocks of its half-used pymalloc pools, so that a child's
    new objects do not land in (and copy) pages shared with it."""
    import subprocess
    import sys

    code = (
        "import json, htag.render\n"
        "from asgi_htag.process import zygote as z\n"
        "before = z._partial_pool_blocks(); z._fill_partial_pools(); after = z._partial_pool_blocks()\n"
        "print(json.dumps([before, after]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    before, after = (dict(map(tuple, x)) for x in json.loads(out.stdout))
    assert len(before) >= 20 and sum(before.values()) > 0  # the stats were read
    emptied = [size for size, n in before.items() if n > 0 and after.get(size) == 0]
    still = [size for size, n in after.items() if n > 0]
    # what remains free is in the few pools started by the allocations made after the fill
    assert len(emptied) > len(still), (before, after)


def test_forker_empties_the_free_lists_it_would_hand_to_its_children():
    """A session process's full collections clear CPython's free lists: the objects in them
    must not be the forker's, inherited (freeing each would copy its page)."""
    import subprocess
    import sys

    code = (
        "import json, htag.render\n"
        "from asgi_htag.process import zygote as z\n"
        "junk = [(i, i) for i in range(3000)] + [{} for _ in range(200)] + [[] for _ in range(200)]\n"
        "del junk\n"  # what a warm-up leaves: full free lists
        "before = z._free_list_objects(); z._prepare_heap_for_forks(); after = z._free_list_objects()\n"
        "print(json.dumps([before, after]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    before, after = json.loads(out.stdout)
    assert before >= 2000, before  # the stats were read: 2,000 free 2-tuples at least
    assert after < 100, (before, after)  # what the pool filling itself leaves


def test_the_worker_side_warnings_reach_stderr_until_the_app_sets_up_logging(monkeypatch):
    """``uvicorn app:app`` configures only uvicorn's loggers: asgi_htag's warnings would be
    dropped by a NullHandler. Its fallback handler writes them to stderr, and steps aside
    once the root logger or the asgi_htag logger has a handler of its own."""
    import io
    import logging
    import sys

    import asgi_htag  # noqa: F401  (attaches the handler)

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # pytest's own capture handlers aside
    log = logging.getLogger("asgi_htag.app")
    log.warning("pool is full for %s", "abc")
    log.info("not at INFO")
    log.error("a line\nwith a newline")
    lines = err.getvalue().splitlines()
    assert lines[0].endswith("WARNING asgi_htag.app: pool is full for abc") and "asgi_htag[" in lines[0]
    assert "ERROR asgi_htag.app: a line" in lines[1] and len(lines) == 3, lines

    own = logging.StreamHandler(io.StringIO())
    for name in ("asgi_htag", "asgi_htag.app"):  # a handler of the app's, at either level
        logging.getLogger(name).addHandler(own)
        try:
            log.warning("handled by the app's own handler")
        finally:
            logging.getLogger(name).removeHandler(own)
    assert own.stream.getvalue().count("handled by the app's own handler") == 2
    root = logging.StreamHandler(io.StringIO())
    monkeypatch.setattr(logging.getLogger(), "handlers", [root])
    log.warning("handled through the root logger")
    assert len(err.getvalue().splitlines()) == 3, "never written twice"
    assert "handled through the root logger" in root.stream.getvalue()

    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(sys, "stderr", None)
    log.warning("no stderr at all: dropped, no exception")
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stderr", closed)
    monkeypatch.setattr(logging, "raiseExceptions", True)
    log.warning("a closed stderr: dropped, no exception")  # (a request must not fail over a log line)


@pytest.mark.parametrize(
    "data",
    [b"[" * 100_000, b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b'{"a": ' + b'{"b": ' * 50_000 + b"1" + b"}" * 50_001],
    ids=["list", "object of lists", "objects"],
)
def test_json_nested_past_the_recursion_limit_is_a_value_error_and_a_protocol_error_in_a_frame(data):
    """json.loads raises RecursionError there: wire.loads makes it the ValueError its
    callers handle as invalid JSON, not an internal error."""
    from asgi_htag.exceptions import ProtocolError

    with pytest.raises(RecursionError):
        json.loads(data)
    with pytest.raises(ValueError, match="nested too deeply"):
        wire.loads(data)
    with pytest.raises(ProtocolError, match="nested too deeply"):
        wire.decode_payload(data)
    nested_50 = "[" * 50 + "]" * 50  # well within the limit: parsed as json.loads does
    assert wire.loads(b'{"a": ' + nested_50.encode() + b"}") == {"a": json.loads(nested_50)}


# --- htag's tag classes, shared per process (host.share_tag_classes) ---------------------
@pytest.fixture
def shared_tags():
    """share_tag_classes installed (as in every session process), with an empty table."""
    from asgi_htag.process import host

    host.share_tag_classes()
    saved = dict(host._TAG_CLASSES)
    host._TAG_CLASSES.clear()
    yield host
    host._TAG_CLASSES.clear()
    host._TAG_CLASSES.update(saved)


def test_a_tag_name_gives_one_class_built_as_htag_builds_it(shared_tags):
    div = Tag.div
    assert Tag.div is div
    assert div.__name__ == "TagDiv" and div.tag == "div" and div.__bases__ == (Tag,)
    assert str(Tag.div("x", _class="c")) == '<div class="c">x</div>'  # as htag renders it
    a, b = Tag.div("a"), Tag.div("b")
    assert a.tag == b.tag == "div" and a.childs == ("a",) and b.childs == ("b",)

    class Mine(Tag.div):  # subclassing, as apps do: a base of its own, as htag gives
        pass

    base = Mine.__bases__[0]
    assert base is not div and base.__name__ == "TagDiv" and base.tag == "div" and base.__bases__ == (Tag,)
    assert Tag.div is div
    assert str(Mine("y")) == "<div>y</div>"


def test_a_change_to_tag_reaches_the_classes_given_after_it(shared_tags):
    before = Tag.p
    saved = Tag.STRICT_MODE
    try:
        Tag.STRICT_MODE = not saved
        after = Tag.p
        assert after is not before and after.STRICT_MODE is (not saved)
        assert Tag.p is after  # and it is shared from then on
        Tag.brand_new_attribute = 1
        assert Tag.p is not after and Tag.p.brand_new_attribute == 1
        del Tag.brand_new_attribute
        assert "brand_new_attribute" not in Tag.p.__dict__  # (a missing name, to htag, is a tag)
    finally:
        Tag.STRICT_MODE = saved
        if "brand_new_attribute" in Tag.__dict__:
            del Tag.brand_new_attribute
    assert Tag.p.STRICT_MODE is saved


def test_a_shared_class_changed_by_the_app_is_given_out_no_more(shared_tags):
    span = Tag.span
    span.js = "self.focus()"  # htag would have given this class to nobody else
    fresh = Tag.span
    assert fresh is not span and fresh.js is None and span.js == "self.focus()"
    del span.js
    assert Tag.span is fresh  # a change to a class no longer shared drops nothing
    # attributes set on an app's own classes (not shared) work as ever
    from tests.apps import Counter

    Counter.class_level = 3
    try:
        assert Counter.class_level == 3 and Tag.span is fresh
    finally:
        del Counter.class_level


def test_special_names_and_names_past_the_bound_are_not_shared(shared_tags):
    assert getattr(Tag, "_private_probe") is not getattr(Tag, "_private_probe")
    names = [f"x{i}" for i in range(shared_tags._TAG_CLASSES_MAX + 20)]
    for name in names:
        getattr(Tag, name)
    assert len(shared_tags._TAG_CLASSES) == shared_tags._TAG_CLASSES_MAX
    assert getattr(Tag, names[0]) is getattr(Tag, names[0])
    assert getattr(Tag, names[-1]) is not getattr(Tag, names[-1])  # htag's way: a new one
    assert getattr(Tag, names[-1]).tag == names[-1]


def test_components_keep_their_statics_order_and_inherit_nothing_from_a_shared_class(shared_tags):
    """htag collects statics by walking Tag's subclasses in the order they were made: a
    component's base must be made with it, not shared, or a later component's CSS could
    come out before an earlier one's and lose the cascade."""
    from htag.render import HRenderer

    Tag.div("made first")  # a shared div class exists before the components are declared

    class Card(Tag.div):
        statics = ".order-probe{color:red}"

    class Badge(Tag.span):
        statics = ".order-probe{color:green}"

    class Alert(Tag.div):  # declared last: meant to win the cascade
        statics = ".order-probe{color:blue}"

    class Page(Tag.body):
        def init(self):
            self <= Card("c") + Badge("b") + Alert("a")

    html = str(HRenderer(Page, ""))
    found = [c for c in ("red", "green", "blue") if f".order-probe{{color:{c}}}" in html]
    assert found == ["red", "green", "blue"]
    assert html.index("color:red") < html.index("color:green") < html.index("color:blue")

    shared = Tag.div
    shared.js = "self.remove()"  # set on the shared class: dropped from the table
    try:
        assert Card.js is None and Alert.js is None  # the components never inherited it
        assert not isinstance(Card("x"), shared)
        assert Tag.div is not shared and Tag.div.js is None
    finally:
        del shared.js
