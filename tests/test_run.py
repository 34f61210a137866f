"""What a user does first: a script with ``Runner(App).run()``, started with ``python``; and
what they do next: edit the app and see new sessions run the new code."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import pytest

from tests.client import Page, recv_json, texts_of
from tests.conftest import ROOT, free_port, pids_in_runtime

pytestmark = pytest.mark.server

SCRIPT = """
from htag import Tag
from asgi_htag import Runner


class App(Tag.body):
    def init(self, name="world"):
        self <= Tag.h1("{greeting} " + name, _data_test="hello")
        self.value = Tag.span("0", _data_test="value")
        self <= Tag.button("+1", _onclick=self.bind.inc(), _data_test="inc")
        self <= self.value

    def inc(self):
        self.value.clear(str(int(self.value.childs[0]) + 1))


app = Runner(App, host="127.0.0.1", port={port}, zygote_grace_seconds=1)

if __name__ == "__main__":
    app.run()
"""


@pytest.fixture
def script_server(tmp_path):
    port = free_port()
    short = Path(tempfile.mkdtemp(prefix="ahr-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), ASGI_HTAG_STATE_DIR=str(tmp_path / "state"),
               ASGI_HTAG_RUNTIME_DIR=str(short / "run"))
    script = tmp_path / "myapp.py"
    script.write_text(SCRIPT.format(greeting="Hello", port=port))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    started = threading.Event()
    lines = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            if "Uvicorn running on" in line:  # logged once the socket listens
                started.set()
        started.set()

    threading.Thread(target=pump, daemon=True).start()
    assert started.wait(60) and proc.poll() is None, "".join(lines)
    yield script, f"http://127.0.0.1:{port}", short / "run"
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    proc.wait(30)
    proc.stdout.close()
    leftovers = pids_in_runtime(short / "run")
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(short, ignore_errors=True)
    assert not leftovers, "Ctrl-C on the script left processes behind"


def test_runner_run_serves_an_app_defined_in_the_script(script_server):
    script, url, _ = script_server
    with httpx.Client(base_url=url, timeout=30) as c:
        page = Page(c, "/?Ada")
        assert page.texts["hello"] == "Hello Ada"
        with page.ws() as ws:
            for expected in ("1", "2"):
                ws.send(json.dumps(page.call("inc")))
                assert texts_of(recv_json(ws))["value"] == expected


def test_editing_the_app_file_gives_new_sessions_the_new_code(script_server):
    script, url, _ = script_server
    with httpx.Client(base_url=url, timeout=30) as c:
        assert Page(c, "/").texts["hello"] == "Hello world"
    text = script.read_text().replace('"Hello " + name', '"Bonjour " + name')
    script.write_text(text)
    os.utime(script, ns=(os.stat(script).st_atime_ns, os.stat(script).st_mtime_ns + 10**9))
    with httpx.Client(base_url=url, timeout=30) as c:
        page = Page(c, "/")
        assert page.status == 200 and page.texts["hello"] == "Bonjour world"


def test_an_app_module_that_prints_while_imported_does_not_break_the_start(make_server):
    srv = make_server("tests.servers.noisy:app")
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        page = Page(c, "/")
        assert page.texts["ok"] == "ok"
    srv.wait_for_log("noisy_app: a print while the module is imported")
    srv.wait_for_log("noisy_app: a print while an instance starts")
