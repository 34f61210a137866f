"""The fork server and the per-session processes, driven directly over their Unix sockets
with well-formed and hostile frames."""
import fcntl
import json
import logging
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

import anyio
import pytest
from anyio.abc import UNIXSocketStream

from asgi_htag.exceptions import PoolFull, ProcessGone, ProcessStartError
from asgi_htag.process import pool as pool_module
from asgi_htag.process import wire
from asgi_htag.process.pool import _ZYGOTE as ZYGOTE
from asgi_htag.process.pool import PoolConfig, ProcessPool
from tests.conftest import ROOT, pids_in_runtime

OPTS = {"http_only": False, "debug": False, "timeout_interaction": 5, "timeout_inactivity": 0}
KEY = "0123456789abcdef0123"


@pytest.fixture
def runtime():
    d = Path(tempfile.mkdtemp(prefix="ahp-"))
    os.chmod(d, 0o700)
    yield d
    for pid in pids_in_runtime(d):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    shutil.rmtree(d, ignore_errors=True)


def run(fn, runtime, **cfg):
    async def main():
        pool = ProcessPool(PoolConfig(runtime_dir=runtime, grace_seconds=cfg.pop("grace", 1.0), **cfg))
        try:
            return await fn(pool)
        finally:
            await pool.aclose()

    return anyio.run(main)


