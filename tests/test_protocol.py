"""The runner end to end at the protocol level: a real uvicorn (asyncio and uvloop), real
HTTP and websocket clients, one OS process per session."""
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.client import Page, parse, recv_json, texts_of
from tests.conftest import pids_in_runtime

pytestmark = pytest.mark.server


def click(ws, page: Page, name: str) -> dict:
    ws.send(json.dumps(page.call(name)))
    return recv_json(ws)


def test_the_web_side_runs_on_the_backend_the_server_was_started_with(server, new_client):
    # uvicorn (asyncio or uvloop) runs asyncio; hypercorn's trio worker runs trio, and the
    # rest of this module then exercises the runner's anyio code paths on trio
    assert new_client().get("/_backend").text == ("trio" if server.kind == "hypercorn" else "asyncio")


def test_websocket_counter_and_reload_reuses_instance(server, new_client):
    c = new_client()
    page = Page(c, "/")
    assert page.status == 200
    assert page.cfg["mode"] == "ws" and page.cfg["ws"].startswith("/_htag/")
    pid = page.texts["pid"]
    with page.ws() as ws:
        seen = [texts_of(click(ws, page, "inc"))["value"] for _ in range(3)]
    assert seen == ["1", "2", "3"]
    again = Page(c, "/")
    assert again.texts["pid"] == pid, "a reload must reuse the session's instance"
    assert again.texts["value"] == "3"


def test_the_tags_an_app_makes_share_one_class_per_name_in_its_process(server, new_client):
    """htag makes a new class for every ``Tag.li`` an app writes; a session process makes
    one per name, once (host.share_tag_classes), and the rows render as before."""
    page = Page(new_client(), "/lister")
    with page.ws() as ws:
        shown = [texts_of(click(ws, page, "more")) for _ in range(3)]
    assert shown[0]["kinds"] == "1" and shown[-1]["items"] == "123"
    again = Page(page.client, "/lister")  # the same instance, rendered whole
    assert again.texts["kinds"] == "1", "three rows, three classes: not shared"
    assert re.findall(r"<li id=\"\d+\">(\d)</li>", again.html) == ["1", "2", "3"]


def test_two_sessions_get_independent_processes(server, new_client):
    a, b = Page(new_client(), "/"), Page(new_client(), "/")
    assert a.texts["pid"] != b.texts["pid"]
    with a.ws() as wa, b.ws() as wb:
        click(wa, a, "inc")
        click(wa, a, "inc")
        assert texts_of(click(wb, b, "inc"))["value"] == "1"
        assert texts_of(click(wa, a, "inc"))["value"] == "3"


def test_query_params_build_and_rebuild_the_instance(server, new_client):
    c = new_client()
    page = Page(c, "/query?john&age=12")
    assert page.texts["args"] == "('john',)"
    assert page.texts["kargs"] == "[('age', '12')]"
    with page.ws() as ws:
        assert texts_of(click(ws, page, "inc"))["value"] == "1"
    same = Page(c, "/query?john&age=12")
    assert same.texts["value"] == "1", "same query params: same instance"
    other = Page(c, "/query?bob")
    assert other.texts["args"] == "('bob',)"
    assert other.texts["value"] == "0", "new query params: a new instance"
    # the old page's token no longer matches the session's instance: it is told to reload
    with page.ws() as ws:
        assert recv_json(ws)["asgi_htag"] == "gone"


def test_http_only_interactions(server, new_client):
    c = new_client()
    page = Page(c, "/http")
    assert page.cfg["mode"] == "http"
    values = [texts_of(page.post(page.call("inc")).json())["value"] for _ in range(2)]
    assert values == ["1", "2"]
    assert Page(c, "/http").texts["value"] == "2"


def test_tag_update_pushes_over_websocket(server, new_client):
    page = Page(new_client(), "/pusher")
    with page.ws() as ws:
        ws.send(json.dumps(page.call("start")))
        ticks, results = [], []
        while len(ticks) < 3 or len(results) < 3:
            texts = texts_of(recv_json(ws))
            if "ticks" in texts and texts["ticks"] != "0":
                ticks.append(texts["ticks"])
            if texts.get("update-result"):
                results.append(texts["update-result"])
    assert ticks == ["1", "2", "3"]
    assert set(results) == {"True"}, "tag.update() returns True when the page is connected"


def test_session_shared_between_routes_and_app(server, new_client):
    c = new_client()
    assert c.get("/set?v=hello").text == "ok"
    page = Page(c, "/state")
    assert page.texts["from-route"] == "'hello'"
    c.get("/set?v=again")
    with page.ws() as ws:
        assert texts_of(click(ws, page, "read"))["from-route"] == "'again'", "the app sees a route's write on its next interaction"
        click(ws, page, "write")
        assert texts_of(click(ws, page, "state"))["statev"] == "1"
    got = c.get("/get").json()
    assert got["from_app"] == "written-by-app", "a route sees the app's write on its next request"
    assert Page(c, "/state").texts["statev"] == "1", "tag.state lives in the session"


def test_clicking_over_a_websocket_keeps_the_session_alive_and_an_expired_one_reaches_the_app_empty(make_server):
    import time

    import httpx

    srv = make_server(env={"TEST_STORE_MAX_AGE": "2"})  # sessions expire 2 s after their last use
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        page = Page(c, "/state")
        assert c.get("/set?v=alice").text == "ok"
        with page.ws() as ws:
            assert texts_of(click(ws, page, "read"))["from-route"] == "'alice'"
            start = time.monotonic()
            while time.monotonic() - start < 4:  # twice the lifetime, with no HTTP request
                answer = click(ws, page, "read")  # the value shown does not change: nothing to redraw
                assert "asgi_htag" not in answer and "from-route" not in texts_of(answer), answer
                time.sleep(0.3)
            assert "from_route" in c.get("/get").json()["keys"], "the clicks kept the session alive"
            time.sleep(2.6)  # idle past the lifetime: the session expires
            assert texts_of(click(ws, page, "read"))["from-route"] == "None", "the app sees the session gone"
        assert c.get("/get").json()["keys"] == [], "an expired session is not revived by clicks"


