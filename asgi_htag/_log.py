"""The worker side's last-resort log handler.

A library usually attaches a ``NullHandler`` and leaves logging to the application. But
``uvicorn app:app`` configures only uvicorn's own loggers: the warnings and errors of the
web worker (a refused foreign Origin, a 503 because the host runs ``max_processes``, a
stuck process killed) would then go nowhere, while those of the fork server and of the
session processes reach stderr. :class:`FallbackHandler` writes them to stderr in the
same format, until the application configures logging itself.
"""
import logging
import sys
from typing import Optional

_FORMAT = "%(asctime)s asgi_htag[%(process)d] %(levelname)s %(name)s: %(message)s"


class FallbackHandler(logging.Handler):
    """WARNING and above to the current ``sys.stderr``, unless another handler is on the
    record's way up (its logger's, ``asgi_htag``'s or the root logger's): then that one
    decides, and nothing is written twice."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter(_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        # any other handler on the record's way up (its own logger, asgi_htag's, root's)
        # means the application set logging up: it decides, nothing is written twice
        logger: Optional[logging.Logger] = logging.getLogger(record.name)
        while logger is not None:
            if any(h is not self for h in logger.handlers):
                return
            if not logger.propagate:
                break
            logger = logger.parent
        try:
            stream = sys.stderr
            if stream is None:  # pythonw, or a daemon that closed it
                return
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            # nowhere to write (stderr closed, a broken pipe): a last resort says nothing
            # rather than raise into the request that logged (handleError would write to
            # that same stderr)
            pass


__all__ = ("FallbackHandler",)