def raw_exchange(path: str, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def frame(obj) -> bytes:
    payload = json.dumps(obj).encode()
    return struct.pack(">I", len(payload)) + payload


def test_zygote_and_child_survive_hostile_frames(runtime):
    async def scenario(pool):
        info = await pool.spawn(KEY, "tests.apps:Counter", [[], {}], {}, OPTS)
        zpath = str(runtime / "zygote.s")
        cpath = pool.socket_path(KEY)
        for junk in (struct.pack(">I", 2**31) + b"x", frame([1, 2]), struct.pack(">I", 5) + b"\xff\xfe\xfd{}",
                     frame({"op": "nope"}), frame({"op": "spawn", "key": "../../etc/passwd"})):
            await anyio.to_thread.run_sync(raw_exchange, zpath, junk)
        for junk in (struct.pack(">I", 2**31), struct.pack(">I", 3) + b"{x}", frame({"t": "render", "token": "wrong"})):
            await anyio.to_thread.run_sync(raw_exchange, cpath, junk)
        stats = await pool.stats()
        conn = await pool.acquire(KEY)
        reply = await conn.request({"t": "render", "token": info["token"], "session": {}})
        await pool.release(conn)
        return stats, reply

    stats, reply = run(scenario, runtime)
    assert stats["ok"] and stats["count"] == 1
    assert reply["t"] == "html" and "<body" in reply["html"]


def _replies(data: bytes) -> list:
    out = []
    while len(data) >= 4:
        (n,) = struct.unpack(">I", data[:4])
        out.append(json.loads(data[4 : 4 + n].partition(b"\n")[0]))
        data = data[4 + n :]
    assert not data, "a reply was cut short"
    return out


def test_a_session_process_answers_pipelined_split_and_bulk_frames_in_order(runtime):
    """Frames cut anywhere and frames sent many at once are all answered, in order; 6 MB
    sent without reading a reply (reading pauses, then resumes) loses nothing; a bad frame
    after good ones gets the good ones answered, then the connection closed."""

    def exchange(path: str, token: str):
        ping = frame({"t": "ping", "token": token})
        wrong = frame({"t": "ping", "token": "wrong"})
        got = {}
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(20)
            s.connect(path)
            for byte in ping + wrong:  # one byte per write
                s.send(bytes([byte]))
                time.sleep(0.0005)
            s.sendall(ping + wrong + ping)  # three frames in one write
            padded = [frame({"t": "ping", "token": t, "pad": "x" * 20000}) for t in (token, "wrong") * 150]
            s.sendall(b"".join(padded))  # 6 MB without reading anything
            s.shutdown(socket.SHUT_WR)
            got["replies"] = _replies(raw_until_eof(s))
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(20)
            s.connect(path)
            s.sendall(ping + struct.pack(">I", 5) + b"{nope" + ping)
            got["after_bad"] = _replies(raw_until_eof(s))  # EOF although not shut down: closed by the process
        return got

    async def scenario(pool):
        info = await pool.spawn(KEY, "tests.apps:Counter", [[], {}], {}, OPTS)
        got = await anyio.to_thread.run_sync(exchange, pool.socket_path(KEY), info["token"])
        conn = await pool.acquire(KEY)
        got["render"] = await conn.request({"t": "render", "token": info["token"], "session": {}})
        await pool.release(conn)
        return got

    got = run(scenario, runtime)
    kinds = [r["t"] for r in got["replies"]]
    assert kinds == ["pong", "gone"] * 2 + ["pong"] + ["pong", "gone"] * 150
    assert [r["t"] for r in got["after_bad"]] == ["pong"]
    assert got["render"]["t"] == "html"


def raw_until_eof(s: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_wrong_token_is_told_gone_and_bad_keys_refused(runtime):
    async def scenario(pool):
        await pool.spawn(KEY, "tests.apps:Counter", [[], {}], {}, OPTS)
        conn = await pool.connect(KEY)
        gone = await conn.request({"t": "render", "token": "not-the-token", "session": {}})
        await conn.aclose()
        bad = await pool.zygote_request({"op": "spawn", "key": "ZZZ", "app": "tests.apps:Counter"})
        with pytest.raises(ProcessGone):
            await pool.connect("f" * 20)
        return gone, bad

    gone, bad = run(scenario, runtime)
    assert gone == {"t": "gone"}
    assert bad["ok"] is False and bad["error"] == "protocol"


def test_unknown_app_and_slow_creation_are_clear_errors(runtime):
    async def scenario(pool):
        with pytest.raises(ProcessStartError) as missing:
            await pool.spawn(KEY, "tests.apps:DoesNotExist", [[], {}], {}, OPTS)
        with pytest.raises(ProcessStartError) as slow:
            await pool.spawn(KEY, "tests.apps:SlowInit", [[], {}], {}, dict(OPTS, timeout_interaction=0.5))
        stats = await pool.stats()
        return missing.value, slow.value, stats

    missing, slow, stats = run(scenario, runtime)
    assert missing.kind == "import" and "DoesNotExist" in str(missing)
    assert slow.kind == "timeout"
    assert stats["count"] == 0 and not os.path.exists(runtime / f"{KEY}.s")


_LATE_APP = """
import os
from htag import Tag

with open({log!r}, "a") as f:  # an import-time side effect the test counts
    f.write(str(os.getpid()) + "\\n")

VERSION = {version!r}


class Late(Tag.body):
    def init(self):
        self <= Tag.span(VERSION, _data_test="version")
"""


def _late_module(tmp_path, monkeypatch, version="v1"):
    """A module, importable by the fork server, that logs every import of itself."""
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir(exist_ok=True)
    name = f"late_{os.getpid()}_{time.monotonic_ns()}"
    log = tmp_path / "imports.log"
    (mod_dir / f"{name}.py").write_text(_LATE_APP.format(log=str(log), version=version))
    monkeypatch.syspath_prepend(str(mod_dir))
    return name, mod_dir / f"{name}.py", log


def test_an_app_first_asked_for_once_the_forker_runs_is_imported_once(runtime, tmp_path, monkeypatch):
    """Module-level code of an app runs once per fork server: an app first used after the
    forker started is imported by the forker only (not by the zygote and again by the
    forker). A missing app asked for then is still an "import" error."""
    name, _path, log = _late_module(tmp_path, monkeypatch)

    async def scenario(pool):
        await pool.spawn("a" * 20, "tests.apps:Counter", [[], {}], {}, OPTS)  # the forker runs now
        late = await pool.spawn("b" * 20, f"{name}:Late", [[], {}], {}, OPTS)
        again = await pool.spawn("c" * 20, f"{name}:Late", [[], {}], {}, OPTS)
        with pytest.raises(ProcessStartError) as missing:
            await pool.spawn("d" * 20, f"{name}:Nope", [[], {}], {}, OPTS)
        conn = await pool.acquire("b" * 20)
        try:
            reply = await conn.request({"t": "render", "token": late["token"]})
        finally:
            await pool.release(conn)
        return late, again, missing.value, reply, await pool.stats()

    late, again, missing, reply, stats = run(scenario, runtime)
    assert log.read_text().split() == [str(stats["forker"])]
    assert late["pid"] != again["pid"] and 'data-test="version"' in reply["html"] and ">v1<" in reply["html"]
    assert missing.kind == "import" and "Nope" in str(missing)


def test_a_late_app_whose_file_changes_gets_a_fresh_fork_server(runtime, tmp_path, monkeypatch):
    """The forker reports the file of an app it imported, so an edit to it is seen like an
    edit to an app the zygote imported: the next new process runs the new code."""
    name, path, _log = _late_module(tmp_path, monkeypatch)

    async def render(pool, key):
        info = await pool.spawn(key, f"{name}:Late", [[], {}], {}, OPTS)
        conn = await pool.acquire(key)
        try:
            return (await conn.request({"t": "render", "token": info["token"]}))["html"]
        finally:
            await pool.release(conn)

    async def scenario(pool):
        await pool.spawn("a" * 20, "tests.apps:Counter", [[], {}], {}, OPTS)  # the forker runs now
        before = await render(pool, "b" * 20)
        old = (await pool.stats())["pid"]
        # a longer file: a new stamp even where mtimes are coarse
        path.write_text(path.read_text().replace("VERSION = 'v1'", "VERSION = 'v2-edited'"))
        after = await render(pool, "c" * 20)
        return before, after, old, (await pool.stats())["pid"]

    before, after, old_zygote, new_zygote = run(scenario, runtime)
    assert ">v1<" in before and ">v2-edited<" in after
    assert new_zygote != old_zygote


def test_an_app_file_touched_but_not_changed_keeps_the_fork_server_and_its_sessions(runtime, tmp_path, monkeypatch):
    """A new time on the same content (a touch, a copy or a checkout that does not keep
    times) is not an edit: restarting the fork server would end every live session."""
    name, path, _log = _late_module(tmp_path, monkeypatch)

    async def scenario(pool):
        live = await pool.spawn("b" * 20, f"{name}:Late", [[], {}], {}, OPTS)
        zygote = (await pool.stats())["pid"]
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        path.write_bytes(path.read_bytes())  # rewritten, the same bytes: a new time again
        fresh = await pool.spawn("c" * 20, f"{name}:Late", [[], {}], {}, OPTS)
        stats = await pool.stats()
        return zygote, stats, live, fresh

    zygote, stats, live, fresh = run(scenario, runtime)
    assert stats["pid"] == zygote, "the same fork server"
    assert live["pid"] in stats["pids"] and fresh["pid"] in stats["pids"]


def test_other_workers_log_a_fork_server_retired_for_new_code_as_planned_not_as_gone(runtime, tmp_path, monkeypatch, caplog):
    """After an edit of the app, the worker whose request finds it restarts the fork
    server; every other worker finds its presence connection closed at its next request.
    The fork server says why on that connection before it goes, so they log that it
    retired (INFO), not that it "is gone, and every session process with it" (a WARNING
    an operator would take for a crash) on every deploy."""
    caplog.set_level(logging.INFO, logger="asgi_htag")
    name, path, _log = _late_module(tmp_path, monkeypatch)

    async def main() -> Tuple[int, int, int]:
        first = ProcessPool(PoolConfig(runtime_dir=runtime, grace_seconds=1.0))
        second = ProcessPool(PoolConfig(runtime_dir=runtime, grace_seconds=1.0))
        try:
            await first.spawn("a" * 20, f"{name}:Late", [[], {}], {}, OPTS)
            await second.ensure_zygote()
            old = second._presence_pid
            path.write_text(path.read_text().replace("VERSION = 'v1'", "VERSION = 'v2-edited'"))
            await first.spawn("b" * 20, f"{name}:Late", [[], {}], {}, OPTS)  # stale: restarted
            for _ in range(100):  # the old one is gone (its sockets closed) once it has ended its processes
                if _gone(old):
                    break
                await anyio.sleep(0.05)
            info = await second.spawn("c" * 20, f"{name}:Late", [[], {}], {}, OPTS)
            return old, second._presence_pid, info["pid"]
        finally:
            await second.aclose()
            await first.aclose()

    old, new, pid = anyio.run(main)
    assert new != old and pid > 0
    assert f"the fork server (pid {old}) has retired (the app's code changed); starting a new one" in caplog.text
    assert "is gone, and every session process with it" not in caplog.text


@pytest.mark.parametrize(
    "sent, expected",
    [
        (None, None),  # nothing written: it lives
        (b"", ""),  # EOF: gone without a word
        (wire.encode({"t": "retiring", "reason": "the app's code changed"}), "the app's code changed"),
        (wire.encode({"t": "retiring", "reason": "x" * 1000}), "x" * 200),  # cut
        (wire.encode({"t": "retiring", "reason": 123}), ""),  # not a text
        (wire.encode({"t": "retiring", "reason": ""}), "no reason given"),
        (wire.encode({"t": "pong"}), ""),  # some other frame
        (b"\x00\x00\x00\x05{oops", ""),  # not JSON
        (b"\xff\xff\xff\xff" + b"x" * 100, ""),  # a length over the limit
        (b"\x00\x00\x10\x00" + b"{" * 50, ""),  # announces more than arrives
        (b"\x00\x00", ""),  # a truncated header
    ],
    ids=["alive", "eof", "retiring", "long reason", "reason not text", "empty reason", "other frame",
         "not json", "oversized", "truncated payload", "truncated header"],
)
def test_what_a_presence_connection_says_when_the_fork_server_goes(sent, expected):
    """The worker reads at most one frame from a presence connection that became readable:
    the fork server's RETIRING notice gives its reason; EOF, garbage, an oversized or
    truncated frame or any other frame mean it went without a word (a WARNING), and never
    raise."""

    async def main():
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pool = ProcessPool(PoolConfig(runtime_dir=Path(tempfile.gettempdir())))
        pool._presence = await UNIXSocketStream.from_socket(ours)
        try:
            if sent is not None:
                theirs.sendall(sent)
                theirs.close()
            return await pool._presence_alive()
        finally:
            theirs.close()
            await pool._presence.aclose()

    assert anyio.run(main) == expected


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_requests_to_the_zygote_reuse_idle_connections_and_survive_its_replacement(runtime, monkeypatch, caplog):
    """Renders ask the zygote for the process each time: one connection serves them one
    after the other (no connect/accept per render), concurrent ones open more and at most
    a few stay idle. When the zygote is killed, its idle connections are dropped and the
    next request reaches a new zygote."""
    opened = []
    real = ProcessPool.connect

    async def counting(self, key):
        conn = await real(self, key)
        if key == ZYGOTE:
            opened.append(conn)
        return conn

    monkeypatch.setattr(ProcessPool, "connect", counting)

    async def scenario(pool):
        first = await pool.spawn(KEY, "tests.apps:Counter", [[], {}], {}, OPTS)
        for _ in range(5):
            again = await pool.spawn(KEY, "tests.apps:Counter", [[], {}], {}, OPTS)
            assert again["pid"] == first["pid"] and not again["created"]
        stats = await pool.stats()
        sequential = len(opened)
        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(pool.spawn, f"{i:020d}", "tests.apps:Counter", [[], {}], {}, OPTS)
        concurrent, idle = len(opened), len(pool._idle.get(ZYGOTE, []))
        # a request in flight when the idle connections are dropped (the zygote found dead or
        # stale) does not bring its connection back among them
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: pool._zygote_call({"op": "stats"}, timeout=10))
            await anyio.sleep(0)  # the request is on its way on an idle connection
            await pool.drop_idle(ZYGOTE)
        dropped_in_flight = len(pool._idle.get(ZYGOTE, []))
        os.kill(stats["pid"], 9)
        for _ in range(100):  # dead (maybe a zombie nobody reaps): its sockets are closed
            if _gone(stats["pid"]):
                break
            await anyio.sleep(0.05)
        after = await pool.spawn(KEY, "tests.apps:Counter", [[], {}], {}, OPTS)
        return first, stats, sequential, concurrent, idle, dropped_in_flight, after, await pool.stats()

    first, stats, sequential, concurrent, idle, dropped_in_flight, after, stats2 = run(scenario, runtime)
    assert sequential == 1  # six spawns and a stats call on one connection
    assert 1 < concurrent <= 13 and idle <= 4 and dropped_in_flight == 0
    assert stats2["pid"] != stats["pid"] and after["created"] and after["pid"] != first["pid"]
    # the operator is told: every session ended with it
    assert f"the fork server (pid {stats['pid']}) is gone, and every session process with it" in caplog.text


def test_pool_limit(runtime):
    from asgi_htag.exceptions import PoolFull

    async def scenario(pool):
        await pool.spawn("a" * 20, "tests.apps:Counter", [[], {}], {}, OPTS)
        with pytest.raises(PoolFull):
            await pool.spawn("b" * 20, "tests.apps:Counter", [[], {}], {}, OPTS)
        # the same session asking again is not a new process
        return await pool.spawn("a" * 20, "tests.apps:Counter", [[], {}], {}, OPTS)

    again = run(scenario, runtime, max_processes=1)
    assert again["created"] is False


def test_second_zygote_for_the_same_dir_steps_aside_and_last_worker_leaving_stops_all(runtime):
    async def scenario(pool):
        info = await pool.spawn(KEY, "tests.apps:Counter", [[], {}], {}, OPTS)
        cfg = json.dumps({"runtime_dir": str(runtime)})
        out = subprocess.run([sys.executable, "-m", "asgi_htag.process.zygote", cfg], capture_output=True,
                             text=True, timeout=60, cwd=ROOT)
        return info, out.stdout.strip(), (await pool.stats())["pid"]

    info, line, zpid = run(scenario, runtime, grace=0.5)
    assert line == "EXISTS"
    # the pool closed its presence: after the grace period the zygote stops its children
    deadline = time.monotonic() + 20
    while pids_in_runtime(runtime) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pids_in_runtime(runtime)
    assert not os.path.exists(runtime / "zygote.s") and not os.path.exists(runtime / f"{KEY}.s")


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xff\xfe", b"not json", b"[]", b"1", b"null", b'"str"', b"{}", b'{"id": 1}', b'{"hello": 1, "k": "x"}',
     b'{"p": 1, "k": "x"}', b'{"p": "x"}', b"{" * 10000, b'{"id": "1", "method": "inc"}',
     b'{"id": 1, "method": ["inc"]}', b'{"id": 1, "method": "inc", "args": {}}'],
)
def test_hostile_interactions_get_errors_and_the_connection_keeps_working(runtime, raw):
    async def scenario(pool):
        info = await pool.spawn(KEY, "tests.apps:Counter", [[], {}], {}, OPTS)
        conn = await pool.connect(KEY)
        try:
            html = (await conn.request({"t": "render", "token": info["token"], "session": {}}))["html"]
            body_id = int(html.split('<body id="')[1].split('"')[0])
            await conn.send({"t": "interact", "token": info["token"]}, raw)
            bad = await conn.receive()
            await conn.send({"t": "interact", "token": info["token"]},
                            json.dumps({"id": body_id, "method": "inc", "args": [], "kargs": {}, "event": {}}).encode())
            good = await conn.receive()
            return bad, good
        finally:
            await conn.aclose()

    bad, good = run(scenario, runtime)
    assert bad["t"] in ("error", "actions")
    message = json.loads(bad["raw"])
    assert message.get("asgi_htag") == "error" or "refused" in message.get("err", "")
    assert good["t"] == "actions" and "update" in json.loads(good["raw"])


