"""An app whose module forks a helper process when it is imported, as an app that starts a
``multiprocessing.Pool()`` at import does (used by tests/test_process.py). The helper's pid
goes to the file named by ASGI_HTAG_TEST_HELPER_PIDFILE."""
import os
import time

from htag import Tag

_helper = os.fork()
if _helper == 0:  # the helper: sleeps a while, touches nothing
    try:
        time.sleep(30)
    finally:
        os._exit(0)
with open(os.environ["ASGI_HTAG_TEST_HELPER_PIDFILE"], "w") as f:
    f.write(str(_helper))


class App(Tag.body):
    def init(self):
        self <= Tag.span("forked a helper at import")
