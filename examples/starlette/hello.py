"""A counter served by asgi_htag: `python examples/starlette/hello.py`, then open
http://127.0.0.1:8000 (several browsers get several independent counters)."""
from htag import Tag

from asgi_htag import Runner


class App(Tag.body):
    def init(self, name: str = "world"):
        self.count = 0
        self <= Tag.h1(f"Hello {name}")
        self.button = Tag.button("+1", _onclick=self.bind.inc(), _data_test="inc")
        self.value = Tag.span("0", _data_test="value")
        self <= self.button
        self <= self.value

    def inc(self):
        self.count += 1
        self.value.clear(str(self.count))


app = Runner(App, host="127.0.0.1", port=8000)

if __name__ == "__main__":
    app.run()
