"""An HtagASGI with its own settings mounted inside a Runner: its pages talk to its own
/ui/_htag/ routes, not to the Runner's."""
import os

from starlette.routing import Mount

from asgi_htag import HtagASGI, Runner
from tests import apps

ui = HtagASGI(apps.Counter, runtime_dir=os.environ["ASGI_HTAG_RUNTIME_DIR"] + "/ui", zygote_grace_seconds=1)
app = Runner(apps.Counter, zygote_grace_seconds=1, routes=[Mount("/ui", ui)])