def test_at_max_processes_a_new_process_waits_for_one_told_to_go_but_not_past_its_limit(runtime):
    """max_processes=1. A session dropped (kill_owner) frees its place within moments: the
    next session's process waits for it instead of being refused. One that a click keeps
    busy holds its place longer than the wait (0.5 s here): refused, until it is gone."""
    from asgi_htag.exceptions import PoolFull

    async def scenario(pool):
        first = await pool.spawn("1" * 20, "tests.apps:Counter", [[], {}], {}, OPTS, owner="a" * 20)
        assert await pool.end_owner("a" * 20) == 1
        second = await pool.spawn("2" * 20, "tests.apps:Holder", [["3"], {}], {}, OPTS, owner="b" * 20)
        after_second = (await pool.stats())["pids"]
        conn = await pool.connect("2" * 20)
        try:
            html = (await conn.request({"t": "render", "token": second["token"], "session": {}}))["html"]
            oid = int(html.split('<body id="')[1].split('"')[0])  # hold() is bound on the body
            await conn.send({"t": "interact", "token": second["token"]},
                            json.dumps({"id": oid, "method": "hold", "args": [], "kargs": {}, "event": {}}).encode())
            await anyio.sleep(0.3)  # the click holds the process for 3 s
            assert await pool.end_owner("b" * 20) == 1
            with pytest.raises(PoolFull):
                await pool.spawn("3" * 20, "tests.apps:Counter", [[], {}], {}, OPTS, owner="c" * 20)
            answer = await conn.receive()  # the click ends; the process then goes
        finally:
            await conn.aclose()
        third = await pool.spawn("3" * 20, "tests.apps:Counter", [[], {}], {}, OPTS, owner="c" * 20)
        return first, second, third, after_second, answer, (await pool.stats())["pids"]

    first, second, third, after_second, answer, after_third = run(scenario, runtime, max_processes=1, full_wait_seconds=0.5)
    assert second["created"] and after_second == [second["pid"]], "the dropped session's process made room"
    assert answer["t"] == "actions", "the busy process finished its click before it went"
    assert third["created"] and after_third == [third["pid"]]
    assert first["pid"] not in after_third and second["pid"] not in after_third


def test_at_max_processes_the_oldest_process_whose_page_never_made_contact_makes_room(runtime):
    """A client that runs no JavaScript (a crawler, curl) gets a process that its page
    never contacts: at max_processes, the oldest such process past the age limit (1 s
    here) is ended for a newcomer, instead of the newcomer being refused until
    timeout_abandoned. A process whose page made contact is never ended for that."""
    from asgi_htag.exceptions import PoolFull

    keys = [f"{i}" * 20 for i in range(1, 6)]

    async def scenario(pool):
        talked = await pool.spawn(keys[0], "tests.apps:Counter", [[], {}], {}, OPTS)
        conn = await pool.connect(keys[0])
        try:
            reply = await conn.request({"t": "subscribe", "token": talked["token"], "k": None})
            assert reply["t"] == "subscribed"
        finally:
            await conn.aclose()
        silent = await pool.spawn(keys[1], "tests.apps:Counter", [[], {}], {}, OPTS)
        with pytest.raises(PoolFull):  # the silent one is too young to be judged
            await pool.spawn(keys[2], "tests.apps:Counter", [[], {}], {}, OPTS)
        await anyio.sleep(1.3)
        newcomer = await pool.spawn(keys[2], "tests.apps:Counter", [[], {}], {}, OPTS)
        after = (await pool.stats())["pids"]
        with pytest.raises(PoolFull):  # the talker has made contact, the newcomer is young
            await pool.spawn(keys[3], "tests.apps:Counter", [[], {}], {}, OPTS)
        return talked, silent, newcomer, after

    talked, silent, newcomer, after = run(scenario, runtime, max_processes=2, evict_uncontacted_after=1.0)
    assert newcomer["created"] and sorted(after) == sorted([talked["pid"], newcomer["pid"]])
    assert silent["pid"] not in after


def test_a_fork_server_still_running_takes_on_the_settings_of_a_worker_that_comes_with_others(runtime, capfd):
    """A server restarted within the fork server's grace period (or a new worker of a
    rolling deploy) used to find it still running with the old settings, silently: here
    max_processes=1 kept turning people away after a restart with max_processes=3."""
    from asgi_htag.exceptions import PoolFull

    async def scenario():
        old = ProcessPool(PoolConfig(runtime_dir=runtime, grace_seconds=1.0, max_processes=1))
        try:
            first = await old.spawn("1" * 20, "tests.apps:Counter", [[], {}], {}, OPTS)
            with pytest.raises(PoolFull):
                await old.spawn("2" * 20, "tests.apps:Counter", [[], {}], {}, OPTS)
            zygote = (await old.stats())["pid"]
            new = ProcessPool(PoolConfig(runtime_dir=runtime, grace_seconds=1.0, max_processes=3, process_loop="asyncio"))
            try:
                second = await new.spawn("2" * 20, "tests.apps:Counter", [[], {}], {}, OPTS)
                third = await new.spawn("3" * 20, "tests.apps:Counter", [[], {}], {}, OPTS)
                stats = await new.stats()
            finally:
                await new.aclose()
        finally:
            await old.aclose()
        return first, second, third, zygote, stats

    first, second, third, zygote, stats = anyio.run(scenario)
    assert stats["pid"] == zygote, "the same fork server, not a new one"
    assert second["created"] and third["created"] and stats["count"] == 3
    err = capfd.readouterr().err
    assert "a worker brought other settings, now in force: max_processes 1 -> 3" in err
    assert "process_loop 'asyncio' (still 'auto')" in err, "what cannot change now is said, not ignored"


