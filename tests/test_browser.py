"""What a person sees, in a real headless Chromium against a real uvicorn."""
import os
import re
import signal

import pytest

from tests.client import sel

pytestmark = [pytest.mark.browser, pytest.mark.server]


def test_click_counter(server, page):
    page.goto(server.url + "/")
    for expected in ("1", "2", "3"):
        page.click(sel("inc"))
        page.wait_for_selector(f"{sel('value')}:text-is('{expected}')")
    page.reload()
    assert page.text_content(sel("value")) == "3"


def test_tag_update_from_background_task(server, page):
    page.goto(server.url + "/pusher")
    page.click(sel("start"))
    page.wait_for_selector(f"{sel('ticks')}:text-is('3')")
    page.wait_for_selector(f"{sel('update-result')}:text-is('True')")


def test_http_only_clicks(server, page):
    page.goto(server.url + "/http")
    posts = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.click(sel("inc"))
    page.wait_for_selector(f"{sel('value')}:text-is('1')")
    page.click(sel("inc"))
    page.wait_for_selector(f"{sel('value')}:text-is('2')")
    assert len(posts) == 2 and all("/interact" in u for u in posts)


def test_query_params_rebuild_instance(server, page):
    page.goto(server.url + "/query?john&age=12")
    assert page.text_content(sel("args")) == "('john',)"
    assert page.text_content(sel("kargs")) == "[('age', '12')]"
    page.click(sel("inc"))
    page.wait_for_selector(f"{sel('value')}:text-is('1')")
    page.goto(server.url + "/query?bob")
    assert page.text_content(sel("args")) == "('bob',)"
    assert page.text_content(sel("value")) == "0"


def test_two_browser_contexts_are_independent(server, browser):
    a_ctx, b_ctx = browser.new_context(), browser.new_context()
    try:
        a, b = a_ctx.new_page(), b_ctx.new_page()
        a.goto(server.url + "/")
        b.goto(server.url + "/")
        assert a.text_content(sel("pid")) != b.text_content(sel("pid"))
        for _ in range(2):
            a.click(sel("inc"))
        a.wait_for_selector(f"{sel('value')}:text-is('2')")
        b.click(sel("inc"))
        b.wait_for_selector(f"{sel('value')}:text-is('1')")
        a.reload()
        assert a.text_content(sel("value")) == "2"
    finally:
        a_ctx.close()
        b_ctx.close()


def test_session_between_route_and_app(server, page):
    page.goto(server.url + "/set?v=from-browser")
    page.goto(server.url + "/state")
    assert page.text_content(sel("from-route")) == "'from-browser'"
    page.click(sel("write"))
    page.click(sel("state"))
    page.wait_for_selector(f"{sel('statev')}:text-is('1')")
    page.goto(server.url + "/get")
    assert '"from_app":"written-by-app"' in page.text_content("body").replace(" ", "")


def test_killed_process_shows_notice_and_reload_gives_fresh_instance(server, page):
    page.goto(server.url + "/")
    page.click(sel("inc"))
    page.wait_for_selector(f"{sel('value')}:text-is('1')")
    os.kill(int(page.text_content(sel("pid"))), signal.SIGKILL)
    notice = page.wait_for_selector("#asgi-htag-notice")
    assert "Reload" in notice.text_content()
    page.reload()
    assert page.text_content(sel("value")) == "0"


def test_interaction_timeout_message(server, page):
    page.goto(server.url + "/slow")
    page.click(sel("slow"))
    notice = page.wait_for_selector("#asgi-htag-notice", timeout=30000)
    assert re.search(r"took too long \(limit: 1 s\)", notice.text_content())
    page.reload()
    page.click(sel("inc"))
    page.wait_for_selector(f"{sel('value')}:text-is('1')")


def test_mounted_under_ui_in_starlette(make_server, page):
    srv = make_server("tests.servers.mounted:app")
    page.goto(srv.url + "/ui/")
    ws_urls = []
    page.on("websocket", lambda ws: ws_urls.append(ws.url))
    page.goto(srv.url + "/ui/")
    page.click(sel("inc"))
    page.wait_for_selector(f"{sel('value')}:text-is('1')")
    assert ws_urls and all("/ui/_htag/" in u for u in ws_urls)
    page.goto(srv.url + "/")
    assert page.text_content("body") == "home"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_page_reconnects_after_its_worker_is_killed(make_server, page, loop):
    srv = make_server(kind="gunicorn", workers=2, loop=loop, extra=["--preload"], env={"TEST_ZYGOTE_GRACE": "5"})
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    handshakes = []
    cdp.on("Network.webSocketHandshakeResponseReceived", lambda e: handshakes.append(e["response"]["headers"]))
    page.goto(srv.url + "/")
    pid = page.text_content(sel("pid"))
    page.click(sel("inc"))
    page.wait_for_selector(f"{sel('value')}:text-is('1')")
    worker = int({k.lower(): v for k, v in handshakes[-1].items()}["x-worker-pid"])
    os.kill(worker, signal.SIGKILL)
    # the page reconnects by itself (to another worker) and the instance is still there
    for _ in range(150):  # bounded: the page's backoff retries within a few seconds
        if len(handshakes) >= 2:
            break
        page.wait_for_timeout(100)
    assert len(handshakes) >= 2, "the page should have reconnected"
    new_worker = int({k.lower(): v for k, v in handshakes[-1].items()}["x-worker-pid"])
    assert new_worker != worker
    page.click(sel("inc"))
    page.wait_for_selector(f"{sel('value')}:text-is('2')")
    assert page.text_content(sel("pid")) == pid


