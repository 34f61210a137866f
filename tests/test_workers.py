"""Several workers (gunicorn and uvicorn --workers), uvloop, and faults: a session keeps
working whichever worker serves each of its requests."""
import contextlib
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.client import Page
from tests.client import recv_json, texts_of
from tests.conftest import Server

pytestmark = pytest.mark.server


def worker_pids(master_pid: int):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(") ", 1)[1].split()
            if int(fields[1]) == master_pid and fields[0] != "Z":
                out.append(int(entry))
    return sorted(out)


def fresh_connection_client(url: str) -> httpx.Client:
    """No keep-alive: every request is a new TCP connection, so the kernel spreads them
    over the workers."""
    return httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0))


def click_post(page: Page, name: str) -> str:
    r = page.post(page.call(name))
    return texts_of(r.json())["value"], r.headers["x-worker-pid"]


def posts_over_several_workers(page: Page, done: int = 0):
    """Clicks by POST, in concurrent bursts on fresh connections, until at least two
    workers have answered (the kernel hands idle workers the extra connections; bounded).
    Checks that one instance counted every click; returns (workers seen, clicks so far)."""
    workers = set()
    with ThreadPoolExecutor(6) as ex:
        for _ in range(30):
            results = list(ex.map(lambda _: click_post(page, "inc"), range(6)))
            assert sorted(int(v) for v, _ in results) == list(range(done + 1, done + 7))
            done += 6
            workers.update(w for _, w in results)
            if len(workers) >= 2:
                break
    assert len(workers) >= 2, f"requests should have reached several workers, got {workers}"
    return workers, done


def ws_clicks_over_several_workers(page: Page, done: int):
    """The same with websockets: each click on its own new websocket connection."""

    def one(_):
        with page.ws() as ws:
            ws.send(json.dumps(page.call("inc")))
            return int(texts_of(recv_json(ws))["value"]), ws.response.headers["x-worker-pid"]

    workers = set()
    with ThreadPoolExecutor(4) as ex:
        for _ in range(30):
            results = list(ex.map(one, range(4)))
            assert sorted(v for v, _ in results) == list(range(done + 1, done + 5))
            done += 4
            workers.update(w for _, w in results)
            if len(workers) >= 2:
                break
    assert len(workers) >= 2, f"websockets should have reached several workers, got {workers}"
    return workers, done


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def gunicorn4(request):
    """gunicorn -w 4 --preload, once per event loop for this module."""
    srv = Server("tests.servers.runner_app:app", kind="gunicorn", workers=4, loop=request.param,
                 extra=["--preload"], env={"TEST_ZYGOTE_GRACE": "3"}).start()
    yield srv
    srv.stop()
    left = srv.wait_no_processes()
    srv.cleanup()
    assert not left, f"processes left after gunicorn stopped: {left}"


def test_one_session_across_four_gunicorn_workers(gunicorn4):
    c = fresh_connection_client(gunicorn4.url)
    try:
        page = Page(c, "/http")
        pid = page.texts["pid"]
        posts_over_several_workers(page)
        renders = [Page(c, "/http") for _ in range(8)]
        assert {p.texts["pid"] for p in renders} == {pid}, "every render found the same instance"
        # websockets, each on a new connection, reach the same instance too
        page = Page(c, "/")
        ws_clicks_over_several_workers(page, 0)
    finally:
        c.close()


def test_tag_update_reaches_pages_on_every_worker(gunicorn4):
    c = fresh_connection_client(gunicorn4.url)
    try:
        page = Page(c, "/pusher")
        with contextlib.ExitStack() as stack:
            sockets = []
            while len(sockets) < 30 and (len(sockets) < 4 or len({ws.response.headers["x-worker-pid"] for ws in sockets}) < 2):
                sockets.append(stack.enter_context(page.ws()))
            assert len({ws.response.headers["x-worker-pid"] for ws in sockets}) >= 2
            sockets[0].send(json.dumps(page.call("start")))
            for ws in sockets:
                seen = set()
                while "3" not in seen:
                    seen.add(texts_of(recv_json(ws)).get("ticks"))
    finally:
        c.close()


def test_racing_workers_create_one_process(gunicorn4):
    c = fresh_connection_client(gunicorn4.url)
    try:
        c.get("/set?v=race")  # the session exists; now 16 first renders race on 4 workers
        before = c.get("/_stats").json()["count"]
        with ThreadPoolExecutor(16) as ex:
            pages = list(ex.map(lambda _: Page(c, "/"), range(16)))
        assert {p.status for p in pages} == {200}
        assert len({p.texts["pid"] for p in pages}) == 1
        assert len({p.response.headers["x-worker-pid"] for p in pages}) >= 2
        stats = c.get("/_stats").json()
        assert stats["count"] == before + 1
    finally:
        c.close()


