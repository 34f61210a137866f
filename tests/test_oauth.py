"""OAuth2 login (examples/starlette/oauth.py) against a REAL authlib authorization server
(tests/servers/oauth_provider.py, Flask under gunicorn): authlib's client flow writes
request.session, and the htag app reads the logged-in user from the same session."""
import subprocess
import sys
import threading
import time
from typing import Iterator, List, Optional, Tuple
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from tests.client import Page, sel
from tests.conftest import ROOT, Server

pytestmark = pytest.mark.server

CLIENT_ID = "htag-test-client"
CLIENT_SECRET = "htag-test-secret-0123456789"
USER_NAME = "Ada Lovelace"


class Provider(Server):
    """The OAuth2 provider: a WSGI app, one gunicorn process (its data is in memory)."""

    def command(self) -> List[str]:
        return [sys.executable, "-m", "gunicorn", "-w", "1", "--threads", "4", "-b", f"127.0.0.1:{self.port}",
                "--graceful-timeout", "2", "tests.servers.oauth_provider:app"]

    def start(self, timeout: float = 30) -> "Provider":
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._stdout = self.proc.stdout
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        self.wait_for_log("Booting worker", timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:  # bounded wait until the worker answers
            try:
                if httpx.get(self.url + "/health", timeout=2).text == "ok":
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the OAuth provider never answered:\n" + self.log())
            time.sleep(0.05)


@pytest.fixture(scope="module")
def oauth() -> Iterator[Tuple[Server, Provider]]:
    """The example app and its provider, each knowing the other's address."""
    provider = Provider("tests.servers.oauth_provider:app")
    app = Server(
        "examples.starlette.oauth:app",
        env={"OAUTH_PROVIDER_URL": provider.url, "OAUTH_CLIENT_ID": CLIENT_ID, "OAUTH_CLIENT_SECRET": CLIENT_SECRET},
    )
    provider.env.update({
        "OAUTH_CLIENT_ID": CLIENT_ID,
        "OAUTH_CLIENT_SECRET": CLIENT_SECRET,
        "OAUTH_REDIRECT_URI": app.url + "/auth",
        "OAUTH_USER_NAME": USER_NAME,
    })
    left: List[int] = []
    try:
        provider.start()
        app.start()
        yield app, provider
    finally:
        app.stop()
        left = app.wait_no_processes()
        app.cleanup()
        provider.cleanup()
    assert not left, f"processes left after the server stopped: {left}"


@pytest.fixture
def new_client(oauth, http_clients):
    return lambda: http_clients(oauth[0].url)


def start_login(c: httpx.Client, provider: Provider) -> str:
    """/login, then the provider's /authorize: the callback URL the provider sends back."""
    to_provider = c.get("/login")
    assert to_provider.status_code == 302
    assert to_provider.headers["location"].startswith(provider.url + "/authorize?")
    back = httpx.get(to_provider.headers["location"], timeout=30)
    assert back.status_code == 302
    return back.headers["location"]


def with_state(callback: str, state: Optional[str]) -> str:
    """The callback's path and query, with ``state`` replaced (or removed if None)."""
    parts = urlsplit(callback)
    query = parse_qs(parts.query)
    query.pop("state")
    if state is not None:
        query["state"] = [state]
    return f"{parts.path}?{urlencode(query, doseq=True)}"


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def test_anonymous_visitor_sees_a_log_in_link(new_client):
    page = Page(new_client(), "/")
    assert page.status == 200
    assert page.texts["greeting"] == "You are not logged in."
    assert page.texts["login"] == "log in"


def test_callback_with_a_tampered_state_is_refused_and_nobody_is_logged_in(oauth, new_client):
    app, provider = oauth
    c = new_client()
    callback = start_login(c, provider)
    state = parse_qs(urlsplit(callback).query)["state"][0]
    assert callback.startswith(app.url + "/auth?")

    refused = c.get(with_state(callback, state[:-1] + ("x" if state[-1] != "x" else "y")))
    assert refused.status_code == 400
    assert "Login failed" in refused.text and "mismatching_state" in refused.text
    assert Page(c, "/").texts["greeting"] == "You are not logged in."

    # the same callback without a state at all is refused too
    refused = c.get(with_state(callback, None))
    assert refused.status_code == 400
    assert Page(c, "/").texts["greeting"] == "You are not logged in."

    # the untouched callback still logs this browser in: only the state was at fault
    done = c.get(path_of(callback))
    assert done.status_code == 303 and done.headers["location"] == "/"
    assert Page(c, "/").texts["greeting"] == f"Hello {USER_NAME}"


def test_callback_replayed_in_another_browser_is_refused(oauth, new_client):
    """Login CSRF: a callback (valid code, valid state) opened in a session that did not
    start the flow does not log that session in."""
    app, provider = oauth
    victim_of_csrf = new_client()
    callback = start_login(new_client(), provider)
    Page(victim_of_csrf, "/")  # the other browser has a session of its own
    refused = victim_of_csrf.get(path_of(callback))
    assert refused.status_code == 400 and "mismatching_state" in refused.text
    assert Page(victim_of_csrf, "/").texts["greeting"] == "You are not logged in."


@pytest.mark.browser
def test_login_through_the_provider_then_the_htag_app_says_hello(oauth, page):
    app, provider = oauth
    requests: List[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(app.url + "/")
    assert page.text_content(sel("greeting")) == "You are not logged in."
    cookie_before = {c["name"]: c["value"] for c in page.context.cookies()}

    page.click(sel("login"))
    page.wait_for_selector(f"{sel('greeting')}:text-is('Hello {USER_NAME}')")
    assert page.url == app.url + "/"
    # the browser really went through the provider and came back with a code
    assert any(u.startswith(provider.url + "/authorize?") for u in requests)
    callbacks = [u for u in requests if u.startswith(app.url + "/auth?")]
    assert len(callbacks) == 1 and "code=" in callbacks[0] and "state=" in callbacks[0]
    # the session id changed at login (the data moved to a new id)
    cookie_after = {c["name"]: c["value"] for c in page.context.cookies()}
    assert cookie_before["asgi_htag_session"] != cookie_after["asgi_htag_session"]

    page.reload()
    assert page.text_content(sel("greeting")) == f"Hello {USER_NAME}"

    page.click(sel("logout"))
    page.wait_for_selector(f"{sel('greeting')}:text-is('You are not logged in.')")
    assert page.text_content(sel("login")) == "log in"


def test_a_provider_that_cannot_be_reached_gives_a_clear_failure_page_not_a_500(http_clients):
    """The token exchange with a provider that is down: a 502 page that says so, a single
    error line in the log (no traceback), and nobody logged in."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    app = Server("examples.starlette.oauth:app", env={"OAUTH_PROVIDER_URL": down})
    try:
        app.start()
        c = http_clients(app.url)
        to_provider = c.get("/login")  # authlib keeps the state in the session, no provider contacted yet
        assert to_provider.status_code == 302 and to_provider.headers["location"].startswith(down + "/authorize?")
        state = parse_qs(urlsplit(to_provider.headers["location"]).query)["state"][0]
        failed = c.get(f"/auth?{urlencode({'code': 'some-code', 'state': state})}")
        assert failed.status_code == 502 and "could not be reached" in failed.text
        assert Page(c, "/").texts["greeting"] == "You are not logged in."
        app.wait_for_log("OAuth login failed: the provider did not answer as expected: ConnectError")
        assert "Traceback" not in app.log()
    finally:
        app.stop()
        left = app.wait_no_processes()
        app.cleanup()
    assert not left
