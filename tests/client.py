"""A small protocol-level client for the tests: what a browser does, with httpx and a real
websocket client, so that tests can assert exact frames."""
import html as htmlmod
import json
import re
from html.parser import HTMLParser
from typing import Any, Dict, Optional

import httpx
from websockets.sync.client import connect

CFG_RE = re.compile(r"var cfg = (\{.*?\});")


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Dict[str, Dict[str, Any]] = {}
        self.texts: Dict[str, str] = {}
        self._stack: list = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        name = a.get("data-test")
        if name and a.get("onclick"):
            code = a["onclick"]
            m = re.search(r"interact\( (\{.*\}) \)", code)
            if m:
                self.calls[name] = json.loads(m.group(1).replace("jevent(event)", "{}"))
        self._stack.append(name)
        if name:
            self.texts.setdefault(name, "")

    def handle_endtag(self, tag: str) -> None:
        if self._stack:
            self._stack.pop()

    def handle_data(self, data: str) -> None:
        for name in self._stack:
            if name:
                self.texts[name] = self.texts.get(name, "") + data


def parse(fragment: str) -> _Elements:
    p = _Elements()
    p.feed(fragment)
    return p


def texts_of(actions: Dict[str, Any]) -> Dict[str, str]:
    """data-test -> text for everything an actions frame (re)renders."""
    out: Dict[str, str] = {}
    for frag in (actions.get("update") or {}).values():
        out.update(parse(frag).texts)
    return out


class Page:
    """One loaded page of one session (httpx client = the session's cookie jar)."""

    def __init__(self, client: httpx.Client, path: str) -> None:
        self.client = client
        self.response = client.get(path)
        self.status = self.response.status_code
        self.html = self.response.text
        m = CFG_RE.search(self.html)
        self.cfg: Dict[str, Any] = json.loads(m.group(1)) if m else {}
        els = parse(self.html)
        self.calls = els.calls
        self.texts = els.texts

    def cookie_header(self) -> str:
        return "; ".join(f"{c.name}={c.value}" for c in self.client.cookies.jar)

    def ws_url(self, resync: bool = False) -> str:
        base = str(self.client.base_url).replace("http://", "ws://").rstrip("/")
        return f"{base}{self.cfg['ws']}?t={self.cfg['token']}" + ("&resync=1" if resync else "")

    def ws(self, *, resync: bool = False, origin: Optional[str] = None, cookie: Optional[str] = None):
        headers = {"Cookie": self.cookie_header() if cookie is None else cookie}
        if origin is not None:
            headers["Origin"] = origin
        return connect(self.ws_url(resync), additional_headers=headers, open_timeout=10, max_size=2**24)

    def call(self, name: str) -> Dict[str, Any]:
        return dict(self.calls[name])

    def post(self, payload: Any, *, origin: Optional[str] = None, raw: Optional[bytes] = None) -> httpx.Response:
        headers = {"content-type": "application/json"}
        if origin is not None:
            headers["Origin"] = origin
        body = raw if raw is not None else json.dumps(payload).encode()
        return self.client.post(f"{self.cfg['post']}?t={self.cfg['token']}", content=body, headers=headers)


def recv_json(ws, timeout: float = 10) -> Dict[str, Any]:
    return json.loads(ws.recv(timeout=timeout))


def unescape(s: str) -> str:
    return htmlmod.unescape(s)


def sel(name: str) -> str:
    """The CSS selector of an element the test apps mark with data-test."""
    return f"[data-test={name}]"