def test_the_delay_to_make_contact_counts_from_when_the_page_was_last_handed_out(runtime):
    """Not from the fork: a process that took longer than the delay to start, or a page
    rendered again (a reload) after a while, gets its full delay from then on."""
    from asgi_htag.exceptions import PoolFull

    async def render(pool, key, token):
        conn = await pool.connect(key)
        try:
            return (await conn.request({"t": "render", "token": token, "session": {}}))["t"]
        finally:
            await conn.aclose()

    async def scenario(pool):
        slow = await pool.spawn("1" * 20, "tests.apps:SlowStart", [[], {}], {}, OPTS)  # 1 s to start: as long as the delay
        with pytest.raises(PoolFull):  # ready just now: its page has not even been rendered
            await pool.spawn("2" * 20, "tests.apps:Counter", [[], {}], {}, OPTS)
        assert await render(pool, "1" * 20, slow["token"]) == "html"
        await anyio.sleep(1.2)
        again = await pool.spawn("1" * 20, "tests.apps:SlowStart", [[], {}], {}, OPTS)  # a reload
        assert again["created"] is False and await render(pool, "1" * 20, again["token"]) == "html"
        with pytest.raises(PoolFull):  # rendered again just now
            await pool.spawn("2" * 20, "tests.apps:Counter", [[], {}], {}, OPTS)
        await anyio.sleep(1.2)
        newcomer = await pool.spawn("2" * 20, "tests.apps:Counter", [[], {}], {}, OPTS)
        return slow, newcomer, (await pool.stats())["pids"]

    slow, newcomer, pids = run(scenario, runtime, max_processes=1, evict_uncontacted_after=1.0)
    assert newcomer["created"] and pids == [newcomer["pid"]] and slow["pid"] not in pids


def test_a_hello_with_settings_out_of_range_is_ignored_and_a_raised_limit_frees_parked_spawns(runtime, capfd):
    """A worker's hello must not stop the fork server (inf, NaN, negative values); and a
    spawn parked at max_processes gets its place as soon as a hello raises the limit."""
    from asgi_htag.process import wire as _wire

    async def hello(settings):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(runtime / "zygote.s"))
            s.sendall(_wire.encode({"op": "hello", "settings": settings}))
            return s.recv(65536)

    async def scenario(pool):
        held = await pool.spawn("1" * 20, "tests.apps:Holder", [["4"], {}], {}, OPTS, owner="a" * 20)
        conn = await pool.connect("1" * 20)
        html = (await conn.request({"t": "render", "token": held["token"], "session": {}}))["html"]
        oid = int(html.split('<body id="')[1].split('"')[0])
        await conn.send({"t": "interact", "token": held["token"]},
                        json.dumps({"id": oid, "method": "hold", "args": [], "kargs": {}, "event": {}}).encode())
        await anyio.sleep(0.3)
        zygote = (await pool.stats())["pid"]
        for bad in ({"max_processes": float("inf")}, {"max_starting": float("inf")}, {"max_processes": 0},
                    {"start_timeout_seconds": float("inf")}, {"start_timeout_seconds": -1}, {"full_wait_seconds": float("nan")},
                    {"grace_seconds": "x"}, {"max_processes": 2.5}, {"max_processes": True}):
            assert b'"ok":true' in (await hello(bad)).replace(b" ", b""), bad
        assert await pool.end_owner("a" * 20) == 1  # busy 4 s more: leaving, not gone
        t0 = time.monotonic()
        result = {}

        async def newcomer():
            result["spawn"] = await pool.spawn("2" * 20, "tests.apps:Counter", [[], {}], {}, OPTS)
            result["after"] = time.monotonic() - t0

        async with anyio.create_task_group() as tg:
            tg.start_soon(newcomer)
            await anyio.sleep(0.5)
            result["raised_at"] = time.monotonic() - t0
            await hello({"max_processes": 5})
        await conn.aclose()
        return zygote, (await pool.stats())["pid"], result

    zygote, still, result = run(scenario, runtime, max_processes=1, full_wait_seconds=3.0)
    assert still == zygote, "the same fork server lives on"
    assert result["spawn"]["created"] and result["raised_at"] <= result["after"], result
    err = capfd.readouterr().err
    assert err.count("a worker brought settings out of range, ignored") == 9
    assert "max_processes 1 -> 5" in err


def test_a_replacement_refused_at_max_processes_leaves_the_process_it_would_replace(runtime):
    """New query params rebuild a session's instance; on a host over its limit (lowered by
    a worker's hello here) the rebuild is refused, and the instance the page has lives on
    (it used to be killed first, then the replacement refused)."""
    from asgi_htag.exceptions import PoolFull
    from asgi_htag.process import wire as _wire

    async def scenario(pool):
        a = await pool.spawn("1" * 20, "tests.apps:Query", [["x"], {}], {}, OPTS)
        await pool.spawn("2" * 20, "tests.apps:Counter", [[], {}], {}, OPTS)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(runtime / "zygote.s"))
            s.sendall(_wire.encode({"op": "hello", "settings": {"max_processes": 1}}))
            s.recv(65536)
        with pytest.raises(PoolFull):
            await pool.spawn("1" * 20, "tests.apps:Query", [["y"], {}], {}, OPTS)
        conn = await pool.connect("1" * 20)
        try:
            reply = await conn.request({"t": "render", "token": a["token"], "session": {}})
        finally:
            await conn.aclose()
        return a, (await pool.stats())["pids"], reply

    a, pids, reply = run(scenario, runtime, max_processes=3)
    assert a["pid"] in pids and reply["t"] == "html", "the instance the page has still answers"


def test_the_fork_server_skips_a_stale_event_and_answers_parked_spawns_when_it_stops(runtime):
    import selectors as _selectors

    from asgi_htag.process.zygote import Zygote

    z = Zygote({"runtime_dir": str(runtime)})
    r1, w1 = os.pipe()
    key = z.sel.register(r1, _selectors.EVENT_READ, "ready")
    assert z._still_registered(key)
    z.sel.unregister(r1)
    os.close(r1)
    r2, w2 = os.pipe()  # the same descriptor number, most likely: a new child's pipe
    z.sel.register(r2, _selectors.EVENT_READ, "ready")
    assert not z._still_registered(key), "an event of the closed descriptor is not taken for the new one's"
    a, b = socket.socketpair()
    z.parked.append((a, {"op": "spawn", "key": "3" * 20}, time.monotonic() + 60))
    z.shutdown()
    reply = b.recv(65536)
    assert b'"error":"full"' in reply.replace(b" ", b"") and not z.parked
    for fd in (w1, r2, w2):
        os.close(fd)
    a.close()
    b.close()


def test_a_burst_of_new_sessions_queues_and_every_one_starts(runtime):
    async def scenario(pool):
        results = {}

        async def one(i):
            results[i] = await pool.spawn(f"{i:020x}", "tests.apps:Counter", [[], {}], {}, OPTS)

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(one, i)
        return results, await pool.stats()

    results, stats = run(scenario, runtime, max_starting=1)
    assert len({r["pid"] for r in results.values()}) == 8 and all(r["created"] for r in results.values())
    assert stats["count"] == 8


@pytest.mark.parametrize("setting, expected", [("asyncio", "asyncio."), ("uvloop", "uvloop"), ("auto", "uvloop")])
def test_process_loop_setting_picks_the_event_loop_of_every_process(runtime, setting, expected):
    async def scenario(pool):
        info = await pool.spawn(KEY, "tests.apps:LoopName", [[], {}], {}, OPTS)
        conn = await pool.acquire(KEY)
        try:
            return await conn.request({"t": "render", "token": info["token"]})
        finally:
            await pool.release(conn)

    reply = run(scenario, runtime, process_loop=setting)
    import re

    loop_module = re.search(r'data-test="loop"[^>]*>([^<]*)<', reply["html"]).group(1)
    assert loop_module.startswith(expected), loop_module