def test_parano_clicks_and_pushes_are_encrypted_on_the_wire(server, page):
    frames = []
    page.on("websocket", lambda ws: (ws.on("framereceived", lambda f: frames.append(f)),
                                     ws.on("framesent", lambda f: frames.append(f))))
    page.goto(server.url + "/parano")
    assert "parano" not in (page.evaluate("() => Object.keys(window).join(',')") or "")
    for expected in ("1", "2"):
        page.click(sel("inc"))
        page.wait_for_selector(f"{sel('value')}:text-is('{expected}')")
    payloads = [f if isinstance(f, str) else f.decode() for f in frames]
    assert payloads and not any('"update"' in p or '"method"' in p for p in payloads)
    page.goto(server.url + "/parano-pusher")
    page.click(sel("start"))
    page.wait_for_selector(f"{sel('ticks')}:text-is('3')")


def test_parano_http_only_clicks(server, page):
    page.goto(server.url + "/parano-http")
    page.click(sel("inc"))
    page.wait_for_selector(f"{sel('value')}:text-is('1')")
    page.click(sel("inc"))
    page.wait_for_selector(f"{sel('value')}:text-is('2')")


def test_gone_reloads_once_but_never_endlessly(server, page):
    page.goto(server.url + "/")
    page.click(sel("inc"))
    page.wait_for_selector(f"{sel('value')}:text-is('1')")
    # the process ends (SIGTERM: it says bye): the page reloads by itself into a fresh one
    pid = page.text_content(sel("pid"))
    with page.expect_navigation():
        os.kill(int(pid), signal.SIGTERM)
    page.wait_for_selector(sel("pid"))
    assert page.text_content(sel("pid")) != pid and page.text_content(sel("value")) == "0"
    # had it already reloaded 3 times in 30 s (cookies blocked...), it stops and says why
    page.evaluate("() => sessionStorage.setItem('asgi_htag_reloads', JSON.stringify([Date.now(), Date.now(), Date.now()]))")
    loads = []
    page.on("load", lambda: loads.append(1))
    os.kill(int(page.text_content(sel("pid"))), signal.SIGTERM)
    notice = page.wait_for_selector("#asgi-htag-notice:has-text('cookies')")
    assert "cannot reach" in notice.text_content()
    page.wait_for_timeout(1000)
    assert loads == [], "no reload loop"


def test_page_survives_a_server_restart(make_server, page):
    from tests.conftest import Server

    srv = make_server(env={"TEST_ZYGOTE_GRACE": "1"})
    page.goto(srv.url + "/")
    page.click(sel("inc"))
    page.wait_for_selector(f"{sel('value')}:text-is('1')")
    old_pid = page.text_content(sel("pid"))
    srv.stop()
    assert not srv.wait_no_processes(), "stopping the server stopped every process"
    # the same server comes back (same port, same state): the page reconnects by itself,
    # learns its instance is gone and reloads into a fresh one
    again = Server(srv.target, env={"TEST_ZYGOTE_GRACE": "1"})
    again.tmp.rmdir()  # its own, still empty: it takes the first server's instead
    again.port, again.tmp = srv.port, srv.tmp
    again.state_dir, again.runtime_dir = srv.state_dir, srv.runtime_dir
    again.env.update({"ASGI_HTAG_STATE_DIR": str(srv.state_dir), "ASGI_HTAG_RUNTIME_DIR": str(srv.runtime_dir)})
    again.start()
    try:
        from playwright.sync_api import Error as PlaywrightError

        new_pid = old_pid
        for _ in range(300):  # bounded: reconnect backoff, then a reload
            try:
                new_pid = page.text_content(sel("pid"), timeout=1000)
            except PlaywrightError:  # the page is navigating
                new_pid = old_pid
            if new_pid != old_pid:
                break
            page.wait_for_timeout(100)
        assert new_pid != old_pid, "the page reloaded into a fresh instance"
        page.wait_for_load_state()
        assert page.text_content(sel("value")) == "0"
        page.click(sel("inc"))
        page.wait_for_selector(f"{sel('value')}:text-is('1')")
    finally:
        again.stop()
        left = again.wait_no_processes()
        again.cleanup()
        assert not left


