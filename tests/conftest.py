"""Real servers and a real browser for the tests.

Servers are started as subprocesses (uvicorn or gunicorn) on 127.0.0.1 with a free port,
each with its own state and runtime directories, and are stopped (and checked for leftover
processes) at the end of the test.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
LOOPS = ["asyncio", "uvloop"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_in_runtime(runtime_dir: Path) -> List[int]:
    """PIDs of live processes whose command line or environment names this runtime dir
    (the zygote gets it in argv; its children are forks of it)."""
    found = []
    needle = str(runtime_dir).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            env = Path(f"/proc/{entry}/environ").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if stat.split(") ")[-1].startswith("Z"):
            continue
        if needle in cmd or needle in env:
            found.append(int(entry))
    return found


class Server:
    """A real server in a subprocess. ``kind`` is "uvicorn", "gunicorn" or "hypercorn"
    (hypercorn's trio worker: the whole ASGI side runs on trio)."""

    def __init__(self, target: str, *, kind: str = "uvicorn", loop: str = "asyncio", workers: int = 1,
                 env: Optional[Dict[str, str]] = None, extra: Optional[List[str]] = None) -> None:
        self.target = target
        self.kind = kind
        self.loop = loop
        self.workers = workers
        self.port = free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix="ah-"))
        self.state_dir = self.tmp / "state"
        self.runtime_dir = self.tmp / "run"
        self.env = dict(os.environ)
        self.env.update({
            "ASGI_HTAG_STATE_DIR": str(self.state_dir),
            "ASGI_HTAG_RUNTIME_DIR": str(self.runtime_dir),
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        })
        self.env.update(env or {})
        self.extra = extra or []
        self.proc: Optional[subprocess.Popen] = None
        self._stdout = None
        self._pump_thread: Optional[threading.Thread] = None
        self.lines: List[str] = []
        self._started = threading.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def command(self) -> List[str]:
        if self.kind == "gunicorn":
            worker = "tests.servers.uvloop_worker.AsyncioWorker" if self.loop == "asyncio" else "tests.servers.uvloop_worker.UvloopWorker"
            return [sys.executable, "-m", "gunicorn", "-w", str(self.workers), "-k", worker,
                    "-b", f"127.0.0.1:{self.port}", "--graceful-timeout", "5", *self.extra, self.target]
        if self.kind == "hypercorn":
            return [sys.executable, "-m", "hypercorn", "--worker-class", "trio", "--workers", str(self.workers),
                    "--bind", f"127.0.0.1:{self.port}", "--graceful-timeout", "5", *self.extra, self.target]
        cmd = [sys.executable, "-m", "uvicorn", self.target, "--host", "127.0.0.1", "--port", str(self.port),
               "--loop", self.loop, "--log-level", "info"]
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
        return cmd + self.extra

    def start(self, timeout: float = 60) -> "Server":
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._stdout = self.proc.stdout
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        deadline = time.monotonic() + timeout
        # uvicorn and gunicorn's uvicorn workers log the end of the lifespan startup;
        # hypercorn logs only that it is running, after its lifespan startup
        ready = "Running on" if self.kind == "hypercorn" else "Application startup complete"
        self.wait_for_log(ready, count=1 if self.kind == "hypercorn" else self.workers, timeout=timeout)
        # a single uvicorn logs the lifespan startup before it binds its socket: wait until
        # the port really accepts connections
        self._wait_listening(deadline)
        return self

    def _wait_listening(self, deadline: float) -> None:
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or (self.proc is not None and self.proc.poll() is not None):
                    raise AssertionError(f"server never listened on {self.port}:\n" + self.log()[-4000:])
                time.sleep(0.02)

    def _pump(self) -> None:
        stream = self._stdout
        assert stream is not None
        for line in stream:
            with self._started:
                self.lines.append(line.rstrip("\n"))
                self._started.notify_all()
        with self._started:
            self._started.notify_all()

    def wait_for_log(self, text: str, *, count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self._started:
            while sum(text in line for line in self.lines) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc is not None and self.proc.poll() is not None):
                    raise AssertionError(f"server never logged {text!r} x{count}:\n" + "\n".join(self.lines[-60:]))
                self._started.wait(remaining)

    def log(self) -> str:
        with self._started:
            return "\n".join(self.lines)

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def wait_no_processes(self, timeout: float = 20) -> List[int]:
        """Wait (bounded) until no process of this server remains; return what is left."""
        deadline = time.monotonic() + timeout
        left = pids_in_runtime(self.runtime_dir)
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = pids_in_runtime(self.runtime_dir)
        return left

    def cleanup(self) -> None:
        self.stop()
        for pid in pids_in_runtime(self.runtime_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._pump_thread is not None:
            self._pump_thread.join(10)
        if self._stdout is not None:
            self._stdout.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def make_server() -> Iterator:
    servers: List[Server] = []

    def factory(target: str = "tests.servers.runner_app:app", **kw) -> Server:
        server = Server(target, **kw)
        servers.append(server)
        return server.start()

    yield factory
    leftovers = {}
    for server in servers:
        server.stop()
        left = server.wait_no_processes()
        if left:
            leftovers[server.target] = left
        server.cleanup()
    assert not leftovers, f"processes left after the server stopped: {leftovers}"


@pytest.fixture(params=LOOPS)
def loop(request) -> str:
    return request.param


def pytest_collection_modifyitems(config, items):
    # Playwright's sync API keeps an event loop running in the main thread while a browser
    # is open; run the browser tests last so that other tests can use anyio.run freely.
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    p = context.new_page()
    p.set_default_timeout(15000)
    yield p
    context.close()


@pytest.fixture(scope="module", params=LOOPS + ["trio"])
def server(request) -> Iterator[Server]:
    """The test Runner (tests/servers/runner_app.py) under uvicorn, once per event loop,
    and under hypercorn's trio worker."""
    if request.param == "trio":
        s = Server("tests.servers.runner_app:app", kind="hypercorn").start()
    else:
        s = Server("tests.servers.runner_app:app", loop=request.param).start()
    yield s
    s.stop()
    left = s.wait_no_processes()
    s.cleanup()
    assert not left, f"processes left after the server stopped: {left}"


@pytest.fixture
def http_clients():
    """A factory of httpx clients (each one a separate browser session), closed at the end."""
    import httpx

    clients = []

    def factory(base_url: str, **kwargs) -> "httpx.Client":
        c = httpx.Client(base_url=base_url, timeout=30, **kwargs)
        clients.append(c)
        return c

    yield factory
    for c in clients:
        c.close()


@pytest.fixture
def new_client(server, http_clients):
    """Clients of the module's test server."""
    return lambda base_url=None: http_clients(base_url or server.url)