def _present(address: int) -> bool:
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(address // 4096 * 8)
        return bool(struct.unpack("<Q", f.read(8))[0] >> 63)


def test_release_zero_pages_releases_the_longest_zero_run_and_keeps_every_byte():
    import ctypes

    from asgi_htag.process.zygote import _PAGE, release_zero_pages

    size = 64 * _PAGE
    buf = ctypes.create_string_buffer(size)
    ctypes.memset(buf, 0, size)  # every page resident
    base = ctypes.addressof(buf)
    first = (base + _PAGE - 1) // _PAGE * _PAGE  # first whole page inside the buffer
    # data in whole page 3 and whole page 40: zero runs of 3, 36 and the tail in between
    marks = {first - base + 3 * _PAGE + 17: 1, first - base + 40 * _PAGE: 2, size - 1: 3}
    for offset, value in marks.items():
        buf[offset] = value
    expected = bytearray(size)
    for offset, value in marks.items():
        expected[offset] = value

    released = release_zero_pages(base, size, min_pages=4)

    assert released == 36 * _PAGE  # pages 4..39, the longest run
    assert not any(_present(first + i * _PAGE) for i in range(4, 40))
    assert _present(first + 3 * _PAGE) and _present(first + 40 * _PAGE)
    assert buf.raw == bytes(expected), "released pages read as zeros, data pages are untouched"
    buf[first - base + 10 * _PAGE] = 9  # a released page can be written again
    assert buf[first - base + 10 * _PAGE] == b"\x09"


def test_release_zero_pages_leaves_short_runs_and_empty_ranges_alone():
    import ctypes

    from asgi_htag.process.zygote import _PAGE, release_zero_pages

    size = 8 * _PAGE
    buf = ctypes.create_string_buffer(size)
    ctypes.memset(buf, 0, size)
    assert release_zero_pages(ctypes.addressof(buf), size, min_pages=16) == 0
    assert release_zero_pages(ctypes.addressof(buf), 0) == 0
    assert release_zero_pages(ctypes.addressof(buf), _PAGE - 1, min_pages=1) == 0  # no whole page
    ctypes.memset(buf, 7, size)
    assert release_zero_pages(ctypes.addressof(buf), size, min_pages=1) == 0
    assert buf.raw == b"\x07" * size


def test_a_session_process_loop_leaves_its_receive_buffer_unresident_and_still_reads():
    """What every uvloop session process gets (``_new_uvloop``): the loop object's zeroed
    receive buffer is handed back (so a uvloop that changes its layout shows up here),
    and reads through that buffer still carry every byte."""
    import asyncio

    pytest.importorskip("uvloop")
    from asgi_htag.process.zygote import _PAGE, _new_uvloop

    loop = _new_uvloop()
    try:
        start, size = id(loop), type(loop).__basicsize__
        pages = range((start + _PAGE - 1) // _PAGE * _PAGE, start + size - _PAGE, _PAGE)
        resident = sum(_present(a) for a in pages)
        assert len(pages) >= 60 and resident <= 4, (len(pages), resident)

        async def echo() -> bytes:
            a, b = socket.socketpair()
            reader, writer = await asyncio.open_connection(sock=a)
            data = os.urandom(300_000)  # more than the buffer: it fills and is reused
            b.setblocking(False)
            await loop.sock_sendall(b, data)
            got = await reader.readexactly(len(data))
            writer.close()
            b.close()
            assert got == data
            return got

        assert len(loop.run_until_complete(echo())) == 300_000
    finally:
        loop.close()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie waits for its new parent to reap it: it runs no more


def test_a_killed_forker_is_replaced_and_its_processes_live_on(runtime):
    """The forker (which does the forks) is killed (or replaced after a timeout, an app
    whose import takes too long): its processes live on, the fork server notices, and the
    next new session gets a new forker."""
    import signal as sig

    async def scenario(pool):
        first = await pool.spawn("a" * 20, "tests.apps:Counter", [[], {}], {}, OPTS)
        before = await pool.stats()
        os.kill(before["forker"], sig.SIGKILL)
        deadline = time.monotonic() + 20
        while _alive(before["forker"]) and time.monotonic() < deadline:
            await anyio.sleep(0.05)
        second = await pool.spawn("b" * 20, "tests.apps:Counter", [[], {}], {}, OPTS)
        replies = []
        for key, info in (("a" * 20, first), ("b" * 20, second)):
            conn = await pool.acquire(key)
            try:
                replies.append(await conn.request({"t": "render", "token": info["token"]}))
            finally:
                await pool.release(conn)
        return first, before, second, replies, await pool.stats()

    first, before, second, replies, after = run(scenario, runtime)
    assert before["forker"] > 0 and before["count"] == 1 and before["pids"] == [first["pid"]]
    assert [r["t"] for r in replies] == ["html", "html"] and str(first["pid"]) in replies[0]["html"]
    assert after["forker"] not in (0, before["forker"]) and sorted(after["pids"]) == sorted([first["pid"], second["pid"]])


def test_processes_orphaned_by_a_dead_forker_are_adopted_and_reaped_by_the_fork_server(runtime):
    """The fork server is the subreaper of its forker's processes: when the forker dies,
    they become its children, and when they end it reaps them, instead of their going to
    an init that may never reap them (a container's PID 1 often does not)."""
    import signal as sig

    def ppid(pid):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])

    async def scenario(pool):
        info = await pool.spawn(KEY, "tests.apps:Counter", [[], {}], {}, OPTS)
        before = await pool.stats()
        assert ppid(info["pid"]) == before["forker"]
        os.kill(before["forker"], sig.SIGKILL)
        deadline = time.monotonic() + 20
        while ppid(info["pid"]) == before["forker"] and time.monotonic() < deadline:
            await anyio.sleep(0.01)
        adopted_by = ppid(info["pid"])
        await pool.kill(KEY)
        while Path(f"/proc/{info['pid']}").exists() and time.monotonic() < deadline:
            await anyio.sleep(0.05)
        return before, adopted_by, Path(f"/proc/{info['pid']}").exists()

    before, adopted_by, still_there = run(scenario, runtime)
    assert adopted_by == before["pid"], "the fork server adopts the orphan"
    assert not still_there, "and reaps it when it ends: no zombie is left"


def test_session_processes_end_with_their_fork_server_however_it_ends(runtime):
    """SIGKILL of the fork server (no chance to stop its processes): they see its life pipe
    close and end by themselves."""
    import signal as sig

    async def scenario(pool):
        infos = [await pool.spawn(f"{i:020d}", "tests.apps:Counter", [[], {}], {}, OPTS) for i in range(2)]
        stats = await pool.stats()
        os.kill(stats["pid"], sig.SIGKILL)
        deadline = time.monotonic() + 20
        while any(_alive(i["pid"]) for i in infos) and time.monotonic() < deadline:
            await anyio.sleep(0.05)
        return [_alive(i["pid"]) for i in infos] + [_alive(stats["forker"])]

    assert run(scenario, runtime) == [False, False, False]


def _serve_unix(path, handler):
    """A plain asyncio Unix server standing in for a per-session process."""
    import asyncio

    return asyncio.start_unix_server(handler, path=path)


def test_unix_stream_delivers_in_order_across_read_pauses_then_reports_the_end(runtime):
    """A process that sends far more than the reader takes at once: reading pauses above the
    limit and resumes as the reader catches up; nothing is lost or reordered; the end of the
    stream shows after the last byte."""
    from asgi_htag.process.pool import _ReadBuffer, _UnixStream

    path = str(runtime / "big.s")
    blob = bytes(range(256)) * (4 * 16384 + 7)  # ~16 MiB: several times the pause limit

    async def main():
        import asyncio

        async def handler(reader, writer):
            writer.write(blob)
            await writer.drain()
            writer.close()

        server = await _serve_unix(path, handler)
        try:
            stream = await _UnixStream.connect(path)
            got = bytearray()
            for _ in range(1000):  # bounded: the sender runs ahead until reading pauses
                if stream._proto.reading_paused:
                    break
                await asyncio.sleep(0.01)
            paused_seen = stream._proto.reading_paused
            buffered = len(stream._proto.buf)
            while True:
                try:
                    got += await stream.receive()
                except anyio.EndOfStream:
                    break
            await stream.aclose()
            return bytes(got), paused_seen, buffered
        finally:
            server.close()

    got, paused_seen, buffered = anyio.run(main)
    assert got == blob
    assert paused_seen and buffered < len(blob) and len(blob) > 3 * _ReadBuffer.PAUSE_ABOVE