# keeps every WebSocket the page makes, so that a test can drop one as a network blip would
_CAPTURE_SOCKETS = """
(function () { var W = window.WebSocket; window.__socks = [];
  window.WebSocket = function (u, p) { var s = p ? new W(u, p) : new W(u); window.__socks.push(s); return s; };
  window.WebSocket.prototype = W.prototype; })();
"""


def test_a_page_refused_at_every_reconnect_backs_off_then_stops_and_says_so(make_server, page):
    srv = make_server()
    page.add_init_script(_CAPTURE_SOCKETS)
    page.goto(srv.url + "/bad-render")
    page.wait_for_function("window.__socks.length === 1 && window.__socks[0].readyState === 1")
    page.click(sel("brk"))  # from now on the instance cannot render: every resync fails
    page.wait_for_timeout(300)
    page.evaluate("window.__socks[0].close()")  # a network blip
    notice = page.wait_for_selector("#asgi-htag-notice:has-text('cannot reconnect')", timeout=30000)
    assert notice.query_selector("a, button") is not None, "it offers a reload"
    tries = page.evaluate("window.__socks.length") - 1
    assert tries == 4, f"{tries} reconnects, each refused after it opened (the blip was the first close)"
    page.wait_for_timeout(1500)
    assert page.evaluate("window.__socks.length") - 1 == tries, "and no more after that"


def test_parano_page_refuses_a_replayed_frame_and_a_second_key_agreement(server, page):
    """Through a proxy between the page and the server (Playwright's websocket routing):
    an old sealed answer replayed to the page is refused, and a clear "hello" sent later
    (an attempt to re-key the page to the proxy's key) is ignored."""
    import base64
    import json
    import time

    from Crypto.Cipher import AES
    from Crypto.Hash import SHA256
    from Crypto.Protocol.DH import key_agreement
    from Crypto.Protocol.KDF import HKDF
    from Crypto.PublicKey import ECC

    state = {"to_page": [], "page_pub": None, "route": None}

    def proxy(ws):
        upstream = ws.connect_to_server()
        state["route"] = ws

        def up(m):
            o = json.loads(m)
            if "hello" in o:
                state["page_pub"] = o["hello"]
            upstream.send(m)

        def down(m):
            state["to_page"].append(m)
            ws.send(m)

        ws.on_message(up)
        upstream.on_message(down)

    page.route_web_socket("**/_htag/**", proxy)
    page.goto(server.url + "/parano")
    value_id = page.get_attribute(sel("value"), "id")
    page.click(sel("inc"))
    page.wait_for_selector(f"{sel('value')}:text-is('1')")
    first_answer = state["to_page"][-1]
    page.click(sel("inc"))
    page.wait_for_selector(f"{sel('value')}:text-is('2')")
    state["route"].send(first_answer)  # replayed: it would set the value back to 1
    page.wait_for_selector("#asgi-htag-notice:has-text('replayed')")
    assert page.text_content(sel("value")) == "2"
    # a clear hello with the proxy's key, then a frame sealed with the key it would give
    token = page.evaluate("__asgi_htag.cfg.token")
    mine = ECC.generate(curve="P-256")
    state["route"].send(json.dumps({"asgi_htag": "hello", "pub": base64.b64encode(mine.public_key().export_key(format="raw")).decode()}))
    peer = ECC.import_key(base64.b64decode(state["page_pub"]), curve_name="P-256")
    key = HKDF(key_agreement(static_priv=mine, static_pub=peer, kdf=lambda x: x), 32, token.encode(), SHA256,
               context=b"asgi_htag parano v1")
    cipher = AES.new(key, AES.MODE_GCM, nonce=bytes(12))
    cipher.update(b"asgi_htag s2c")
    forged = {"n": 10**6, "o": {"update": {value_id: f'<span data-test="value" id="{value_id}">INJECTED</span>'}}}
    ct, tag = cipher.encrypt_and_digest(json.dumps(forged).encode())
    state["route"].send(json.dumps({"p": base64.b64encode(bytes(12) + ct + tag).decode()}))
    time.sleep(0.5)
    assert page.text_content(sel("value")) == "2", "the page kept the key it agreed"


