"""A Runner serving tests/noisy_app.py by name, so that the fork server imports it at start."""
from asgi_htag import Runner

app = Runner("tests.noisy_app:Noisy", zygote_grace_seconds=1)
