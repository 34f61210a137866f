"""The package's shape: the core works without Starlette, the code parses on the oldest
Python the package declares, and __init__ exports stay small."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import asgi_htag

PKG = Path(asgi_htag.__file__).parent


@pytest.mark.parametrize("path", sorted(p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py")))
def test_parses_on_python_3_9(path):
    ast.parse((PKG / path).read_text(), filename=path, feature_version=(3, 9))


def test_core_does_not_import_starlette_or_uvicorn():
    code = (
        "import sys, asgi_htag, asgi_htag.app, asgi_htag.sessions, asgi_htag.crypto, "
        "asgi_htag.process.pool, asgi_htag.process.host, asgi_htag.process.zygote;"
        "bad=[m for m in ('starlette','uvicorn','fastapi') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_exports_are_deliberate():
    assert asgi_htag.__all__ == (
        "__version__", "HtagASGI", "Runner", "SessionMiddleware", "SQLiteStore", "MemoryStore", "HtagError",
    )
    from asgi_htag import Runner
    from starlette.applications import Starlette

    assert issubclass(Runner, Starlette)


def test_no_print_in_the_library():
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
        assert not calls, f"print() in {path}"
