"""A small, real OAuth2 authorization-code provider for the tests, built on authlib's server
side (Flask): one registered client, one test user who is approved at once at /authorize,
a /token endpoint, and a /userinfo resource behind a bearer token.

Everything lives in memory, so serve it with ONE process (threads are fine), e.g.::

    OAUTH_REDIRECT_URI=http://127.0.0.1:8000/auth \\
        python -m gunicorn -w 1 --threads 4 -b 127.0.0.1:5000 tests.servers.oauth_provider:app

Settings (environment): ``OAUTH_CLIENT_ID``, ``OAUTH_CLIENT_SECRET``, ``OAUTH_REDIRECT_URI``
(the only redirect URI the client may use), ``OAUTH_USER_NAME``.
"""
import os
import threading
import time
from typing import Any, Dict, Optional

from authlib.integrations.flask_oauth2 import AuthorizationServer, ResourceProtector, current_token
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.models import AuthorizationCodeMixin, ClientMixin, TokenMixin
from authlib.oauth2.rfc6749.util import list_to_scope, scope_to_list
from authlib.oauth2.rfc6750 import BearerTokenValidator
from flask import Flask, jsonify

CLIENT_ID = os.environ.get("OAUTH_CLIENT_ID", "asgi-htag-example")
CLIENT_SECRET = os.environ.get("OAUTH_CLIENT_SECRET", "example-secret")
REDIRECT_URI = os.environ.get("OAUTH_REDIRECT_URI", "http://127.0.0.1:8000/auth")
SCOPES = ["profile"]


class User:
    def __init__(self, user_id: str, name: str, username: str) -> None:
        self.id = user_id
        self.name = name
        self.username = username


TEST_USER = User("1", os.environ.get("OAUTH_USER_NAME", "Ada Lovelace"), "ada")


class Client(ClientMixin):
    def __init__(self, client_id: str, client_secret: str, redirect_uri: str) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uri = redirect_uri

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_allowed_scope(self, scope: Optional[str]) -> str:
        if not scope:
            return ""
        return list_to_scope([s for s in scope_to_list(scope) if s in SCOPES])

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri == self.redirect_uri

    def check_client_secret(self, client_secret: str) -> bool:
        return client_secret == self.client_secret

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return endpoint != "token" or method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "authorization_code"


class AuthorizationCode(AuthorizationCodeMixin):
    def __init__(self, code: str, client_id: str, redirect_uri: str, scope: str, user: User) -> None:
        self.code = code
        self.client_id = client_id
        self.redirect_uri = redirect_uri
        self.scope = scope
        self.user = user
        self.expires_at = time.time() + 300

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


class Token(TokenMixin):
    def __init__(self, data: Dict[str, Any], client: Client, user: User) -> None:
        self.access_token = data["access_token"]
        self.scope = data.get("scope", "")
        self.expires_in = int(data.get("expires_in", 3600))
        self.issued_at = time.time()
        self.client = client
        self.user = user

    def check_client(self, client: ClientMixin) -> bool:
        return client.get_client_id() == self.client.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_in

    def is_expired(self) -> bool:
        return time.time() > self.issued_at + self.expires_in

    def is_revoked(self) -> bool:
        return False

    def get_user(self) -> User:
        return self.user

    def get_client(self) -> Client:
        return self.client


_lock = threading.Lock()
CLIENTS = {CLIENT_ID: Client(CLIENT_ID, CLIENT_SECRET, REDIRECT_URI)}
CODES: Dict[str, AuthorizationCode] = {}
TOKENS: Dict[str, Token] = {}


class AuthorizationCodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

    def save_authorization_code(self, code: str, request: Any) -> None:
        item = AuthorizationCode(code, request.client.client_id, request.payload.redirect_uri, request.scope, request.user)
        with _lock:
            CODES[code] = item

    def query_authorization_code(self, code: str, client: Client) -> Optional[AuthorizationCode]:
        with _lock:
            item = CODES.get(code)
        if item is None or item.client_id != client.client_id or item.expires_at < time.time():
            return None
        return item

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        with _lock:
            CODES.pop(authorization_code.code, None)

    def authenticate_user(self, authorization_code: AuthorizationCode) -> User:
        return authorization_code.user


def query_client(client_id: str) -> Optional[Client]:
    return CLIENTS.get(client_id)


def save_token(token: Dict[str, Any], request: Any) -> None:
    with _lock:
        TOKENS[token["access_token"]] = Token(token, request.client, request.user)


class MyBearerTokenValidator(BearerTokenValidator):
    def authenticate_token(self, token_string: str) -> Optional[Token]:
        with _lock:
            return TOKENS.get(token_string)


app = Flask(__name__)
app.config["OAUTH2_TOKEN_EXPIRES_IN"] = {"authorization_code": 3600}
server = AuthorizationServer(app, query_client=query_client, save_token=save_token)
server.register_grant(AuthorizationCodeGrant)
require_oauth = ResourceProtector()
require_oauth.register_token_validator(MyBearerTokenValidator())


@app.route("/health")
def health():
    return "ok"


@app.route("/authorize")
def authorize():
    # A real provider would ask the user to log in and to consent; the test user approves.
    try:
        grant = server.get_consent_grant(end_user=TEST_USER)
    except OAuth2Error as error:
        return jsonify(dict(error.get_body())), error.status_code
    return server.create_authorization_response(grant_user=TEST_USER, grant=grant)


@app.route("/token", methods=["POST"])
def issue_token():
    return server.create_token_response()


@app.route("/userinfo")
@require_oauth("profile")
def userinfo():
    user = current_token.user
    return jsonify(sub=user.id, name=user.name, preferred_username=user.username)
