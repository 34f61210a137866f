"""parano mode: every interaction and push payload is AES-GCM encrypted with a key agreed
per page (ECDH P-256); checked with an independent page-side implementation."""
import base64
import json
import secrets

import pytest
from Crypto.Cipher import AES
from Crypto.Hash import SHA256
from Crypto.Protocol.DH import key_agreement
from Crypto.Protocol.KDF import HKDF
from Crypto.PublicKey import ECC

from asgi_htag.crypto import PageKey
from asgi_htag.exceptions import ProtocolError
from tests.client import Page, recv_json, texts_of


class PageSide:
    """What client.js does, in Python."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.priv = ECC.generate(curve="P-256")
        self.page_id = secrets.token_urlsafe(18)
        self.key = None
        self.seq = 0
        self.seen = set()  # numbers of the frames received

    def hello(self) -> str:
        pub = base64.b64encode(self.priv.public_key().export_key(format="raw")).decode()
        return json.dumps({"hello": pub, "k": self.page_id})

    def agree(self, server_pub: str) -> None:
        peer = ECC.import_key(base64.b64decode(server_pub), curve_name="P-256")
        z = key_agreement(static_priv=self.priv, static_pub=peer, kdf=lambda x: x)
        self.key = HKDF(z, 32, self.token.encode(), SHA256, context=b"asgi_htag parano v1")

    def seal(self, obj, seq=None) -> str:
        self.seq = self.seq + 1 if seq is None else seq
        nonce = secrets.token_bytes(12)
        c = AES.new(self.key, AES.MODE_GCM, nonce=nonce)
        c.update(b"asgi_htag c2s")
        ct, tag = c.encrypt_and_digest(json.dumps({"n": self.seq, "o": obj}).encode())
        return json.dumps({"k": self.page_id, "p": base64.b64encode(nonce + ct + tag).decode()})

    def open(self, msg: dict) -> dict:
        blob = base64.b64decode(msg["p"])
        c = AES.new(self.key, AES.MODE_GCM, nonce=blob[:12])
        c.update(b"asgi_htag s2c")
        m = json.loads(c.decrypt_and_verify(blob[12:-16], blob[-16:]))
        assert m["n"] not in self.seen, "a frame the page received before"
        self.seen.add(m["n"])
        return m["o"]


def test_page_key_round_trip_and_refusals():
    page = PageSide("tok")
    key, server_pub = PageKey.agree(json.loads(page.hello())["hello"], b"tok")
    page.agree(server_pub)
    sealed = key.seal({"update": {"1": "x"}})
    assert page.open({"p": sealed}) == {"update": {"1": "x"}}
    with pytest.raises(AssertionError, match="received before"):
        page.open({"p": sealed})  # what the page does with a replayed frame: numbered 1, 2, ...
    assert page.open({"p": key.seal({"update": {}})}) == {"update": {}} and page.seen == {1, 2}
    frame = json.loads(page.seal({"id": 1, "method": "inc"}))
    assert key.open(frame["p"]) == {"id": 1, "method": "inc"}
    with pytest.raises(ProtocolError, match="replayed"):
        key.open(frame["p"])
    tampered = base64.b64decode(json.loads(page.seal({"id": 1}))["p"])
    tampered = tampered[:-1] + bytes([tampered[-1] ^ 1])
    with pytest.raises(ProtocolError, match="authentication"):
        key.open(base64.b64encode(tampered).decode())
    for junk in ("", "!!!", 12, None, "A" * 10, base64.b64encode(b"x" * 40).decode()):
        with pytest.raises(ProtocolError):
            key.open(junk)
    # a frame sealed for the page cannot be reflected back to the server
    reflected = key.seal({"n": 99, "o": {"id": 1}})
    with pytest.raises(ProtocolError):
        key.open(reflected)
    for bad_pub in ("", "notbase64!", base64.b64encode(b"\x04" + b"\x00" * 64).decode()):
        with pytest.raises(ProtocolError):
            PageKey.agree(bad_pub, b"tok")
    assert "hidden" in repr(key)


@pytest.mark.server
def test_parano_websocket_is_encrypted_end_to_end(server, new_client):
    page = Page(new_client(), "/parano")
    assert page.cfg["parano"] is True
    side = PageSide(page.cfg["token"])
    with page.ws() as ws:
        # nothing in clear is accepted
        ws.send(json.dumps(page.call("inc")))
        assert "encrypted" in recv_json(ws)["message"]
        ws.send(side.hello())
        hello = recv_json(ws)
        assert hello["asgi_htag"] == "hello"
        side.agree(hello["pub"])
        values = []
        for _ in range(3):
            ws.send(side.seal(page.call("inc")))
            raw = ws.recv(timeout=10)
            assert "update" not in raw and "value" not in raw, "the wire carries no clear payload"
            values.append(texts_of(side.open(json.loads(raw)))["value"])
        assert values == ["1", "2", "3"]
        # replay of an old frame is refused and changes nothing
        last = side.seq
        ws.send(side.seal(page.call("inc"), seq=2))
        assert "replayed" in recv_json(ws)["message"]
        side.seq = last
        ws.send(side.seal(page.call("inc")))
        assert texts_of(side.open(recv_json(ws)))["value"] == "4"


@pytest.mark.server
def test_a_page_whose_key_is_in_use_cannot_be_given_another(server, new_client):
    page = Page(new_client(), "/parano")
    side = PageSide(page.cfg["token"])
    with page.ws() as ws:
        ws.send(side.hello())
        side.agree(recv_json(ws)["pub"])
        ws.send(side.seal(page.call("inc")))
        assert texts_of(side.open(recv_json(ws)))["value"] == "1"
        # someone with the cookie and the token (not the page) tries to re-key that page id
        intruder = PageSide(page.cfg["token"])
        intruder.page_id = side.page_id
        ws.send(intruder.hello())
        assert recv_json(ws) == {"asgi_htag": "error", "message": "this page already has a key"}
        ws.send(side.seal(page.call("inc")))
        assert texts_of(side.open(recv_json(ws)))["value"] == "2", "the page's channel still works"


@pytest.mark.server
def test_a_page_may_agree_again_before_it_used_its_key(server, new_client):
    # its socket closed before the hello's answer came: the page sends a new hello on the
    # next socket, with the same page id
    page = Page(new_client(), "/parano")
    first = PageSide(page.cfg["token"])
    with page.ws() as ws:
        ws.send(first.hello())
        recv_json(ws)  # the page never saw it
    side = PageSide(page.cfg["token"])
    side.page_id = first.page_id
    with page.ws() as ws:
        ws.send(side.hello())
        side.agree(recv_json(ws)["pub"])
        ws.send(side.seal(page.call("inc")))
        assert texts_of(side.open(recv_json(ws)))["value"] == "1"


@pytest.mark.server
def test_parano_pushes_are_encrypted(server, new_client):
    page = Page(new_client(), "/parano-pusher")
    side = PageSide(page.cfg["token"])
    with page.ws(resync=False) as ws:
        ws.send(side.hello())
        side.agree(recv_json(ws)["pub"])
        ws.send(side.seal(page.call("start")))
        ticks = set()
        while "3" not in ticks:
            msg = recv_json(ws)
            assert set(msg) == {"p"}
            ticks.add(texts_of(side.open(msg)).get("ticks"))


@pytest.mark.server
def test_parano_http_only(server, new_client):
    page = Page(new_client(), "/parano-http")
    side = PageSide(page.cfg["token"])
    assert "encrypted" in page.post(page.call("inc")).json()["message"]
    r = page.post(None, raw=side.hello().encode())
    side.agree(r.json()["pub"])
    r = page.post(None, raw=side.seal(page.call("inc")).encode())
    assert set(r.json()) == {"p"}
    assert texts_of(side.open(r.json()))["value"] == "1"
    # another page (other key) of the same session cannot use this page's key id
    intruder = PageSide(page.cfg["token"])
    intruder.page_id = side.page_id
    intruder.key = secrets.token_bytes(32)
    assert "refused" in page.post(None, raw=intruder.seal(page.call("inc")).encode()).json()["message"]


@pytest.mark.server
def test_a_connected_parano_page_keeps_its_key_however_many_pages_the_session_opens(server, new_client):
    from websockets.sync.client import connect

    c = new_client()
    a = Page(c, "/parano")
    side = PageSide(a.cfg["token"])
    with connect(f"{a.ws_url()}&k={side.page_id}", additional_headers={"Cookie": a.cookie_header()}) as ws:
        ws.send(side.hello())
        side.agree(recv_json(ws)["pub"])
        ws.send(side.seal(a.call("inc")))
        assert texts_of(side.open(recv_json(ws)))["value"] == "1"
        for _ in range(40):  # reloads and other tabs of the same app: a key each
            b = Page(c, "/parano")
            other = PageSide(b.cfg["token"])
            with connect(f"{b.ws_url()}&k={other.page_id}", additional_headers={"Cookie": b.cookie_header()}) as wb:
                wb.send(other.hello())
                recv_json(wb)
        ws.send(side.seal(a.call("inc")))
        assert texts_of(side.open(recv_json(ws)))["value"] == "2", "the open tab still clicks"