def test_sigkill_of_a_worker_spares_other_users_and_its_users_reconnect(gunicorn4):
    master = gunicorn4.proc.pid
    clients = [fresh_connection_client(gunicorn4.url) for _ in range(3)]
    try:
        pages = [Page(c, "/") for c in clients]
        pids = [p.texts["pid"] for p in pages]
        stack = contextlib.ExitStack()
        sockets = [stack.enter_context(p.ws()) for p in pages]
        for p, ws in zip(pages, sockets):
            ws.send(json.dumps(p.call("inc")))
            assert texts_of(recv_json(ws))["value"] == "1"
        victim = int(sockets[0].response.headers["x-worker-pid"])
        assert victim in worker_pids(master)
        os.kill(victim, signal.SIGKILL)
        # the victim's websockets drop; the others carry on
        for p, ws in zip(pages, sockets):
            if int(ws.response.headers["x-worker-pid"]) == victim:
                with pytest.raises(Exception):
                    ws.recv(timeout=10)
            else:
                ws.send(json.dumps(p.call("inc")))
                assert texts_of(recv_json(ws))["value"] == "2"
        # the killed worker's user reconnects (resync) to the same living instance
        with pages[0].ws(resync=True) as ws:
            assert int(ws.response.headers["x-worker-pid"]) != victim
            assert texts_of(recv_json(ws))["value"] == "1"
            ws.send(json.dumps(pages[0].call("inc")))
            assert texts_of(recv_json(ws))["value"] == "2"
        assert [Page(c, "/").texts["pid"] for c in clients] == pids, "no instance was lost"
        stack.close()
    finally:
        for c in clients:
            c.close()


def test_max_requests_restarts_and_hup_keep_instances(make_server):
    srv = make_server(kind="gunicorn", workers=2, extra=["--max-requests", "6", "--max-requests-jitter", "0"],
                      env={"TEST_ZYGOTE_GRACE": "3"})
    c = fresh_connection_client(srv.url)
    try:
        page = Page(c, "/http")
        pid = page.texts["pid"]
        seen_workers = set()
        i = 0
        for _ in range(300):  # until max_requests has recycled workers
            if len(seen_workers) >= 4:
                break
            try:
                value, worker = click_post(page, "inc")
            except httpx.TransportError:
                # a connection the exiting worker accepted but never answered (uvicorn's
                # shutdown); whether that click counted or not, the instance lives on
                continue
            assert int(value) in (i + 1, i + 2), "every request reached the same living instance"
            i = int(value)
            seen_workers.add(worker)
        assert len(seen_workers) >= 4, "max_requests should have recycled workers"
        before = set(worker_pids(srv.proc.pid))
        os.kill(srv.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and set(worker_pids(srv.proc.pid)) & before:
            time.sleep(0.1)
        assert not set(worker_pids(srv.proc.pid)) & before, "HUP should replace every worker"
        value, _ = click_post(page, "inc")
        assert value == str(i + 1)
        assert Page(c, "/http").texts["pid"] == pid
    finally:
        c.close()


def test_uvicorn_workers_share_sessions(make_server, loop):
    srv = make_server(workers=3, loop=loop, env={"TEST_ZYGOTE_GRACE": "3"})
    c = fresh_connection_client(srv.url)
    try:
        page = Page(c, "/http")
        _, done = posts_over_several_workers(page)
        assert Page(c, "/http").texts["value"] == str(done), "one instance counted every click"
    finally:
        c.close()


def test_killed_session_process_under_gunicorn(gunicorn4):
    c = fresh_connection_client(gunicorn4.url)
    try:
        c.get("/set?v=keep")
        page = Page(c, "/")
        pid = int(page.texts["pid"])
        with page.ws() as ws:
            ws.send(json.dumps(page.call("inc")))
            assert texts_of(recv_json(ws))["value"] == "1"  # subscribed and working
            os.kill(pid, signal.SIGKILL)
            assert recv_json(ws)["asgi_htag"] == "dead"
        for _ in range(4):  # whatever worker renders next, a new process is made, no cleanup needed
            fresh = Page(c, "/")
            assert fresh.status == 200 and fresh.texts["pid"] != str(pid)
        assert len({Page(c, "/").texts["pid"] for _ in range(4)}) == 1
        assert Page(c, "/state").texts["from-route"] == "'keep'"
    finally:
        c.close()