def test_a_logout_that_pops_the_last_key_gives_the_next_page_a_new_instance(server, new_client):
    c = new_client()
    assert c.get("/set?v=alice").text == "ok"
    assert Page(c, "/state").texts["from-route"] == "'alice'"
    assert c.get("/logout-pop").text == "out"
    assert Page(c, "/state").texts["from-route"] == "None", "a new session, so a new instance"


def test_an_app_that_removes_the_only_session_key_keeps_its_session_and_its_page(server, new_client):
    c = new_client()
    assert c.get("/set?v=hello").text == "ok"  # the session's only key
    cookie = c.cookies.get("asgi_htag_session")
    page = Page(c, "/flash")  # shows it once and removes it
    assert page.texts["flash"] == "'hello'"
    assert page.cookie_header(), "the page's response did not expire the session cookie"
    with page.ws() as ws:
        assert texts_of(click(ws, page, "inc"))["value"] == "1", "the page reaches its process"
    assert c.get("/get").json()["keys"] == [], "the app's removal reached the store"
    assert c.cookies.get("asgi_htag_session") == cookie, "the same session all along"


def test_a_page_left_open_after_a_logout_cannot_bring_the_session_back(server, new_client):
    import httpx

    c = new_client()
    assert c.get("/set?v=alice").text == "ok"
    old_cookie = c.cookies.get("asgi_htag_session")
    page = Page(c, "/state")
    with page.ws() as ws, httpx.Client(base_url=str(c.base_url), cookies={"asgi_htag_session": old_cookie}) as thief:
        assert c.get("/revoke").text == "revoked"  # deleted behind the middleware's back: the process stays
        ws.send(json.dumps(page.call("write")))  # the app writes to its (old) session
        assert recv_json(ws)["asgi_htag"] == "gone", "the page is told, and reloads into the current session"
        # (a request with the dead cookie, as here, also tells its processes to go)
        assert thief.get("/get").json()["keys"] == [], "the old session id stays dead"
    # over http_only a POST with the logged-out cookie never reaches the process (the session
    # is not found): the page is told it is gone and the session stays dead (this part does not
    # drive apply_existing, which a POST reaches only if the logout lands while it runs)
    c = new_client()
    assert c.get("/set?v=bob").text == "ok"
    old_cookie = c.cookies.get("asgi_htag_session")
    page = Page(c, "/state-http")
    assert c.get("/logout").text == "out"
    c.cookies.set("asgi_htag_session", old_cookie)  # a tab that still sends it
    assert page.post(page.call("write")).json()["asgi_htag"] == "gone"
    assert c.get("/get").json()["keys"] == [], "the old session id stays dead"


def test_a_dropped_session_takes_its_processes_with_it(make_server):
    import httpx

    srv = make_server(env={"TEST_MAX_PROCESSES": "2"})
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.get("/set?v=a").text == "ok"
        page = Page(c, "/state")
        with page.ws() as ws:
            assert c.get("/logout").text == "out"  # clear(): the session is dropped
            assert recv_json(ws)["asgi_htag"] == "gone", "its open page is told, and reloads"
        assert c.get("/set?v=b").text == "ok"  # a new session
        assert Page(c, "/state").status == 200
        assert c.get("/login").text == "in"  # regenerate_id(): the old id is dropped
        # had they stayed, the two dropped sessions' processes would fill max_processes=2
        for _ in range(50):
            if len(c.get("/_stats").json()["pids"]) <= 1:
                break
            time.sleep(0.1)
        with httpx.Client(base_url=srv.url, timeout=30) as newcomer:
            assert Page(newcomer, "/").status == 200, "a new visitor still gets a process"


@pytest.mark.parametrize("kind", ["uvicorn", "hypercorn"])  # hypercorn: its trio worker
def test_an_expired_sessions_processes_end_when_it_comes_back_or_at_the_next_sweep(make_server, kind):
    import httpx

    # sweeps every 1 s; the two sessions fill the server
    srv = make_server(kind=kind, env={"TEST_STORE_MAX_AGE": "2", "TEST_MAX_PROCESSES": "2"})

    def pids(client):
        return client.get("/_stats").json()["pids"]

    def wait_for(client, n):
        for _ in range(100):
            if len(pids(client)) == n:
                return True
            time.sleep(0.1)
        return False

    with httpx.Client(base_url=srv.url, timeout=30) as back, httpx.Client(base_url=srv.url, timeout=30) as gone:
        for c in (back, gone):
            page = Page(c, "/")
            with page.ws() as ws:
                assert texts_of(click(ws, page, "inc"))["value"] == "1"
        old = pids(back)
        assert len(old) == 2
        time.sleep(2.6)  # both sessions expire (no request, no click)
        # one browser comes back: its old cookie is signed but its session is no more. Its
        # process is told to go before the new session's starts, which takes its place
        # on this full server (it was a 503 when told after the response)
        fresh = Page(back, "/")
        assert fresh.status == 200 and fresh.texts["value"] == "0", "a new session, a new instance"
        # the other one's process ends at the sweep (after a request, every twentieth of
        # the store's lifetime, 1 s at least): both would otherwise stay, for ever by default
        assert wait_for(back, 1), pids(back)
        assert not set(pids(back)) & set(old)
        with httpx.Client(base_url=srv.url, timeout=30) as newcomer:  # max_processes=2: room again
            page = Page(newcomer, "/")
            with page.ws() as ws:
                assert texts_of(click(ws, page, "inc"))["value"] == "1"
        with fresh.ws() as ws:
            assert texts_of(click(ws, fresh, "inc"))["value"] == "1", "the new session's page works"


def test_the_session_cookie_takes_the_attributes_it_is_given(make_server):
    import httpx

    srv = make_server(env={"TEST_SESSION_COOKIE": json.dumps({"https_only": True, "cookie_name": "myapp", "same_site": "strict"})})
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        page = Page(c, "/")
        (cookie,) = page.response.headers.get_list("set-cookie")
        assert cookie.startswith("myapp=") and "; Secure" in cookie and "SameSite=Strict" in cookie, cookie
        with page.ws(cookie=cookie.split(";")[0]) as ws:  # (httpx keeps a Secure cookie from http URLs)
            assert texts_of(click(ws, page, "inc"))["value"] == "1"