def test_child_connection_on_unix_stream_refuses_hostile_frames_and_notices_a_dead_peer(runtime):
    from asgi_htag.exceptions import ProtocolError
    from asgi_htag.process import wire
    from asgi_htag.process.pool import ChildConnection, _UnixStream

    path = str(runtime / "hostile.s")
    replies = {
        "oversized": struct.pack(">I", 2**31) + b"x" * 64,
        "not json": struct.pack(">I", 5) + b"\xff\xfe{[(",
        "truncated": struct.pack(">I", 100) + b'{"t": "ac',
    }

    async def main():
        async def handler(reader, writer):
            kind = (await reader.readline()).decode().strip()
            if kind in replies:
                writer.write(replies[kind])
            elif kind == "good":
                writer.write(wire.encode({"t": "pong"}, raw=b'{"x": 1}'))
                await writer.drain()
                await reader.read()  # then wait for the worker to hang up
            writer.close()

        server = await _serve_unix(path, handler)
        out = {}
        try:
            for kind in list(replies) + ["good", "dead"]:
                conn = ChildConnection("k", await _UnixStream.connect(path), wire.DEFAULT_MAX_FRAME_BYTES)
                await conn._stream.send(kind.encode() + b"\n")
                try:
                    out[kind] = await conn.receive_frame()
                except (ProtocolError, ProcessGone) as exc:
                    out[kind] = type(exc).__name__
                if kind == "dead":
                    try:
                        await conn.send({"t": "ping"})
                        await conn.send({"t": "ping"})
                        out["send after end"] = "sent"
                    except ProcessGone:
                        out["send after end"] = "ProcessGone"
                out[kind + " broken"] = conn.broken
                await conn.aclose()
        finally:
            server.close()
        return out

    out = anyio.run(main)
    assert out["oversized"] == "FrameTooLarge" and out["oversized broken"]  # a ProtocolError
    assert out["not json"] == "ProtocolError" and out["not json broken"]
    assert out["truncated"] == "ProcessGone" and out["truncated broken"]
    assert out["good"] == ({"t": "pong"}, b'{"x": 1}') and not out["good broken"]
    assert out["dead"] == "ProcessGone" and out["send after end"] == "ProcessGone"


def test_off_asyncio_the_pool_talks_to_processes_through_anyio_streams(runtime, monkeypatch):
    """Under another anyio backend the pool uses anyio's socket stream (the asyncio fast
    path is not taken): the same process answers the same way."""
    from asgi_htag.process import pool as pool_module

    monkeypatch.setattr(pool_module, "_on_asyncio", lambda: False)

    async def scenario(pool):
        info = await pool.spawn(KEY, "tests.apps:Counter", [[], {}], {}, OPTS)
        conn = await pool.connect(KEY)
        try:
            kind = type(conn._stream).__name__
            reply = await conn.request({"t": "render", "token": info["token"]})
        finally:
            await conn.aclose()
        return kind, reply, info

    kind, reply, info = run(scenario, runtime)
    assert kind != "_UnixStream" and reply["t"] == "html" and str(info["pid"]) in reply["html"]


