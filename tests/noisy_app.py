"""An app module that prints while it is imported, as app modules and libraries do: the fork
server imports it before it tells the worker it is ready."""
from htag import Tag

print("noisy_app: a print while the module is imported")


class Noisy(Tag.body):
    def init(self):
        print("noisy_app: a print while an instance starts")
        self <= Tag.span("ok", _data_test="ok")