def test_a_session_in_use_outlives_its_cookies_max_age(make_server):
    """The cookie's Max-Age counts from when it was set: it is set again while the session
    is in use (here, a 3 s cookie, refreshed every second at most), so an active user is
    not dropped into a new session (and a new process) max_age_seconds after login."""
    import httpx

    srv = make_server(env={"TEST_SESSION_COOKIE": json.dumps({"max_age_seconds": 3})})
    with httpx.Client(base_url=srv.url, timeout=30) as c:  # httpx drops a cookie past its Max-Age
        assert c.get("/set?v=kept").text == "ok"
        page = Page(c, "/")
        for _ in range(5):  # 6 s in all, never 3 s without a request
            time.sleep(1.2)
            assert c.get("/get").json()["keys"] == ["from_route"], "the same session"
        again = Page(c, "/")
        assert again.texts["pid"] == page.texts["pid"], "and the same process"
        with again.ws() as ws:
            assert texts_of(click(ws, again, "inc"))["value"] == "1"
        time.sleep(3.5)  # unused for longer than its Max-Age: the browser lets it go
        assert c.get("/get").json()["keys"] == []


def test_a_page_served_from_a_mount_inside_the_runner_reaches_its_process(server, new_client):
    c = new_client()
    page = Page(c, "/admin/")
    assert page.cfg["ws"].startswith("/_htag/") and page.cfg["post"].startswith("/_htag/"), page.cfg
    with page.ws() as ws:
        assert texts_of(click(ws, page, "inc"))["value"] == "1"
    http = Page(c, "/admin/http")
    assert texts_of(http.post(http.call("inc")).json())["value"] == "1"


def test_an_answer_or_a_push_too_large_to_relay_is_refused_and_the_process_lives_on(server, new_client):
    page = Page(new_client(), "/huge")
    with page.ws() as ws:
        msg = click(ws, page, "big")
        assert msg["asgi_htag"] == "error" and "too large" in msg["message"], msg
        assert texts_of(click(ws, page, "bigpush"))["pushed"] == "False", "update() says it was not delivered"
        assert texts_of(click(ws, page, "small"))["out"] == "small", "the same process goes on"


def test_an_htag_asgi_mounted_inside_a_runner_keeps_its_own_routes(make_server):
    import httpx

    srv = make_server("tests.servers.ui_in_runner:app")
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        page = Page(c, "/ui/")
        assert page.cfg["ws"].startswith("/ui/_htag/"), page.cfg
        with page.ws() as ws:
            assert texts_of(click(ws, page, "inc"))["value"] == "1"
        runner_page = Page(c, "/")
        assert runner_page.cfg["ws"].startswith("/_htag/")


def test_processes_told_to_go_hold_their_places_until_they_are_gone_and_newcomers_wait_for_them(make_server):
    import contextlib

    import httpx

    srv = make_server(env={"TEST_MAX_PROCESSES": "2"})
    statuses = []
    session_processes = []
    with contextlib.ExitStack() as stack:
        for _ in range(4):
            c = stack.enter_context(httpx.Client(base_url=srv.url, timeout=30))
            page = Page(c, "/holder?3")  # each click holds its process 3 s
            statuses.append(page.status)
            # the worker, the zygote, the forker and the session processes
            session_processes.append(len(pids_in_runtime(srv.runtime_dir)) - 3)
            if page.status != 200:
                continue
            ws = stack.enter_context(page.ws())
            ws.send(json.dumps(page.call("hold")))  # busy: it cannot act on SIGTERM until the click ends
            time.sleep(0.2)
            assert c.get("/logout").text == "out"  # its session is dropped: it is told to go
    # the third and fourth pages came while both places were held by processes told to go,
    # busy for seconds more: each waited for one to end (a 503 at once, before), and
    # there were never more session processes than max_processes
    assert statuses == [200, 200, 200, 200], statuses
    assert max(session_processes) <= 2, session_processes


def test_hostile_frames_get_errors_and_nothing_breaks(server, new_client):
    page = Page(new_client(), "/")
    other = Page(new_client(), "/")
    body_id = page.call("inc")["id"]
    with page.ws() as ws:
        ws.send("not json")
        assert recv_json(ws)["asgi_htag"] == "error"
        ws.send("[1, 2]")
        assert recv_json(ws)["asgi_htag"] == "error"
        ws.send(json.dumps({"method": "inc"}))
        assert recv_json(ws)["asgi_htag"] == "error"
        ws.send("x" * (2 * 1024 * 1024))
        assert "too large" in recv_json(ws)["message"]
        for method in ("__init__", "_private", "exit", "never_offered", "__class__"):
            reply = click_raw(ws, {"id": body_id, "method": method, "args": [], "kargs": {}, "event": {}})
            assert "refused" in reply["err"], method
        reply = click_raw(ws, {"id": 12345, "method": "inc", "args": [], "kargs": {}, "event": {}})
        assert "refused" in reply["err"]
        reply = click_raw(ws, {"id": body_id, "method": "inc", "args": "notalist", "kargs": {}, "event": {}})
        assert "refused" in reply["err"]
        assert texts_of(click(ws, page, "inc"))["value"] == "1", "the same connection keeps working"
    with other.ws() as ws:
        assert texts_of(click(ws, other, "inc"))["value"] == "1", "other users are unaffected"


def test_an_element_taken_off_the_page_can_no_longer_be_called(server, new_client):
    # the page showed "delete" on the user's own rows; they were replaced by rows without
    # it, and the app keeps the old ones (alive, detached): an old offer must not run
    c = new_client()
    page = Page(c, "/rows")
    old_delete = page.call("del-0")
    with page.ws() as ws:
        shown = click(ws, page, "others")
        assert not any("del-0" in parse(f).calls for f in shown["update"].values())
        reply = click_raw(ws, old_delete)
        assert "refused" in reply["err"] and "no longer on the page" in reply["err"], reply
        click(ws, page, "mine")  # the user's rows again: new ones, with new offers
    again = Page(c, "/rows")  # the same instance, rendered anew
    assert again.texts["deleted"] == "", "the refused delete did not run"
    assert again.call("del-0")["id"] != old_delete["id"]
    with again.ws() as ws:
        click(ws, again, "del-0")
    assert Page(c, "/rows").texts["deleted"] == "me:0", "the rows on the page can be deleted"


