"""Log in with OAuth2 (authlib's Starlette client), then an htag app greets you by name.

Run from the repository root, with an OAuth2 provider listening on 127.0.0.1:5000 (the
test provider works: see tests/servers/oauth_provider.py)::

    uvicorn examples.starlette.oauth:app          # or: python examples/starlette/oauth.py

then open http://127.0.0.1:8000 and click "log in".

The routes (/login, /auth, /logout) and the htag app share ONE session: authlib keeps its
``state`` in ``request.session`` during the flow, /auth stores the user there, and the app
reads it as ``self.session``. The provider's endpoints come from the environment (no OIDC
discovery, nothing is fetched at start-up):

    OAUTH_PROVIDER_URL   default http://127.0.0.1:5000
    OAUTH_AUTHORIZE_URL  default $OAUTH_PROVIDER_URL/authorize
    OAUTH_TOKEN_URL      default $OAUTH_PROVIDER_URL/token
    OAUTH_USERINFO_URL   default $OAUTH_PROVIDER_URL/userinfo
    OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, OAUTH_SCOPE (default "profile")

The redirect URI sent to the provider is this server's ``/auth`` (e.g.
http://127.0.0.1:8000/auth); register exactly that one with the provider.
"""
import html
import logging
import os

import httpx
from authlib.integrations.starlette_client import OAuth, OAuthError
from htag import Tag
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from asgi_htag import Runner

logger = logging.getLogger(__name__)

PROVIDER_URL = os.environ.get("OAUTH_PROVIDER_URL", "http://127.0.0.1:5000").rstrip("/")
USERINFO_URL = os.environ.get("OAUTH_USERINFO_URL", PROVIDER_URL + "/userinfo")

oauth = OAuth()
oauth.register(
    "provider",
    client_id=os.environ.get("OAUTH_CLIENT_ID", "asgi-htag-example"),
    client_secret=os.environ.get("OAUTH_CLIENT_SECRET", "example-secret"),
    authorize_url=os.environ.get("OAUTH_AUTHORIZE_URL", PROVIDER_URL + "/authorize"),
    access_token_url=os.environ.get("OAUTH_TOKEN_URL", PROVIDER_URL + "/token"),
    client_kwargs={"scope": os.environ.get("OAUTH_SCOPE", "profile")},
)


class App(Tag.body):
    """The page at /: who is logged in, read from the session that /auth wrote."""

    def render(self):
        # render() runs at every page load, so the page always follows the session
        # (a reload reuses this instance and its process).
        self.clear()
        user = self.session.get("user")
        if user:
            self <= Tag.h1(f"Hello {user.get('name') or user.get('sub')}", _data_test="greeting")
            self <= Tag.a("log out", _href="/logout", _data_test="logout")
        else:
            self <= Tag.p("You are not logged in.", _data_test="greeting")
            self <= Tag.a("log in", _href="/login", _data_test="login")


async def login(request: Request) -> Response:
    # authlib stores the state (and the redirect URI) in request.session, asgi_htag's session.
    return await oauth.provider.authorize_redirect(request, str(request.url_for("auth")))


async def auth(request: Request) -> Response:
    try:
        token = await oauth.provider.authorize_access_token(request)
        resp = await oauth.provider.get(USERINFO_URL, token=token)
        resp.raise_for_status()
        profile = resp.json()
    except OAuthError as exc:
        logger.warning("OAuth login refused: %s", exc.error)
        return HTMLResponse(
            f"<h1>Login failed</h1><p>{html.escape(exc.error or 'error')}</p><a href='/'>back</a>", status_code=400
        )
    except httpx.HTTPError as exc:  # the provider is down, or answered the token or userinfo call with an error
        logger.error("OAuth login failed: the provider did not answer as expected: %r", exc)
        return HTMLResponse(
            "<h1>Login failed</h1><p>The identity provider could not be reached. Try again later.</p>"
            "<a href='/'>back</a>",
            status_code=502,
        )
    # A new session id after a login: an id seen before authentication is worthless now.
    request.session.regenerate_id()
    request.session["user"] = {
        "sub": str(profile.get("sub", "")),
        "name": profile.get("name") or profile.get("preferred_username") or "",
    }
    return RedirectResponse("/", status_code=303)


async def logout(request: Request) -> Response:
    request.session.clear()
    return RedirectResponse("/", status_code=303)


app = Runner(
    App,
    host="127.0.0.1",
    port=8000,
    routes=[Route("/login", login), Route("/auth", auth), Route("/logout", logout)],
)

if __name__ == "__main__":
    app.run()
