"""The per-session process world: the wire protocol, the fork server (zygote), the app host
that runs inside each per-session process, and the worker-side pool that reaches them."""
