"""The errors asgi_htag raises. Every one derives from :class:`HtagError`."""


class HtagError(Exception):
    """Base class of every asgi_htag error."""


class ConfigurationError(HtagError):
    """A setting is missing, malformed or out of range."""


class StoreUnavailable(ConfigurationError):
    """The session store cannot be opened (its directory, disk or database): a setting at
    start-up, a 503 for the request that meets it at run time."""


class ProtocolError(HtagError):
    """A frame broke the wire protocol (bad length, bad JSON, wrong shape)."""


class FrameTooLarge(ProtocolError):
    """A frame is larger than the configured ``max_frame_bytes``."""


class ProcessStartError(HtagError):
    """A per-session process (or the fork server) could not be started. ``kind`` says why:
    ``"import"`` (the app could not be imported), ``"timeout"`` (it did not start in
    time) or ``"crash"`` (anything else)."""

    def __init__(self, message: str, kind: str = "crash") -> None:
        super().__init__(message)
        self.kind = kind


class ProcessGone(HtagError):
    """The per-session process does not exist (any more)."""


class PoolFull(HtagError):
    """The host already runs ``max_processes`` per-session processes."""


__all__ = (
    "HtagError",
    "ConfigurationError",
    "StoreUnavailable",
    "ProtocolError",
    "FrameTooLarge",
    "ProcessStartError",
    "ProcessGone",
    "PoolFull",
)
