"""gunicorn worker classes with an explicit event loop (the stock UvicornWorker picks
uvloop when it is installed)."""
from uvicorn.workers import UvicornWorker


class UvloopWorker(UvicornWorker):
    CONFIG_KWARGS = {"loop": "uvloop"}


class AsyncioWorker(UvicornWorker):
    CONFIG_KWARGS = {"loop": "asyncio"}
