"""A session store that fails (here: SQLite locked by another program for longer than its
busy timeout, as a backup tool or a stuck transaction does; a full or read-only disk fails
the same writes) under a real uvicorn: the people using the site get a clear answer, the
log one line, and nothing is left behind."""
import contextlib
import json
import sqlite3
import time

import httpx
import pytest

from tests.client import Page, recv_json, texts_of

pytestmark = pytest.mark.server


@contextlib.contextmanager
def writes_locked(srv):
    """Hold SQLite's write lock on the server's session database (WAL: readers go on)."""
    db = sqlite3.connect(str(srv.state_dir / "sessions.sqlite3"), timeout=10, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
    finally:
        db.execute("ROLLBACK")
        db.close()


def test_a_new_session_the_store_cannot_save_gets_a_503_and_leaves_no_process(make_server):
    srv = make_server()
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        assert Page(c, "/").status == 200  # the store exists and works
        before = set(c.get("/_stats").json()["pids"])
    with writes_locked(srv), httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.get("/")  # a new visitor: a process starts, then its session cannot be stored
        assert r.status_code == 503 and "cannot keep sessions right now" in r.text
        assert "set-cookie" not in r.headers and r.headers["retry-after"] == "5"
    srv.wait_for_log("the session store failed to save session")
    assert "Traceback" not in srv.log()
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        for _ in range(100):  # the process started for it is ended (bounded wait)
            if set(c.get("/_stats").json()["pids"]) <= before:
                break
            time.sleep(0.1)
        assert set(c.get("/_stats").json()["pids"]) <= before, "no process is left for the refused visitor"
        assert Page(c, "/").status == 200, "once the store works again, so does the site"


def test_a_click_whose_session_change_cannot_be_saved_still_gets_its_answer_and_a_notice(make_server):
    srv = make_server()
    c = httpx.Client(base_url=srv.url, timeout=60)
    try:
        page = Page(c, "/state")
        with page.ws() as ws:
            ws.send(json.dumps(page.call("state")))
            assert texts_of(recv_json(ws))["statev"] == "1"
            with writes_locked(srv):
                ws.send(json.dumps(page.call("state")))  # writes tag.state: the store is locked
                first, second = recv_json(ws, timeout=30), recv_json(ws, timeout=30)
            notice = first if "asgi_htag" in first else second
            answer = second if notice is first else first
            assert notice == {"asgi_htag": "error", "message": "The server could not save this change to your session; it may be lost."}
            assert texts_of(answer)["statev"] == "2", "the page stays in step with its instance"
            # the connection carries on; the instance takes the store's view again (the lost
            # change lost, as the page was told), and its next change is saved
            ws.send(json.dumps(page.call("state")))
            third = recv_json(ws)
            assert "asgi_htag" not in third and "err" not in third, third
        srv.wait_for_log("the session store failed to save the changes of session")
        assert "Traceback" not in srv.log()
        assert Page(c, "/state").texts["statev"] == "2", "1 saved, 2 lost, 2 again saved"
    finally:
        c.close()