def _fds(pid: int) -> set:
    """What ``pid``'s descriptors other than stdin, stdout and stderr lead to."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if int(fd) <= 2:
            continue
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def test_a_killed_process_leaves_no_socket_and_no_process_holds_another_ones_start_up_pipe(runtime):
    async def go(pool):
        first = await pool.spawn("aa" * 10, "tests.apps:Counter", [[], {}], {}, OPTS)
        second = await pool.spawn("bb" * 10, "tests.apps:Counter", [[], {}], {}, OPTS)
        forker = (await pool.stats())["forker"]
        # every process has its own start-up pipe: the forker (forked on the first spawn)
        # and the second process hold nothing of the first one's
        pipes = {pid: {f for f in _fds(pid) if f.startswith("pipe:")} for pid in (forker, first["pid"], second["pid"])}
        await pool.kill("aa" * 10, first["pid"])
        for _ in range(100):
            if not os.path.exists(f"/proc/{first['pid']}"):
                break
            await anyio.sleep(0.05)
        await anyio.sleep(0.3)
        return pipes, sorted(p.name for p in runtime.iterdir() if p.name.endswith(".s"))

    pipes, sockets = run(go, runtime)
    forker, first, second = pipes.values()
    assert sockets == ["bb" * 10 + ".s", "zygote.s"], "the killed process's socket was removed"
    life = forker & first & second  # the read end of the fork server's life pipe: all of them
    assert len(life) == 1
    shared = ((forker & first) | (forker & second) | (first & second)) - life
    assert not shared, f"start-up pipes shared between processes: {shared}"


def test_every_worker_waiting_for_a_starting_process_gets_its_answer_when_one_goes_away(runtime):
    from asgi_htag.process.pool import _spawn_zygote

    cfg = {"runtime_dir": str(runtime), "grace_seconds": 2, "sys_path": [str(ROOT)] + sys.path, "apps": []}
    line = _spawn_zygote(json.dumps(cfg), 60)
    zygote_pid = int(line.split()[1])
    path = str(runtime / "zygote.s")

    def connect():
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(path)
        return s

    def recv_frame(s):
        header = s.recv(4, socket.MSG_WAITALL)
        (n,) = struct.unpack(">I", header)
        return json.loads(s.recv(n, socket.MSG_WAITALL))

    presence = connect()
    presence.sendall(frame({"op": "hello"}))
    recv_frame(presence)
    key = "cd" * 10
    spawn = {"op": "spawn", "key": key, "app": "tests.apps:SlowStart", "init": [[], {}], "session": {},
             "opts": {"timeout_interaction": 0}}
    first, second, third = connect(), connect(), connect()
    for s in (first, second, third):
        s.sendall(frame(spawn))
        time.sleep(0.2)  # all three wait for the same starting process, in this order
    os.kill(zygote_pid, signal.SIGSTOP)  # the process gets ready while the zygote looks away...
    try:
        deadline = time.monotonic() + 10
        while not (runtime / f"{key}.s").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        first.close()  # ...and the first worker goes away: its answer fails in the same round
    finally:
        os.kill(zygote_pid, signal.SIGCONT)
    assert recv_frame(second)["ok"] is True
    assert recv_frame(third)["ok"] is True
    for s in (second, third, presence):
        s.close()


def test_a_worker_that_comes_while_the_fork_server_stops_gets_a_new_one(runtime):
    cfg = PoolConfig(runtime_dir=runtime, grace_seconds=0.3)

    async def go():
        first = ProcessPool(cfg)
        old = await first.spawn("ef" * 10, "tests.apps:Lingerer", [[], {}], {}, OPTS)
        old_zygote = (await first.stats())["pid"]
        await first.aclose()  # the last worker goes (a restart): grace, then the zygote stops,
        await anyio.sleep(0.6)  # and waits 1.5 s for its process to end
        second = ProcessPool(cfg)  # the next worker comes meanwhile
        starts = []
        start_zygote = second._start_zygote

        async def counted() -> None:
            starts.append(_gone(old_zygote))
            await start_zygote()

        second._start_zygote = counted  # type: ignore[method-assign]
        try:
            await second.ensure_zygote()
            info = await second.spawn("ef" * 10, "tests.apps:Counter", [[], {}], {}, OPTS)
            return old, old_zygote, info, (await second.stats())["pid"], starts
        finally:
            await second.aclose()

    old, old_zygote, info, new_zygote, starts = anyio.run(go)
    assert new_zygote != old_zygote and info["created"] and info["pid"] != old["pid"]
    # one interpreter started, while the old one was still there: it waited for the old
    # one's lock instead of stepping aside (the worker then started one every 0.2 s)
    assert starts == [False]


@pytest.mark.parametrize("listening", [False, True])
def test_a_new_zygote_waits_for_a_stopping_ones_lock_and_steps_aside_for_a_listening_one(runtime, listening):
    """The lifetime lock is held (by a zygote on its way out, or by one that serves): the
    new zygote waits for it only when nobody listens on the socket."""
    import fcntl
    import threading

    from asgi_htag.process.zygote import Zygote

    held = open(runtime / "zygote.life.lock", "a+")
    fcntl.flock(held, fcntl.LOCK_EX)
    listener = None
    if listening:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(runtime / "zygote.s"))
        listener.listen(1)
    released = []

    def release_later() -> None:
        time.sleep(0.5)
        released.append(True)
        held.close()

    releaser = threading.Thread(target=release_later)
    releaser.start()
    zygote = Zygote({"runtime_dir": str(runtime)})
    try:
        took = zygote.acquire(wait_seconds=60)
        order = list(released)
    finally:
        releaser.join()
        for f in zygote.lock_files:
            f.close()
        if listener is not None:
            listener.close()
    if listening:
        assert (took, order) == (False, [])  # did not wait for the lock
    else:
        assert (took, order) == (True, [True])  # had it once the holder let go

    # a holder that never lets go: the wait ends, and the new zygote steps aside
    # (pytest-timeout's SIGALRM timer, running now, is put back as it was)
    held = open(runtime / "zygote.life.lock", "a+")
    fcntl.flock(held, fcntl.LOCK_EX)
    handler, (left, _) = signal.getsignal(signal.SIGALRM), signal.getitimer(signal.ITIMER_REAL)
    try:
        assert Zygote({"runtime_dir": str(runtime)}).acquire(wait_seconds=0.2) is False
        assert signal.getsignal(signal.SIGALRM) is handler
        assert (signal.getitimer(signal.ITIMER_REAL)[0] > 0) == (left > 0)
    finally:
        held.close()


def test_ending_a_sessions_processes_starts_no_fork_server_when_none_runs(runtime):
    async def go(pool):
        assert await pool.end_owner("ab" * 10) == 0
        return sorted(p.name for p in runtime.iterdir())

    assert run(go, runtime) == [], "no fork server was started"


def test_a_worker_that_starts_while_the_fork_server_is_stalled_still_starts(runtime, tmp_path):
    """A worker's start-up that cannot reach a busy fork server logs it and completes:
    failing it fails the worker's boot, and gunicorn then stops every worker. Requests
    get a clear timeout meanwhile, and all works once the fork server answers again."""
    from dataclasses import replace

    from asgi_htag.app import Engine

    async def main() -> None:
        first = ProcessPool(PoolConfig(runtime_dir=runtime, grace_seconds=1.0))
        engine = Engine(runtime_dir=runtime, state_dir=tmp_path / "state", zygote_grace_seconds=1.0)
        engine.pool_config = replace(engine.pool_config, zygote_answer_seconds=1.0)
        try:
            await first.ensure_zygote()
            zygote_pid = first._presence_pid
            os.kill(zygote_pid, signal.SIGSTOP)
            try:
                await engine.startup([])  # a new worker's start-up: must not raise
                with pytest.raises(ProcessStartError) as refused:
                    await engine.pool.zygote_request({"op": "stats"}, timeout=1.0)
                assert refused.value.kind == "timeout"
            finally:
                os.kill(zygote_pid, signal.SIGCONT)
            info = await engine.pool.spawn(KEY, "tests.apps:Counter", [[], {}], {}, OPTS)
            assert info["pid"] > 0
            assert (await engine.pool.stats())["pid"] == zygote_pid, "the same fork server, answering again"
        finally:
            await engine.shutdown()
            await first.aclose()

    anyio.run(main)


def test_a_leftover_the_fork_server_cannot_remove_does_not_end_other_sessions(runtime, capfd):
    """When a process ends, the fork server removes its socket and busy mark; if that
    fails (the runtime dir's permissions changed, a directory where the file was), it says
    so and carries on: before, the error stopped it and every session with it."""
    other = "fedcba9876543210fedc"

    async def scenario(pool):
        ending = await pool.spawn(KEY, "tests.apps:Counter", [[], {}], {}, OPTS)
        staying = await pool.spawn(other, "tests.apps:Counter", [[], {}], {}, OPTS)
        zygote_pid = (await pool.stats())["pid"]
        busy = wire.busy_path(pool.socket_path(KEY))
        os.unlink(busy)
        os.mkdir(busy)  # unlink() of it fails, and not with FileNotFoundError
        with open(os.path.join(busy, "x"), "w"):
            pass
        os.kill(ending["pid"], signal.SIGKILL)
        for _ in range(100):  # bounded: until the fork server has seen it end
            if ending["pid"] not in (await pool.stats())["pids"]:
                break
            await anyio.sleep(0.05)
        stats = await pool.stats()
        assert stats["pid"] == zygote_pid and ending["pid"] not in stats["pids"]
        assert staying["pid"] in stats["pids"] and os.path.exists(f"/proc/{staying['pid']}")
        conn = await pool.acquire(other)
        reply, _ = await pool.exchange(conn, {"t": "ping", "token": staying["token"]})
        assert reply["t"] == "pong", "the other session still answers"
        shutil.rmtree(busy)

    run(scenario, runtime)
    err = capfd.readouterr().err  # the fork server's log (it inherited our stderr)
    assert "cannot remove" in err and "Is a directory" in err
    assert "could not handle" not in err, "the exit was handled whole, not dropped half-way by the loop's last resort"


def test_a_runtime_dir_removed_under_a_running_server_is_made_again(runtime, caplog):
    """A /tmp cleaner, or logind emptying $XDG_RUNTIME_DIR when the user's last login ends,
    removes the runtime dir and every socket in it: the sessions it held are lost, but the
    next page starts a fork server in a new one, instead of failing until a restart."""

    async def scenario(pool):
        before = await pool.spawn(KEY, "tests.apps:Counter", [[], {}], {}, OPTS)
        old_zygote = (await pool.stats())["pid"]
        shutil.rmtree(runtime)
        after = await pool.spawn("fedcba9876543210fedc", "tests.apps:Counter", [[], {}], {}, OPTS)
        return before, old_zygote, after, await pool.stats()

    before, old_zygote, after, stats = run(scenario, runtime)
    assert stats["pid"] != old_zygote and after["pid"] in stats["pids"]
    assert os.stat(runtime).st_mode & 0o777 == 0o700
    assert f"the runtime dir {runtime} is gone; making it again" in caplog.text


_OUT_OF_DESCRIPTORS = r"""
import logging, os, resource, sys, threading
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
from asgi_htag.process.zygote import Zygote
z = Zygote({"runtime_dir": sys.argv[1], "grace_seconds": 60})
assert z.acquire()
z.listen()
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
fillers = []
try:
    while True:
        fillers.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass

def commands():
    for line in sys.stdin:
        if line.strip() == "free":
            for fd in fillers:
                os.close(fd)
            fillers.clear()
        elif line.strip() == "stop":
            break
    z.stop = True
    os.write(z.wake_w, b"x")

threading.Thread(target=commands, daemon=True).start()
print("FULL", flush=True)
z.run()
"""


def test_a_fork_server_out_of_descriptors_accepts_again_once_some_are_freed(runtime):
    """accept() fails with EMFILE while the fork server has no descriptor left: the worker's
    connection waits in the backlog, and is answered once descriptors are freed. Before,
    the listener was dropped from the loop for good: a fork server that ran on, answered
    no one, and was never replaced (its workers' connections stayed open)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _OUT_OF_DESCRIPTORS, str(runtime)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "FULL"
        waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        waiting.settimeout(20)
        waiting.connect(str(runtime / "zygote.s"))
        waiting.sendall(wire.encode({"op": "hello"}))
        seen = []
        for line in proc.stderr:  # bounded by the test's timeout; the line comes at once
            seen.append(line)
            if "cannot accept a connection" in line:
                break
        assert "Too many open files" in seen[-1], seen
        proc.stdin.write("free\n")
        proc.stdin.flush()
        answer = waiting.recv(4096)
        assert b'"ok"' in answer, answer
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.settimeout(20)
        other.connect(str(runtime / "zygote.s"))
        other.sendall(wire.encode({"op": "hello"}))
        assert b'"ok"' in other.recv(4096)
        waiting.close()
        other.close()
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
        rest = proc.stderr.read()
        assert "accepts connections again" in rest
        assert rest.count("cannot accept a connection") == 0, "said once, not every 0.1 s"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


def test_requests_queued_behind_a_stalled_fork_server_get_its_answer_together(runtime, monkeypatch):
    """While the fork server does not answer, the first request says hello again and
    again (each hello given 0.3 s here) for zygote_answer_seconds; those that waited
    meanwhile get its timeout at once instead of each trying as long in turn (the k-th
    waiting k times that), no interpreter is started beside the one that listens, and the
    next request after it answers again works."""
    monkeypatch.setattr(pool_module, "_HELLO_SECONDS", 0.3)

    async def main() -> Tuple[List[str], int, int, int]:
        first = ProcessPool(PoolConfig(runtime_dir=runtime, grace_seconds=1.0))
        second = ProcessPool(PoolConfig(runtime_dir=runtime, grace_seconds=1.0, zygote_answer_seconds=1.0))
        calls = {"hello": 0, "start": 0}
        hello, start = second._hello, second._start_zygote
        stalled_hellos: List[int] = []

        async def counted_hello(timeout):
            calls["hello"] += 1
            return await hello(timeout)

        async def counted_start():
            calls["start"] += 1
            return await start()

        second._hello, second._start_zygote = counted_hello, counted_start
        kinds: List[str] = []
        try:
            await first.ensure_zygote()
            zygote_pid = first._presence_pid
            os.kill(zygote_pid, signal.SIGSTOP)
            try:

                async def request() -> None:
                    try:
                        await second.ensure_zygote()
                    except ProcessStartError as exc:
                        kinds.append(exc.kind)

                async with anyio.create_task_group() as tg:
                    for _ in range(3):
                        tg.start_soon(request)
            finally:
                stalled_hellos.append(calls["hello"])
                os.kill(zygote_pid, signal.SIGCONT)
            info = await second.spawn(KEY, "tests.apps:Counter", [[], {}], {}, OPTS)
            return kinds, stalled_hellos[0], calls["start"], info["pid"]
        finally:
            await second.aclose()
            await first.aclose()

    kinds, hellos, starts, pid = anyio.run(main)
    assert kinds == ["timeout"] * 3
    # one request tried: a hello timed out, it said hello again (no interpreter started),
    # until its deadline; the other two did not each try in turn (3 x that many)
    assert 2 <= hellos <= 5, hellos
    assert starts == 0, "a fork server listens: no interpreter is started beside it"
    assert pid > 0


def _fill_backlog(path: str) -> Tuple[socket.socket, List[socket.socket]]:
    """A listener at ``path`` that accepts nothing, and the connections that fill its backlog."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    queued: List[socket.socket] = []
    while True:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(path)
        except BlockingIOError:
            c.close()
            return listener, queued
        queued.append(c)


class _CountingSocket(socket.socket):
    connects = 0

    def connect(self, address):  # type: ignore[override]
        if self.family == socket.AF_UNIX:
            type(self).connects += 1
        return super().connect(address)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_connect_to_a_full_backlog_waits_without_spinning_then_gets_in(runtime, monkeypatch, backend):
    """A session process (or fork server) whose backlog is full (stalled, or out of
    descriptors for a moment) answers a Unix connect with EAGAIN, and an unconnected socket
    polls writable: a connect that waited for writability spun, thousands of tries a
    second, without end. It now tries again after a pause, gives up at its deadline, and
    gets in once the backlog has room."""
    path = str(runtime / f"{KEY}.s")
    listener, queued = _fill_backlog(path)
    monkeypatch.setattr(socket, "socket", _CountingSocket)
    _CountingSocket.connects = 0
    monkeypatch.setattr(pool_module, "_on_asyncio", lambda: backend == "asyncio")

    async def main() -> Tuple[bool, int, bool]:
        pool = ProcessPool(PoolConfig(runtime_dir=runtime))
        gave_up = False
        with anyio.move_on_after(0.5) as scope:
            await pool_module._connect_unix(path)
        gave_up = scope.cancelled_caught
        tries = _CountingSocket.connects

        async def make_room() -> None:
            await anyio.sleep(0.2)
            listener.accept()[0].close()  # one queued connection taken: room for one

        async with anyio.create_task_group() as tg:
            tg.start_soon(make_room)
            conn = await pool.connect(KEY)  # what a websocket does, under its 10 s limit
        got_in = conn is not None
        await conn.aclose()
        return gave_up, tries, got_in

    try:
        gave_up, tries, got_in = anyio.run(main, backend=backend)
    finally:
        for c in queued:
            c.close()
        listener.close()
    assert gave_up
    assert 2 <= tries <= 12, f"{tries} connect attempts in 0.5 s"
    assert got_in


def test_a_hello_to_a_fork_server_with_a_full_backlog_times_out(runtime, monkeypatch):
    """The hello's connect counts against its timeout: a fork server that accepts nothing
    (stopped, its backlog full) makes a worker give up on it at its deadline, not wait
    (and spin) for ever while every other request waits behind it."""
    listener, queued = _fill_backlog(str(runtime / "zygote.s"))
    monkeypatch.setattr(socket, "socket", _CountingSocket)
    _CountingSocket.connects = 0

    async def main() -> None:
        pool = ProcessPool(PoolConfig(runtime_dir=runtime))
        with pytest.raises(TimeoutError):
            await pool._hello(0.5)

    try:
        anyio.run(main)
    finally:
        for c in queued:
            c.close()
        listener.close()
    assert 2 <= _CountingSocket.connects <= 12, _CountingSocket.connects


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_helper_the_app_forks_at_import_does_not_keep_sessions_alive_after_the_fork_server(runtime, monkeypatch):
    """An app's module that forks a helper when the fork server imports it (a
    multiprocessing pool started at import) gave the helper the life pipe's write end and
    the lifetime lock: session processes outlived a killed fork server (no EOF), and a new
    fork server waited for the lock. Every child of the fork server now closes them."""
    pidfile = runtime / "helper.pid"
    monkeypatch.setenv("ASGI_HTAG_TEST_HELPER_PIDFILE", str(pidfile))

    async def main() -> Tuple[int, int]:
        # a long grace: the fork server, left by its worker, would not end sessions before the kill
        pool = ProcessPool(PoolConfig(runtime_dir=runtime, grace_seconds=60.0))
        try:
            info = await pool.spawn(KEY, "tests.forking_app:App", [[], {}], {}, OPTS)
            return info["pid"], pool._presence_pid
        finally:
            await pool.aclose()

    session_pid, zygote_pid = anyio.run(main)
    helper_pid = int(pidfile.read_text())
    assert _alive(helper_pid) and _alive(session_pid)
    os.kill(zygote_pid, signal.SIGKILL)
    for _ in range(200):  # bounded by the test's timeout: the EOF comes at once
        if not _alive(session_pid):
            break
        time.sleep(0.05)
    assert not _alive(session_pid), "the session process outlived its fork server"
    assert _alive(helper_pid), "the helper lives on (the app's business), holding nothing of ours"
    try:
        with open(runtime / "zygote.life.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: a new fork server need not wait
    finally:
        os.kill(helper_pid, signal.SIGKILL)


def _lowest_free_fd(pid: int) -> int:
    used = {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
    return next(n for n in range(len(used) + 1) if n not in used)


@pytest.mark.parametrize("who, room", [("fork server", 0), ("fork server", 2), ("forker", 0)],
                         ids=["fork server: no pipe", "fork server: no pidfd", "forker: no pipe"])
def test_out_of_descriptors_a_new_session_gets_a_busy_answer_and_the_forker_lives_on(runtime, who, room):
    """With no descriptor left in the fork server (for the start-up pipe, or with room for
    that pipe only, for the new process's pidfd) or in its forker (to receive the pipe), a
    new session is refused as when the host is full (a 503 page), the forker is kept, its
    sessions live on, nothing is left under the refused session's name, and once
    descriptors are free again new sessions start. Before, the fork server took it for a
    broken forker and killed it, and the page got "the application failed"."""

    async def main() -> Tuple[int, int, int, bool]:
        pool = ProcessPool(PoolConfig(runtime_dir=runtime, grace_seconds=1.0))
        try:
            first = await pool.spawn(KEY, "tests.apps:Counter", [[], {}], {}, OPTS)
            stats = await pool.stats()
            forker = stats["forker"]
            target = stats["pid"] if who == "fork server" else forker
            soft, hard = resource.prlimit(target, resource.RLIMIT_NOFILE)
            resource.prlimit(target, resource.RLIMIT_NOFILE, (_lowest_free_fd(target) + room, hard))
            refused = False
            try:
                await pool.spawn("1" * 20, "tests.apps:Counter", [[], {}], {}, OPTS)
            except PoolFull:
                refused = True
            finally:
                resource.prlimit(target, resource.RLIMIT_NOFILE, (soft, hard))
            refused = refused and (await pool.stats())["pids"] == [first["pid"]]
            refused = refused and not list(runtime.glob("1" * 20 + ".*"))
            again = await pool.spawn("2" * 20, "tests.apps:Counter", [[], {}], {}, OPTS)
            after = await pool.stats()
            return forker, after["forker"], again["pid"], refused and _alive(first["pid"])
        finally:
            await pool.aclose()

    forker, forker_after, pid, refused_and_alive = anyio.run(main)
    assert refused_and_alive
    assert forker_after == forker, "the forker was kept"
    assert pid > 0