def click_raw(ws, payload: dict) -> dict:
    ws.send(json.dumps(payload))
    return recv_json(ws)


def test_hostile_http_posts(server, new_client):
    page = Page(new_client(), "/http")
    assert page.post(None, raw=b"\xff\xfe not json").status_code == 400
    assert page.post(None, raw=b"x" * (2 * 1024 * 1024)).status_code == 413
    assert page.post([1]).status_code == 400
    r = page.post({"id": page.call("inc")["id"], "method": "never_offered", "args": [], "kargs": {}, "event": {}})
    assert r.status_code == 200 and "refused" in r.json()["err"]
    assert texts_of(page.post(page.call("inc")).json())["value"] == "1"


def test_nested_or_huge_input_gets_a_short_clear_error_and_a_short_log_line(server, new_client):
    """A client's megabyte-long method or kargs name is not echoed whole (to the page or to
    the log); JSON nested deeper than the recursion limit is an invalid-JSON error (400
    over POST), not an internal error with a traceback per request."""
    with server._started:
        first_line = len(server.lines)
    deep = b'{"id": 1, "args": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    long_name = "A" * 1_000_000
    page = Page(new_client(), "/")
    body_id = page.call("inc")["id"]
    with page.ws() as ws:
        ws.send(deep.decode())
        reply = recv_json(ws)
        assert reply["asgi_htag"] == "error" and reply["message"] == "interaction is not valid JSON: JSON nested too deeply"
        reply = click_raw(ws, {"id": body_id, "method": long_name, "args": [], "kargs": {}, "event": {}})
        assert "refused" in reply["err"] and len(reply["err"]) < 300, reply["err"][:300]
        reply = click_raw(ws, {"id": body_id, "method": "inc", "args": [], "kargs": {long_name: 1}, "event": {}})
        assert reply["err"] == "interaction refused: a 'kargs' name is empty, too long or not printable"
        ws.send('{"id": 1, "method": "inc", "args": [], "kargs": {"\\udc80": 1}}')  # a lone surrogate
        assert recv_json(ws)["err"] == "interaction refused: a 'kargs' name is empty, too long or not printable"
        ws.send('{"id": ' + "9" * 5000 + ', "method": "inc"}')  # past Python's int-digit limit
        assert recv_json(ws)["message"].startswith("interaction is not valid JSON: Exceeds the limit")
        assert texts_of(click(ws, page, "inc"))["value"] == "1", "the same connection keeps working"
    http = Page(new_client(), "/http")
    r = http.post(None, raw=deep)
    assert r.status_code == 400 and r.json()["message"] == "interaction is not valid JSON: JSON nested too deeply"
    r = http.post({"id": http.call("inc")["id"], "method": long_name, "args": [], "kargs": {}, "event": {}})
    assert r.status_code == 200 and "refused" in r.json()["err"] and len(r.content) < 400
    assert texts_of(http.post(http.call("inc")).json())["value"] == "1"
    time.sleep(0.5)  # the session processes' log lines come through their own pipe
    with server._started:
        lines = server.lines[first_line:]
    assert any("the page offers no method 'AAAA" in line for line in lines), lines[-20:]
    assert max(len(line) for line in lines) < 1000, "no client input copied whole into the log"
    assert not any("Traceback" in line or "RecursionError" in line for line in lines), lines[-40:]


def test_foreign_origin_is_refused(server, new_client):
    from websockets.exceptions import InvalidStatus

    page = Page(new_client(), "/")
    with pytest.raises(InvalidStatus) as err:
        page.ws(origin="http://evil.example").__enter__()
    assert err.value.response.status_code == 403
    with page.ws(origin=server.url) as ws:  # our own origin is fine
        assert texts_of(click(ws, page, "inc"))["value"] == "1"
    http = Page(page.client, "/http")
    assert http.post(http.call("inc"), origin="http://evil.example").status_code == 403
    # the worker's warnings reach the server's log without any logging set up by the app
    server.wait_for_log("WARNING asgi_htag.app: refused a websocket from a foreign origin")
    server.wait_for_log("WARNING asgi_htag.app: refused an interaction POST from a foreign origin")


def test_tampered_cookie_gives_a_fresh_session(server, new_client):
    c = new_client()
    page = Page(c, "/")
    with page.ws() as ws:
        click(ws, page, "inc")
    (cookie,) = list(c.cookies.jar)
    sid, _, sig = cookie.value.partition(".")
    forged = new_client()
    forged.cookies.set(cookie.name, sid + "." + ("A" * len(sig)), domain=cookie.domain, path=cookie.path)
    fresh = Page(forged, "/")
    assert fresh.texts["pid"] != page.texts["pid"]
    assert fresh.texts["value"] == "0"
    # and the real page's websocket refuses a forged cookie too
    with page.ws(cookie=f"{cookie.name}={sid}.{'A' * len(sig)}") as ws:
        assert recv_json(ws)["asgi_htag"] == "gone"


def test_app_errors_reach_the_page_as_a_generic_message_and_the_log_with_their_details(server, new_client):
    """Without debug, an exception's text (which may hold paths, data or queries) stays in
    the server's log, with its traceback; the page is told that the app failed."""
    page = Page(new_client(), "/crashy")
    with page.ws() as ws:
        reply = click(ws, page, "boom")
        assert reply["err"] == "the application failed; the server's log has the details"
        assert texts_of(click(ws, page, "ok"))["n"] == "1", "the instance carries on"
    http = Page(new_client(), "/crashy-http")
    assert http.post(http.call("boom")).json()["err"] == reply["err"]
    server.wait_for_log("ValueError: boom in the app")


def test_killed_process_is_noticed_and_replaced(server, new_client):
    c = new_client()
    c.get("/set?v=keepme")
    page = Page(c, "/")
    pid = int(page.texts["pid"])
    with page.ws() as ws:
        click(ws, page, "inc")
        os.kill(pid, signal.SIGKILL)
        msg = recv_json(ws)
        assert msg["asgi_htag"] == "dead" and "Reload" in msg["message"]
    with page.ws() as ws:
        assert recv_json(ws)["asgi_htag"] == "gone"
    again = Page(c, "/")
    assert again.texts["pid"] != str(pid) and again.texts["value"] == "0"
    assert Page(c, "/state").texts["from-route"] == "'keepme'", "the session survived its process"


