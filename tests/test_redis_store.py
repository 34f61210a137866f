"""RedisStore against a real redis-server started by the test (Debian's redis-server)."""
import json
import shutil
import subprocess

import anyio
import httpx
import pytest

from asgi_htag.redis_store import RedisStore
from tests.client import Page, recv_json
from tests.conftest import free_port

REDIS = shutil.which("redis-server")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    if REDIS is None:
        pytest.fail("redis-server not found: apt-get install -y redis-server")
    port = free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(d)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # bounded by the server's own start-up
        if "Ready to accept connections" in line:
            break
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)
    proc.stdout.close()


def test_store_semantics(redis_url):
    async def main():
        a, b = RedisStore(redis_url), RedisStore(redis_url)  # two workers / hosts
        try:
            assert await a.load("s1") is None
            assert await a.apply("s1", {}, []) == {}
            assert await b.load("s1") == {}, "an empty session exists"
            await a.apply("s1", {"x": 1, "l": [1, 2]}, [])
            await b.apply("s1", {"y": {"z": True}}, ["l"])
            assert await a.load("s1") == {"x": 1, "y": {"z": True}}
            with pytest.raises(TypeError, match="'bad'"):
                await a.apply("s1", {"bad": object()}, [])
            assert await a.load("s1") == {"x": 1, "y": {"z": True}}, "a refused change changes nothing"
            assert await b.apply_existing("s1", {"w": "1"}, ["x"]) == {"y": {"z": True}, "w": "1"}
            await a.delete("s1")
            assert await b.load("s1") is None
            assert await b.apply_existing("s1", {"w": "2"}, []) is None, "a deleted session stays deleted"
            assert await a.load("s1") is None
            short = RedisStore(redis_url, max_age_seconds=0.2)
            await short.apply("s2", {"k": "v"}, [])
            for _ in range(100):  # Redis expires it by itself
                if await short.load("s2") is None:
                    break
                await anyio.sleep(0.05)
            assert await short.load("s2") is None
            await short.close()
            # a new session's shorter first lifetime, then the full one once touched
            await a.apply("s3", {"k": "v"}, [], lifetime=0.3)
            await a.apply("s4", {"k": "v"}, [], lifetime=0.3)
            await a.touch("s4")  # its browser came back
            assert 0 < await a._redis().pttl(a._key("s3")) <= 300
            assert await a._redis().pttl(a._key("s4")) > 300_000
            for _ in range(100):
                if await a.load("s3") is None:
                    break
                await anyio.sleep(0.05)
            assert await a.load("s3") is None and await a.load("s4") == {"k": "v"}
            await a.apply("s5", {}, [], lifetime=10**9)  # never past max_age
            assert await a._redis().pttl(a._key("s5")) <= a.max_age_seconds * 1000
            assert "redis://" not in repr(a)
        finally:
            await a.close()
            await b.close()

    anyio.run(main)


@pytest.mark.server
def test_runner_sessions_in_redis(make_server, redis_url):
    srv = make_server(kind="gunicorn", workers=2, env={"TEST_REDIS_URL": redis_url, "TEST_ZYGOTE_GRACE": "3"})
    with httpx.Client(base_url=srv.url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as c:
        c.get("/set?v=in-redis")
        page = Page(c, "/state")
        assert page.texts["from-route"] == "'in-redis'"
        with page.ws() as ws:
            ws.send(json.dumps(page.call("write")))
            recv_json(ws)
        assert c.get("/get").json()["from_app"] == "written-by-app"
    # and the data really is in Redis, not in the SQLite file
    assert not (srv.state_dir / "sessions.sqlite3").exists()


def test_redis_store_under_trio_says_it_needs_asyncio():
    from asgi_htag.exceptions import ConfigurationError

    store = RedisStore("redis://127.0.0.1:1/0")  # never reached: refused before connecting

    async def use():
        await store.load("x" * 32)

    with pytest.raises(ConfigurationError, match="asyncio"):
        anyio.run(use, backend="trio")
