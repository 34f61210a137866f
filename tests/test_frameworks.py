"""HtagASGI inside other frameworks: the FastAPI and Quart examples under a real uvicorn,
checked with the protocol client and in a real Chromium."""
import json
import time
from typing import Iterator

import pytest

from tests.client import Page, recv_json, sel, texts_of
from tests.conftest import Server

pytestmark = pytest.mark.server


def _serve(target: str) -> Iterator[Server]:
    s = Server(target).start()
    try:
        yield s
    finally:
        s.stop()
        left = s.wait_no_processes()
        s.cleanup()
        assert not left, f"processes left after the server stopped: {left}"


@pytest.fixture(scope="module")
def fastapi_server() -> Iterator[Server]:
    yield from _serve("examples.fastapi.app:app")


@pytest.fixture(scope="module")
def quart_server() -> Iterator[Server]:
    yield from _serve("examples.quart.app:app")


@pytest.fixture
def client_of(http_clients):
    """A factory of httpx clients, each one a separate browser session."""
    return lambda server: http_clients(server.url, follow_redirects=True)


def click(page: Page, name: str, ws) -> dict:
    """Send the click on ``name`` over the websocket; return the texts it re-rendered."""
    ws.send(json.dumps(page.call(name)))
    return texts_of(recv_json(ws))


# --- FastAPI ----------------------------------------------------------------------------
def test_fastapi_counter_under_ui_counts_clicks_over_its_websocket(fastapi_server, client_of):
    page = Page(client_of(fastapi_server), "/ui/")
    assert page.status == 200
    assert page.texts["value"] == "0"
    assert page.cfg["mode"] == "ws" and page.cfg["ws"].startswith("/ui/_htag/")
    with page.ws() as ws:
        assert click(page, "inc", ws)["value"] == "1"
        assert click(page, "inc", ws)["value"] == "2"


def test_fastapi_own_routes_still_answer_beside_the_mount(fastapi_server, client_of):
    c = client_of(fastapi_server)
    home = c.get("/")
    assert home.status_code == 200 and "FastAPI home" in home.text
    assert c.get("/api/session").json() == {"clicks": 0, "name": None}
    assert c.get("/openapi.json").json()["paths"].keys() >= {"/", "/name", "/api/session"}
    assert c.get("/docs").status_code == 200
    redirect = c.get("/ui", follow_redirects=False)
    assert redirect.status_code in (301, 307) and redirect.headers["location"].endswith("/ui/")
    assert c.get("/ui/elsewhere").status_code == 404
    assert c.get("/nowhere").status_code == 404


@pytest.mark.parametrize("framework", ["fastapi", "quart"])
def test_framework_route_and_htag_app_read_and_write_one_session(framework, request, client_of):
    server = request.getfixturevalue(f"{framework}_server")
    c = client_of(server)
    # a route of the framework writes the session's "name"; the htag app greets with it
    page = Page(c, "/name?value=Bob")
    assert page.response.url.path == "/ui/"
    assert page.texts["hello"] == "Hello Bob"
    # the htag app writes self.session["clicks"]; a route of the framework reads it
    with page.ws() as ws:
        click(page, "inc", ws)
        assert click(page, "inc", ws)["value"] == "2"
    assert c.get("/api/session").json() == {"clicks": 2, "name": "Bob"}
    # a later write by a route shows on the next load of the same (reused) instance
    page = Page(c, "/name?value=Alice")
    assert page.texts["hello"] == "Hello Alice" and page.texts["value"] == "2"
    # one cookie carries it all (Quart sets none of its own), and another browser sees none of it
    assert [cookie.name for cookie in c.cookies.jar] == ["asgi_htag_session"]
    other = client_of(server)
    assert other.get("/api/session").json() == {"clicks": 0, "name": None}


@pytest.mark.parametrize("framework", ["fastapi", "quart"])
def test_framework_logout_ends_the_htag_process_and_its_page_is_told(framework, request, client_of):
    server = request.getfixturevalue(f"{framework}_server")

    def processes():
        return {p.name for p in server.runtime_dir.glob("*.s") if p.name != "zygote.s"}

    c = client_of(server)
    page = Page(c, "/name?value=Eve")
    with page.ws() as ws:
        assert click(page, "inc", ws)["value"] == "1"
        before = processes()
        home = c.get("/logout")  # a route of the framework: session.clear()
        assert home.status_code == 200 and home.url.path == "/"
        assert recv_json(ws)["asgi_htag"] == "gone", "its open page is told, and reloads"
    assert c.get("/api/session").json() == {"clicks": 0, "name": None}
    for _ in range(100):
        if len(processes()) == len(before) - 1:
            break
        time.sleep(0.1)
    assert processes() < before, "the session's process ended (on_drop=ui.session_dropped)"
    assert Page(c, "/ui/").texts["value"] == "0", "a new session, a new instance"