def test_killed_process_behind_pooled_connections_is_replaced_once(server, new_client):
    """Concurrent POSTs leave several idle connections to the process in the worker's pool;
    once the process is killed they all lead nowhere. The next render makes one new process
    (not one per stale connection, and no error), later renders keep it, its POSTs work."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    c = new_client()
    page = Page(c, "/napper-http")
    pid = page.texts["pid"]

    def nap(_):
        with httpx.Client(base_url=c.base_url, cookies=c.cookies, timeout=30) as other:
            return other.post(f"{page.cfg['post']}?t={page.cfg['token']}", json=page.call("nap")).status_code

    with ThreadPoolExecutor(3) as ex:
        assert list(ex.map(nap, range(3))) == [200, 200, 200]
    assert Page(c, "/napper-http").texts["naps"] == "3"
    os.kill(int(pid), signal.SIGKILL)
    fresh = Page(c, "/napper-http")
    assert fresh.status == 200 and fresh.texts["pid"] != pid and fresh.texts["naps"] == "0"
    assert {Page(c, "/napper-http").texts["pid"] for _ in range(4)} == {fresh.texts["pid"]}
    reply = fresh.post(fresh.call("nap"))
    assert reply.status_code == 200 and texts_of(reply.json())["naps"] == "1"


def test_interaction_timeout_kills_the_process(server, new_client):
    c = new_client()
    c.get("/set?v=still-here")
    page = Page(c, "/slow")
    pid = page.texts.get("pid")
    with page.ws() as ws:
        assert texts_of(click(ws, page, "inc"))["value"] == "1"
        ws.send(json.dumps(page.call("slow")))
        msg = recv_json(ws, timeout=30)
    assert msg["asgi_htag"] == "dead"
    assert "too long" in msg["message"] and "1 s" in msg["message"]
    fresh = Page(c, "/slow")
    assert fresh.texts["value"] == "0", "a reload gives a fresh instance"
    assert Page(c, "/state").texts["from-route"] == "'still-here'"
    assert pid is None or fresh.texts.get("pid") != pid


def test_an_app_too_slow_to_create_gets_a_clear_504_and_leaves_no_process(server, new_client):
    c = new_client()
    before = set(c.get("/_stats").json()["pids"])
    r = c.get("/slow-init")
    assert r.status_code == 504 and "took too long to start" in r.text
    assert set(c.get("/_stats").json()["pids"]) <= before, "the stuck process was killed"
    assert Page(c, "/").status == 200, "the same session carries on with other apps"


def test_tags_an_app_drops_are_freed_in_a_long_running_process(server, new_client):
    # each click replaces 20 rows: without full collections in the session process, every
    # row would stay (400 clicks: 8,000 of them), and its memory with it
    page = Page(new_client(), "/replacer")
    with page.ws() as ws:
        counts = [int(texts_of(click(ws, page, "replace"))["alive"]) for _ in range(400)]
    assert max(counts[-50:]) < 1000, counts[-50:]
    assert min(counts[-50:]) >= 20  # the rows on the page


def test_an_app_whose_constructor_raises_gets_a_500_that_shows_no_markup_from_the_url(server, new_client):
    # htag would answer with its own page, "init error : <the exception's text>", unescaped:
    # int() puts the query string's value in its message, so a link could inject markup
    c = new_client()
    before = set(c.get("/_stats").json()["pids"])
    hostile = "<img src=x onerror=alert(1)>"
    r = c.get("/bad-init", params={"age": hostile})
    assert r.status_code == 500 and "The application could not start." in r.text
    assert "<img" not in r.text and "onerror" not in r.text and "init error" not in r.text
    debug = c.get("/bad-init-debug", params={"age": hostile})
    assert debug.status_code == 500
    assert "<img" not in debug.text and "invalid literal for int()" in debug.text
    assert "&lt;img src=x onerror=alert(1)&gt;" in debug.text, "debug shows the app's error, escaped"
    assert "Traceback" not in debug.text, "the app's error, not asgi_htag's own frames"
    # the crashed processes report, then exit: bounded wait for the fork server to see them go
    for _ in range(100):
        left = set(c.get("/_stats").json()["pids"]) - before
        if not left:
            break
        time.sleep(0.1)
    assert not left, "no process is left for either"
    ok = Page(c, "/bad-init?age=41")
    assert ok.status == 200 and ok.texts["age"] == "41"


def test_a_page_render_stuck_past_the_interaction_timeout_ends_its_process_and_a_fresh_one_answers(server, new_client):
    c = new_client()
    first = Page(c, "/slow-render")  # timeout_interaction=1; its render() blocks from the second one on
    assert first.texts["n"] == "1"
    again = Page(c, "/slow-render")  # a reload: the stuck render's process is ended, a new one renders
    assert again.status == 200 and again.texts["n"] == "1" and again.texts["pid"] != first.texts["pid"]
    assert not os.path.exists(f"/proc/{first.texts['pid']}"), "the stuck process is gone"


def test_a_process_whose_page_never_makes_contact_exits(server, new_client):
    c = new_client()
    crawled = Page(new_client(), "/abandon")  # timeout_abandoned=1: a client that runs no JavaScript
    page = Page(c, "/abandon")
    http = Page(c, "/abandon-http")
    with page.ws() as ws:  # a browser's page connects at once
        assert texts_of(click(ws, page, "inc"))["value"] == "1"
        assert texts_of(http.post(http.call("inc")).json())["value"] == "1"  # http_only: its first click
        for _ in range(100):
            if crawled.texts["pid"] not in map(str, c.get("/_stats").json()["pids"]):
                break
            time.sleep(0.05)
        pids = set(map(str, c.get("/_stats").json()["pids"]))
        assert crawled.texts["pid"] not in pids, "the crawled page's process went"
        assert page.texts["pid"] in pids and http.texts["pid"] in pids, "the pages in use stay"
        time.sleep(1.2)
        assert texts_of(click(ws, page, "inc"))["value"] == "2"
        assert texts_of(http.post(http.call("inc")).json())["value"] == "2"


def test_http_only_pages_make_contact_at_load_and_a_process_gone_before_a_click_reloads_the_page(server, new_client):
    from tests.test_parano import PageSide

    c = new_client()
    read_first = Page(c, "/abandon-http")  # timeout_abandoned=1, http_only
    assert read_first.post(None, raw=b'{"contact": 1}').json() == {}  # what client.js sends at load
    parano = Page(c, "/abandon-parano-http")
    side = PageSide(parano.cfg["token"])
    side.agree(parano.post(None, raw=side.hello().encode()).json()["pub"])  # its hello is its contact
    silent = Page(new_client(), "/abandon-http")  # no contact
    idle = Page(c, "/inactive-http")  # timeout_inactivity=1
    assert texts_of(idle.post(idle.call("inc")).json())["value"] == "1"  # (its connection stays pooled)
    time.sleep(1.6)  # the user reads before clicking
    assert idle.post(idle.call("inc")).json()["asgi_htag"] == "gone", "the process went before the click"
    assert texts_of(read_first.post(read_first.call("inc")).json())["value"] == "1"
    assert texts_of(side.open(parano.post(None, raw=side.seal(parano.call("inc")).encode()).json()))["value"] == "1"
    assert silent.post(silent.call("inc")).json()["asgi_htag"] == "gone", "reload, not 'the application stopped'"


def test_inactivity_timeout_ends_the_process(server, new_client):
    c = new_client()
    page = Page(c, "/inactive")
    with page.ws() as ws:
        # nothing is sent: after 1 s without interaction the process says bye
        msg = recv_json(ws, timeout=30)
    # "dead", not "gone": the page says so and waits for a reload rather than reload by itself
    assert msg["asgi_htag"] == "dead" and msg["reason"] == "inactivity", msg
    assert Page(c, "/inactive").texts["pid"] != page.texts["pid"], "a reload builds a new instance"


def test_an_interaction_longer_than_the_inactivity_timeout_finishes_and_the_timeout_counts_from_its_end(server, new_client):
    import time

    page = Page(new_client(), "/inactive-sleeper")  # timeout_inactivity=1, the click takes 2 s
    with page.ws() as ws:
        assert texts_of(click(ws, page, "sleep"))["done"] == "1", "the process stayed for the whole interaction"
        answered = time.monotonic()
        msg = recv_json(ws, timeout=30)
        assert msg["asgi_htag"] == "dead"
        assert time.monotonic() - answered >= 0.9, "it went only after a second without interaction (a lower bound)"


def test_interactions_push_the_inactivity_deadline_back(server, new_client):
    """timeout_inactivity=1: clicks every 0.25 s keep the process for three times that
    long (same process, the count goes on); once the clicks stop, it says bye."""
    import time

    c = new_client()
    page = Page(c, "/inactive")
    with page.ws() as ws:
        values = []
        for _ in range(12):
            values.append(texts_of(click(ws, page, "inc"))["value"])
            time.sleep(0.25)
        assert values == [str(i) for i in range(1, 13)]
        msg = recv_json(ws, timeout=30)
    assert msg["asgi_htag"] == "dead"


def test_a_render_while_the_process_is_leaving_gets_a_fresh_process(server, new_client):
    """The app called exit(): its process has said bye and closed its socket, but it is
    still alive a moment (the fork server still counts it). A reload in that moment gets a
    page from a fresh process, not an error."""
    c = new_client()
    page = Page(c, "/quitter")
    with page.ws() as ws:
        ws.send(json.dumps(page.call("quit")))
        msgs = [recv_json(ws), recv_json(ws)]
    assert msgs[-1]["asgi_htag"] == "gone"
    again = Page(c, "/quitter")
    assert again.status == 200, again.html[-500:]
    assert again.texts["pid"] != page.texts["pid"]


def test_resync_after_reconnect_redraws_missed_pushes(server, new_client):
    page = Page(new_client(), "/")
    with page.ws() as ws:
        click(ws, page, "inc")
    with page.ws(resync=True) as ws:
        assert texts_of(recv_json(ws))["value"] == "1"


def test_tag_update_returns_false_in_http_only(server, new_client):
    import time

    c = new_client()
    page = Page(c, "/pusher-http")
    assert page.post(page.call("start")).status_code == 200
    # the background task cannot push; what it did is visible on the next render
    for _ in range(100):  # bounded wait for the task's three ticks
        again = Page(c, "/pusher-http")
        if again.texts["ticks"] == "3":
            break
        time.sleep(0.05)
    assert again.texts["ticks"] == "3"
    assert again.texts["update-result"] == "False"


def _tcp_inodes():
    inodes = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            inodes.add(line.split()[9])
    return inodes


def test_per_session_processes_hold_no_client_socket(server, new_client):
    from tests.conftest import pids_in_runtime

    c = new_client()
    page = Page(c, "/")
    with page.ws() as ws:
        click(ws, page, "inc")
        tcp = _tcp_inodes()
        # the web server's own processes (uvicorn; hypercorn's parent and its worker) hold
        # client sockets by design: every other process of the server must hold none
        web = {server.proc.pid, int(page.response.headers["x-worker-pid"])}
        stats = c.get("/_stats").json()
        assert stats["pid"] in pids_in_runtime(server.runtime_dir)
        checked = 0
        for pid in pids_in_runtime(server.runtime_dir):
            if pid in web:
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    assert target[8:-1] not in tcp, f"process {pid} holds a TCP socket"
            checked += 1
        assert checked >= 3, "the zygote, its forker and at least one per-session process were checked"


def test_runtime_dir_is_private_and_socket_names_are_hashes(server, new_client):
    import re
    import stat

    c = new_client()
    Page(c, "/")
    mode = stat.S_IMODE(os.stat(server.runtime_dir).st_mode)
    assert mode == 0o700
    cookie_values = [ck.value for ck in c.cookies.jar]
    names = os.listdir(server.runtime_dir)
    socks = [n for n in names if n.endswith(".s") and n != "zygote.s"]
    assert socks and all(re.fullmatch(r"[0-9a-f]{20}\.s", n) for n in socks)
    for value in cookie_values:
        sid = value.split(".")[0]
        assert not any(sid in n for n in names)


def test_pool_full_gives_503_and_existing_users_carry_on(make_server, loop):
    import httpx

    srv = make_server(loop=loop, env={"TEST_MAX_PROCESSES": "2"})
    clients = [httpx.Client(base_url=srv.url, timeout=30) for _ in range(3)]
    try:
        a, b = Page(clients[0], "/"), Page(clients[1], "/")
        assert a.status == b.status == 200
        full = Page(clients[2], "/")
        assert full.status == 503 and "busy" in full.html.lower()
        srv.wait_for_log("pool is full")  # told in the server's log, not only to the browser
        with a.ws() as ws:
            assert texts_of(click(ws, a, "inc"))["value"] == "1"
        assert Page(clients[1], "/").texts["pid"] == b.texts["pid"]
    finally:
        for c in clients:
            c.close()


def test_clients_that_never_make_contact_cannot_keep_people_out_at_max_processes(make_server):
    """Cookieless GETs (a crawler, curl: no JavaScript, so their pages never open a
    websocket) used to hold max_processes for timeout_abandoned (120 s), turning every
    newcomer away. Full, the fork server ends the oldest of those past 10 s instead; a
    person's session, which made contact, is never ended for that."""
    import httpx

    srv = make_server(env={"TEST_MAX_PROCESSES": "2"})
    with httpx.Client(base_url=srv.url, timeout=30) as person, httpx.Client(base_url=srv.url, timeout=30) as crawler:
        page = Page(person, "/")
        with page.ws() as ws:
            assert texts_of(click(ws, page, "inc"))["value"] == "1"
        assert crawler.get("/").status_code == 200  # its page never makes contact
        crawler.cookies.clear()
        assert crawler.get("/").status_code == 503, "full; the crawler's process is too young to be judged"
        time.sleep(10.5)
        with httpx.Client(base_url=srv.url, timeout=30) as newcomer:
            fresh = Page(newcomer, "/")
            assert fresh.status == 200
            with fresh.ws() as ws:
                assert texts_of(click(ws, fresh, "inc"))["value"] == "1"
        again = Page(person, "/")
        assert again.texts["pid"] == page.texts["pid"], "the person's process lives on"
        with again.ws() as ws:
            assert texts_of(click(ws, again, "inc"))["value"] == "2"
    srv.wait_for_log("whose page made no contact in")