def test_http_only_clicks_go_one_at_a_time_and_are_applied_in_order(server, page):
    page.add_init_script("""
      (function () { var f = window.fetch; window.__inflight = 0; window.__most = 0;
        window.fetch = function () {
          window.__inflight += 1; window.__most = Math.max(window.__most, window.__inflight);
          return f.apply(this, arguments).finally(function () { window.__inflight -= 1; });
        }; })();
    """)
    page.goto(server.url + "/napper-http")  # each click takes 0.2 s in the process
    for _ in range(5):
        page.click(sel("nap"))  # faster than the answers come
    page.wait_for_selector(f"{sel('naps')}:text-is('5')")
    assert page.evaluate("window.__most") == 1


def test_an_http_only_page_read_for_a_while_before_its_first_click_keeps_its_instance(server, page):
    page.goto(server.url + "/abandon-http")  # timeout_abandoned=1: the page says it is there at load
    pid = page.text_content(sel("pid"))
    page.wait_for_timeout(1600)
    page.click(sel("inc"))
    page.wait_for_selector(f"{sel('value')}:text-is('1')")
    assert page.text_content(sel("pid")) == pid


@pytest.mark.parametrize("path", ["/crashy", "/crashy-http", "/crashy-parano", "/crashy-parano-http"])
def test_an_app_error_is_not_taken_for_a_lost_connection(server, page, path):
    """htag's client throws the app's error once it has reported it: over http_only that
    throw landed in the POST's catch ("Cannot reach the server", for good), and in parano
    mode in the decryption chain's ("Secure channel error"). It reaches the console, and
    the next click works with no notice."""
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + path)
    page.click(sel("boom"))
    page.click(sel("ok"))
    page.wait_for_selector(f"{sel('n')}:text-is('1')")
    page.click(sel("ok"))
    page.wait_for_selector(f"{sel('n')}:text-is('2')")
    page.wait_for_function("() => true")  # let a pending (re)thrown error land
    assert page.query_selector("#asgi-htag-notice") is None, page.text_content("#asgi-htag-notice")
    assert any("the application failed; the server's log has the details" in e for e in errors), errors


def test_an_http_only_page_says_it_cannot_reach_the_server_until_it_can_again(server, page):
    page.goto(server.url + "/http")
    page.click(sel("inc"))
    page.wait_for_selector(f"{sel('value')}:text-is('1')")
    interactions = re.compile(r"/interact")
    page.route(interactions, lambda route: route.abort())  # the network fails
    page.click(sel("inc"))
    notice = page.wait_for_selector("#asgi-htag-notice")
    assert "Cannot reach the server" in notice.text_content()
    page.unroute(interactions)
    page.click(sel("inc"))
    page.wait_for_selector(f"{sel('value')}:text-is('2')")  # the lost click never arrived
    page.wait_for_selector("#asgi-htag-notice", state="detached")


def test_a_page_left_unused_past_timeout_inactivity_says_so_and_waits_for_a_reload(server, page):
    """Its process ends (timeout_inactivity=1 here) and the page says so, with a Reload
    link, instead of reloading itself: a tab left open would otherwise start a new process
    every timeout_inactivity, for ever."""
    navigations = []
    page.goto(server.url + "/inactive")
    pid = page.text_content(sel("pid"))
    page.on("framenavigated", lambda frame: navigations.append(frame.url))
    notice = page.wait_for_selector("#asgi-htag-notice", timeout=30000)
    assert "left unused" in notice.text_content() and "Reload" in notice.text_content()
    page.wait_for_timeout(3000)  # three more timeouts' worth: nothing happens by itself
    assert navigations == [] and page.text_content(sel("pid")) == pid
    page.click("#asgi-htag-notice a")
    page.wait_for_load_state()
    page.wait_for_function(f"() => document.querySelector('[data-test=pid]') && document.querySelector('[data-test=pid]').textContent !== '{pid}'")
    page.click(sel("inc"))
    page.wait_for_selector(f"{sel('value')}:text-is('1')")


def test_a_page_that_clicks_over_its_websocket_keeps_its_session_cookie_alive(make_server, page):
    """The cookie's Max-Age (3 s here) is renewed by HTTP responses; a page that only
    clicks over its websocket asks for one now and then (every second here), so a person
    using one page for longer than Max-Age keeps their session."""
    import json

    srv = make_server(env={"TEST_SESSION_COOKIE": json.dumps({"max_age_seconds": 3})})
    page.goto(srv.url + "/set?v=kept")
    page.goto(srv.url + "/")
    for i in range(1, 7):  # 6 s of clicks, nothing but the websocket's
        page.wait_for_timeout(1000)
        page.click(sel("inc"))
        page.wait_for_selector(f"{sel('value')}:text-is('{i}')")
    page.goto(srv.url + "/get")
    assert "from_route" in page.content(), "the same session"