# --- Quart ------------------------------------------------------------------------------
def test_quart_counter_under_ui_counts_clicks_over_its_websocket(quart_server, client_of):
    page = Page(client_of(quart_server), "/ui/")
    assert page.status == 200
    assert page.cfg["ws"].startswith("/ui/_htag/") and page.cfg["post"].startswith("/ui/_htag/")
    with page.ws() as ws:
        assert click(page, "inc", ws)["value"] == "1"
        assert click(page, "inc", ws)["value"] == "2"
    assert Page(page.client, "/ui/").texts["value"] == "2"


def test_quart_own_routes_still_answer_beside_the_dispatcher(quart_server, client_of):
    c = client_of(quart_server)
    home = c.get("/")
    assert home.status_code == 200 and "Quart home" in home.text
    assert c.get("/api/ping").json() == {"framework": "quart", "pong": True}
    assert c.get("/api/session").json() == {"clicks": 0, "name": None}
    assert c.get("/nowhere").status_code == 404
    assert c.get("/uix").status_code == 404  # a sibling of the prefix is Quart's
    assert c.get("/ui/elsewhere").status_code == 404  # under the prefix: the htag app's
    redirect = c.get("/ui?x=1", follow_redirects=False)
    assert redirect.status_code == 307 and redirect.headers["location"] == "/ui/?x=1"


# --- in Chromium ------------------------------------------------------------------------
@pytest.mark.browser
def test_fastapi_in_browser_name_from_route_and_clicks_back_on_the_home_page(fastapi_server, page):
    ws_urls = []
    page.on("websocket", lambda ws: ws_urls.append(ws.url))
    page.goto(fastapi_server.url + "/")
    assert page.text_content(sel("clicks")) == "0"
    page.fill(sel("name-input"), "Grace")
    page.click(sel("set-name"))
    page.wait_for_selector(f"{sel('hello')}:text-is('Hello Grace')")
    assert page.url == fastapi_server.url + "/ui/"
    for expected in ("1", "2", "3"):
        page.click(sel("inc"))
        page.wait_for_selector(f"{sel('value')}:text-is('{expected}')")
    assert ws_urls and all(u.startswith(fastapi_server.ws_url + "/ui/_htag/") for u in ws_urls)
    page.click("text=back to FastAPI")
    page.wait_for_selector(f"{sel('clicks')}:text-is('3')")
    assert page.text_content(sel("name")) == "Grace"


@pytest.mark.browser
def test_quart_in_browser_name_from_route_and_clicks_back_on_the_home_page(quart_server, page):
    ws_urls = []
    page.on("websocket", lambda ws: ws_urls.append(ws.url))
    page.goto(quart_server.url + "/")
    assert page.text_content(sel("quart-home")) == "Quart home"
    assert page.text_content(sel("clicks")) == "0"
    page.click(sel("to-ui"))
    page.wait_for_selector(f"{sel('hello')}:text-is('Hello world')")
    assert page.url == quart_server.url + "/ui/"
    for expected in ("1", "2"):
        page.click(sel("inc"))
        page.wait_for_selector(f"{sel('value')}:text-is('{expected}')")
    assert ws_urls and all(u.startswith(quart_server.ws_url + "/ui/_htag/") for u in ws_urls)
    page.reload()
    assert page.text_content(sel("value")) == "2"
    page.click("text=back to Quart")
    page.wait_for_selector(f"{sel('clicks')}:text-is('2')")
    page.fill(sel("name-input"), "Ada")
    page.click(sel("set-name"))
    page.wait_for_selector(f"{sel('hello')}:text-is('Hello Ada')")
    assert page.text_content(sel("value")) == "2"
    page.click(sel("inc"))
    page.wait_for_selector(f"{sel('value')}:text-is('3')")
    page.click("text=back to Quart")
    page.wait_for_selector(f"{sel('clicks')}:text-is('3')")
    assert page.text_content(sel("name")) == "Ada"