def test_debug_mode_shows_the_traceback(make_server, loop):
    import httpx

    srv = make_server(loop=loop, env={"TEST_DEBUG": "1"})
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        page = Page(c, "/crashy")
        with page.ws() as ws:
            reply = click(ws, page, "boom")
    assert "Traceback" in reply["err"] and "ValueError: boom in the app" in reply["err"]


def test_pushes_do_not_count_as_activity(server, new_client):
    page = Page(new_client(), "/inactive-ticker")
    with page.ws() as ws:
        ws.send(json.dumps(page.call("start")))
        pushes = 0
        for _ in range(2000):  # bounded: the process must end on its own
            msg = recv_json(ws, timeout=30)
            if msg.get("asgi_htag"):
                break
            pushes += 1
    assert msg["asgi_htag"] == "dead" and msg["reason"] == "inactivity", "the process exits although it keeps pushing"
    assert pushes >= 3


def test_fork_server_killed_recovers_on_next_render(make_server, loop):
    import httpx

    srv = make_server(loop=loop)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        c.get("/set?v=survives")
        page = Page(c, "/")
        zygote = c.get("/_stats").json()["pid"]
        with page.ws() as ws:
            click(ws, page, "inc")
            os.kill(zygote, signal.SIGKILL)
            # its children follow it (parent-death signal) and say so to the page
            assert recv_json(ws, timeout=30)["asgi_htag"] in ("gone", "dead")
        again = Page(c, "/")
        assert again.status == 200 and again.texts["value"] == "0"
        assert c.get("/_stats").json()["pid"] != zygote
        assert Page(c, "/state").texts["from-route"] == "'survives'"


def test_clicks_of_several_tabs_queued_behind_each_other_are_not_taken_for_a_stuck_process(server, new_client):
    import contextlib
    import threading

    c = new_client()
    pages = [Page(c, "/long-nap") for _ in range(5)]  # one instance, five tabs; each click takes 0.8 s of 1
    assert len({p.texts["pid"] for p in pages}) == 1
    answers = [None] * len(pages)
    opened = contextlib.ExitStack()
    sockets = [opened.enter_context(p.ws()) for p in pages]  # all connected first, then all click at once

    def tab(i):
        try:
            answers[i] = click(sockets[i], pages[i], "nap")
        except Exception as exc:  # reported by the assertion below
            answers[i] = {"exception": repr(exc)}

    threads = [threading.Thread(target=tab, args=(i,)) for i in range(len(pages))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        opened.close()
    # the last one waited for four others (3.2 s, past the worker's 1 + 2 s backstop), legally
    assert sorted(texts_of(a).get("naps", "") for a in answers) == ["1", "2", "3", "4", "5"], answers


def test_a_process_blocked_outside_any_interaction_is_killed_by_the_worker(server, new_client):
    page = Page(new_client(), "/background-block")  # timeout_interaction=1
    with page.ws() as ws:
        assert "asgi_htag" not in click(ws, page, "arm")
        time.sleep(0.5)  # a callback now blocks the process's loop, with no interaction timer armed
        ws.send(json.dumps(page.call("inc")))
        assert recv_json(ws, timeout=30)["asgi_htag"] == "dead"
    for _ in range(100):
        if not os.path.exists(f"/proc/{page.texts['pid']}"):
            break
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{page.texts['pid']}"), "the stuck process was killed"


def test_a_process_stuck_past_its_timeout_is_killed_by_the_worker(server, new_client):
    c = new_client()
    page = Page(c, "/stuck")
    with page.ws() as ws:
        ws.send(json.dumps(page.call("stuck")))
        msg = recv_json(ws, timeout=30)
    assert msg["asgi_htag"] == "dead" and "too long" in msg["message"]
    assert Page(c, "/stuck").status == 200, "a reload gives a fresh instance"


@pytest.mark.parametrize("setting, expected", [("asyncio", "asyncio."), (None, "uvloop")])
def test_runner_process_loop_setting_reaches_the_processes(make_server, setting, expected):
    """Runner(..., process_loop=...) on a real server: the app's process runs on that loop
    (uvloop by default, since the test extras install it)."""
    import httpx

    srv = make_server(env={"TEST_PROCESS_LOOP": setting} if setting else {})
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert Page(c, "/loop").texts["loop"].startswith(expected)


def test_worker_gc_freeze_and_batch_scheduling_defaults_and_each_setting(server, make_server):
    import httpx

    def observe(url, path="/"):
        with httpx.Client(base_url=url, timeout=30) as c:
            page = Page(c, path)
            assert page.status == 200
            if path != "/":
                return None, int(page.texts["pid"]), None, None
            worker = int(page.response.headers["x-worker-pid"])  # hypercorn's is not server.proc
            return c.get("/_gc").json(), int(page.texts["pid"]), c.get("/_stats").json(), worker

    gc_on, pid, stats, worker = observe(server.url)
    # the imported world (uvicorn, starlette, htag...) is out of the collector's reach
    assert gc_on["frozen"] > 20000 and gc_on["tracked"] < gc_on["frozen"]
    # session processes (and the forker they come from) under SCHED_BATCH; the web worker
    # and the fork server keep the default policy
    assert os.sched_getscheduler(pid) == os.SCHED_BATCH
    assert os.sched_getscheduler(stats["forker"]) == os.SCHED_BATCH
    assert os.sched_getscheduler(stats["pid"]) == os.SCHED_OTHER
    assert os.sched_getscheduler(worker) == os.SCHED_OTHER

    srv = make_server(env={"TEST_GC_FREEZE": "0", "TEST_BATCH_SCHEDULING": "0", "TEST_WORKER_BATCH_SCHEDULING": "1"})
    gc_off, pid, _, worker = observe(srv.url)
    assert gc_off["frozen"] == 0 and gc_off["tracked"] > 20000
    assert os.sched_getscheduler(pid) == os.SCHED_OTHER
    assert os.sched_getscheduler(worker) == os.SCHED_BATCH

    # a mount does not own the server: it asks for worker_batch_scheduling, and the host
    # app's process keeps its policy
    srv = make_server("tests.servers.mounted:app")
    _, pid, _, _ = observe(srv.url, "/ui/")
    assert os.sched_getscheduler(srv.proc.pid) == os.SCHED_OTHER
    assert os.sched_getscheduler(pid) == os.SCHED_BATCH


def test_worker_batch_scheduling_auto_follows_the_interactions_in_flight(make_server):
    """worker_batch_scheduling="auto": the worker's loop thread goes under SCHED_BATCH once twice as
    many interactions as it has CPUs are in flight (websocket clicks and http_only POSTs
    alike), and back under the default policy once they are answered, or once the pages
    that sent them have gone."""
    import contextlib
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    srv = make_server(env={"TEST_WORKER_BATCH_SCHEDULING": "auto"})
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        worker = int(c.get("/_stats").headers["x-worker-pid"])  # uvicorn's loop runs in its main thread
    high = 2 * len(os.sched_getaffinity(worker))

    def policy():
        return os.sched_getscheduler(worker)

    def becomes(expected, within=20.0):
        deadline = time.monotonic() + within
        while policy() != expected:
            assert time.monotonic() < deadline, f"the worker's policy stayed {policy()}, not {expected}"
            time.sleep(0.02)

    clients = [httpx.Client(base_url=srv.url, timeout=30) for _ in range(high)]
    try:
        pages = [Page(c, "/holder?3") for c in clients]
        assert policy() == os.SCHED_OTHER  # at rest
        with contextlib.ExitStack() as stack:
            sockets = [stack.enter_context(p.ws()) for p in pages]
            for ws, page in zip(sockets[:-1], pages):  # one short of the threshold
                ws.send(json.dumps(page.call("hold")))
            time.sleep(0.5)  # the clicks reach their processes, which hold them for 3 s
            assert policy() == os.SCHED_OTHER
            sockets[-1].send(json.dumps(pages[-1].call("hold")))
            becomes(os.SCHED_BATCH)
            answers = [texts_of(recv_json(ws, timeout=30))["done"] for ws in sockets]
            assert answers == ["1"] * high
            becomes(os.SCHED_OTHER)

            # clicks in flight whose pages go away: their answers will never come back
            for ws, page in zip(sockets, pages):
                ws.send(json.dumps(page.call("hold")))
            becomes(os.SCHED_BATCH)
        becomes(os.SCHED_OTHER)  # the websockets are closed

        # http_only POSTs count the same
        http_pages = [Page(c, "/holder-http?2") for c in clients]
        with ThreadPoolExecutor(high) as ex:
            replies = [ex.submit(p.post, p.call("hold")) for p in http_pages]
            becomes(os.SCHED_BATCH)
            assert [texts_of(r.result().json())["done"] for r in replies] == ["1"] * high
        becomes(os.SCHED_OTHER)
    finally:
        for c in clients:
            c.close()


def test_a_page_that_reconnects_while_an_interaction_pushes_gets_the_pushes_then_its_resync(server, new_client):
    import time

    page = Page(new_client(), "/progress")
    with page.ws() as running:
        running.send(json.dumps(page.call("run")))  # pushes every 0.1 s for 1.5 s, holding the instance
        time.sleep(0.4)
        with page.ws(resync=True) as again:  # the same page after a network blip, or another tab
            shown = []
            while True:
                msg = recv_json(again)
                assert "asgi_htag" not in msg, f"the reconnect was refused: {msg}"
                shown.append(texts_of(msg).get("v"))
                if shown[-1] == "15":
                    break
            assert len(shown) >= 5, shown  # pushes arrived while the interaction ran
        answer = recv_json(running)
        while texts_of(answer).get("v") != "15" or "asgi_htag" in answer:
            answer = recv_json(running)


def test_a_failed_resync_tells_the_page_and_the_log_says_why(server, new_client):
    page = Page(new_client(), "/bad-render")
    with page.ws() as ws:
        assert "asgi_htag" not in click(ws, page, "brk")
    with page.ws(resync=True) as ws:
        msg = recv_json(ws)
        assert msg["asgi_htag"] == "error" and msg["message"].startswith("the application failed"), msg
        assert "(RuntimeError)" in msg["message"] and "render fails" not in msg["message"], "no app text without debug"
    server.wait_for_log("RuntimeError: render fails in this state")
