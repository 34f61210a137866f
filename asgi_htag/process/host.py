"""The app host: what runs inside each per-session process.

It owns one :class:`htag.render.HRenderer` (so one Tag tree), listens on its own Unix
socket, and answers frames from any worker: ``render``, ``interact`` and ``subscribe``.
``tag.update()`` becomes a ``push`` frame to every subscribed connection.

Guards that live here because only this process knows the page:

* an interaction may only name a (tag id, method) pair that was offered to the page
  (recorded while htag serialized its callers), so ``__init__``, ``_private`` or ``exit``
  never reach ``getattr``;
* each interaction (and the instance creation) runs under a kernel timer: SIGALRM with its
  default action kills the process when ``timeout_interaction`` is exceeded, even if the
  app is stuck in a blocking call that never yields to the event loop;
* the process exits by itself after ``timeout_inactivity`` seconds without interaction.
"""
import asyncio
import gc
import json
import logging
import os
import signal
import time
import traceback
import re
import weakref
from collections import OrderedDict, deque
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

from ..exceptions import FrameTooLarge, ProtocolError
from . import wire

logger = logging.getLogger(__name__)

_PAGE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_MAX_PAGE_KEYS = 32  # keys of pages not connected now (http_only, closed tabs), least recently used go first
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

# tag or generator -> the method names the page has been offered on it. Keyed by the object
# itself, weakly: an offer dies with its object, and a new object that CPython puts at the
# same address (so with the same id, which is what the page sends) inherits nothing. One
# HRenderer per process, so one table per process.
_offered: "weakref.WeakKeyDictionary[Any, Set[Optional[str]]]" = weakref.WeakKeyDictionary()
_patched = False


class _LogOnlyJson:
    """Stands in for ``json`` inside ``htag.render``, which uses it only to format INFO log
    lines (among them an indented dump of every response, made by the slow pure-Python
    encoder) whether or not INFO is logged: skip that work when nobody reads it."""

    def __init__(self, logger_: logging.Logger) -> None:
        self._logger = logger_

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        if not self._logger.isEnabledFor(logging.INFO):
            return "..."
        return json.dumps(obj, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(json, name)


# tag name -> the class ``Tag.<name>`` gives in this process (see share_tag_classes)
_TAG_CLASSES: Dict[str, type] = {}
_TAG_CLASSES_MAX = 256  # names kept at most; past that, htag's own way: a new class each time


def share_tag_classes() -> None:
    """Make ``Tag.<name>`` give one class per name, made once per process, instead of a new
    one at every use.

    htag 1 builds a new class for each ``Tag.div``, ``Tag.span``... (its metaclass's
    ``__getattr__``: a ``type()`` with a copy of Tag's class dict): about 10 us each, for
    every tag an app writes and for the six htag's own page render writes (html, head,
    meta, title). In a session process, forked from the fork server, each of those copies
    also takes a reference to every value in Tag's dict, and so writes to (so copies) the
    pages the fork server's objects sit on. Made once in the fork server and shared, the
    classes spare each process those copies: about 0.2 MB (see the README).

    What a class is made of does not change: htag's own builder makes it, from Tag's
    dict as it is then. Only sharing is new, and what sharing could change is kept as
    htag has it:

    * a class statement's base (``class Card(Tag.div)``) is never a shared class: it gets
      a class of its own, made then, as in htag. So a component inherits nothing set on a
      shared class, and htag's statics (collected by walking Tag's subclasses in the
      order they were made) keep their order, and so the CSS cascade its result;
    * setting or deleting an attribute of ``Tag`` drops every shared class (the next ones
      see the change), and one set on a shared class drops that class (``Tag.<name>``
      then gives a new one, as in htag).

    What differs: ``isinstance(t, Tag.div)`` is true of the tags made with
    ``Tag.div(...)``, and an attribute set on a class taken from ``Tag.div`` reaches the
    tags already made from it. Names starting with "_" (lookups of special names) and
    names past the first 256 are not shared.
    """
    import htag.tag as ht

    creator = ht.TagCreator
    if getattr(creator, "_asgi_htag_shared", False):
        return
    build = creator.__getattr__
    classes = _TAG_CLASSES

    def shared_class(cls: type, name: str) -> type:
        made = classes.get(name)
        if made is None:
            made = build(cls, name)
            if not name.startswith("_") and len(classes) < _TAG_CLASSES_MAX:
                classes[name] = made
        return made

    def is_shared(cls: Any) -> bool:
        name = cls.__dict__.get("tag") if isinstance(cls, type) else None
        return isinstance(name, str) and classes.get(name) is cls

    def new_class(mcls: type, name: str, bases: Tuple[type, ...], namespace: Dict[str, Any], **kwargs: Any) -> type:
        if any(is_shared(b) for b in bases):  # a base of its own, made now, as htag gives
            bases = tuple(build(ht.Tag, b.__dict__["tag"]) if is_shared(b) else b for b in bases)
        return type.__new__(mcls, name, bases, namespace, **kwargs)  # type: ignore[call-overload,no-any-return]

    def forget(cls: type) -> None:
        if cls is ht.Tag:
            classes.clear()
        elif is_shared(cls):
            del classes[cls.__dict__["tag"]]

    def setattr_(cls: type, name: str, value: Any) -> None:
        forget(cls)
        type.__setattr__(cls, name, value)

    def delattr_(cls: type, name: str) -> None:
        forget(cls)
        type.__delattr__(cls, name)

    creator.__getattr__ = shared_class  # type: ignore[assignment]
    creator.__new__ = new_class  # type: ignore[assignment]
    creator.__setattr__ = setattr_  # type: ignore[assignment]
    creator.__delattr__ = delattr_  # type: ignore[assignment]
    type.__setattr__(creator, "_asgi_htag_shared", True)


def install_offer_recorder() -> None:
    """Wrap htag's ``BaseCaller.__str__``: every caller that htag writes into the page (an
    ``interact({...})`` call) records which (id, method) the page may call back. Also keep
    htag.render from formatting log lines nobody reads (see :class:`_LogOnlyJson`), and
    share htag's tag classes (see :func:`share_tag_classes`)."""
    global _patched
    if _patched:
        return
    import htag.render
    from htag.tag import BaseCaller

    share_tag_classes()

    htag.render.json = _LogOnlyJson(logging.getLogger("htag.render"))  # type: ignore[attr-defined]

    original = BaseCaller.__str__

    def recording_str(self: Any) -> str:
        try:
            offers = _offered.get(self.instance)
            if offers is None:
                offers = _offered[self.instance] = set()
            offers.add(self.mname)
        except TypeError:  # an object that takes no weak reference (htag offers tags and generators)
            pass
        return original(self)

    BaseCaller.__str__ = recording_str  # type: ignore[method-assign]
    _patched = True


_SCALARS = frozenset((str, int, float, bool, type(None)))
_UNSERIALIZABLE = "\x00unserializable"


class SyncedSession(dict):  # type: ignore[type-arg]
    """The session dict handed to the HRenderer (and so to ``tag.state`` / ``tag.session``).

    The web worker sends the store's content (with every POST, and over a websocket when
    the store changed); the changes the app makes are returned as a diff the worker applies
    to the store. The *same* dict object lives for the whole process because htag's
    TagState keeps a reference to it.

    What was last synced is kept per key as ``(type, value)`` for immutable scalars, which
    are compared as they are, and ``(None, json text)`` for the rest (an app may mutate a
    list or dict in place), so a click on a session of scalars dumps nothing.
    """

    def __init__(self, initial: Dict[str, Any]) -> None:
        super().__init__(initial)
        self._baseline: Dict[str, Tuple[Optional[type], Any]] = {k: self._snap(k, v) for k, v in initial.items()}

    @staticmethod
    def _dump(key: str, value: Any) -> str:
        try:
            return _dumps(value)
        except (TypeError, ValueError):
            logger.error("session key %r holds a value that is not JSON serializable; it is not saved", key)
            return _UNSERIALIZABLE

    @classmethod
    def _snap(cls, key: str, value: Any) -> Tuple[Optional[type], Any]:
        t = type(value)
        if t in _SCALARS:
            return t, value
        return None, cls._dump(key, value)

    def _diff(self) -> Tuple[Dict[str, Any], List[str], Dict[str, Tuple[Optional[type], Any]]]:
        """``(changed, deleted, the baseline entries of the changed keys)``."""
        changed: Dict[str, Any] = {}
        snaps: Dict[str, Tuple[Optional[type], Any]] = {}
        baseline = self._baseline
        for k, v in self.items():
            base = baseline.get(k)
            t = type(v)
            if t in _SCALARS:
                if base is not None and base[0] is t:
                    # floats by repr, as JSON sees them: NaN is NaN, -0.0 is not 0.0
                    if base[1] == v if t is not float else repr(base[1]) == repr(v):
                        continue
                changed[k] = v
                snaps[k] = (t, v)
                continue
            dumped = self._dump(k, v)
            if dumped == _UNSERIALIZABLE:
                continue
            if base is None or base[0] is not None or base[1] != dumped:
                changed[k] = json.loads(dumped)  # a copy: later in-place edits show in the next diff
                snaps[k] = (None, dumped)
        deleted = [k for k in baseline if k not in self]
        return changed, deleted, snaps

    def sync(self, snapshot: Dict[str, Any]) -> None:
        """Take the store's view, keeping local changes not yet sent."""
        changed, deleted, _ = self._diff()
        dict.clear(self)
        dict.update(self, snapshot)
        self._baseline = {k: self._snap(k, v) for k, v in snapshot.items()}
        dict.update(self, changed)
        for k in deleted:
            dict.pop(self, k, None)

    def take_diff(self) -> Optional[Dict[str, Any]]:
        """The changes since the last sync/take, as ``{"set": {...}, "del": [...]}``."""
        if not self and not self._baseline:
            return None
        changed, deleted, snaps = self._diff()
        if not changed and not deleted:
            return None
        self._baseline.update(snaps)
        for k in deleted:
            self._baseline.pop(k, None)
        return {"set": changed, "del": deleted}


_DEBUG_STATICS_JS = """
window.error=function(txt){
  var d=document.getElementById("asgi-htag-error");
  if(!d){d=document.createElement("div");d.id="asgi-htag-error";
    d.setAttribute("style","z-index:2147483647;position:fixed;top:10px;left:10px;right:10px;max-height:80vh;overflow:auto;background:#c00;color:#fff;padding:8px;font:12px monospace;white-space:pre-wrap");
    d.onclick=function(){d.remove()};document.body.appendChild(d);}
  d.textContent=txt;
};
"""


class AppHost:
    """One htag instance and the connections that talk to it."""

    def __init__(self, spec: Dict[str, Any], tag_class: type, client_js: str) -> None:
        from htag import Tag
        from htag.render import HRenderer

        opts = spec["opts"]
        self.key: str = spec["key"]
        self.token: str = spec["token"]
        self.http_only: bool = bool(opts.get("http_only"))
        self.debug: bool = bool(opts.get("debug"))
        self.timeout_interaction: float = float(opts.get("timeout_interaction") or 0)
        self.timeout_inactivity: float = float(opts.get("timeout_inactivity") or 0)
        self.timeout_abandoned: float = float(opts.get("timeout_abandoned") or 0)
        self.contacted = False  # its page opened its websocket or sent an interaction
        self.busy = -1  # the file descriptor of its busy mark, once serve() has made it
        self.max_frame_bytes: int = int(opts.get("max_frame_bytes") or wire.DEFAULT_MAX_FRAME_BYTES)
        self.session = SyncedSession(spec.get("session") or {})
        # subscribed connection -> the page id it speaks for (parano keys are per page)
        self.subscribers: Dict["_Peer", Optional[str]] = {}
        self.parano: bool = bool(opts.get("parano"))
        self.keys: "OrderedDict[str, Any]" = OrderedDict()
        self.lock = asyncio.Lock()
        self.stopping = asyncio.Event()
        self._inactivity_handle: Optional[asyncio.TimerHandle] = None
        self._last_touch = 0.0
        self._bye_reason = "exit"
        self.collector = Collector()

        args, kargs = spec["init"]
        statics = [Tag.script(_DEBUG_STATICS_JS)] if self.debug else []
        self._arm_alarm()
        try:
            self.hr = HRenderer(
                tag_class,
                client_js,
                exit_callback=self._exit_from_app,
                init=(tuple(args), dict(kargs)),
                fullerror=self.debug,
                statics=statics,
                session=self.session,
            )
        finally:
            self._disarm_alarm()
        if not isinstance(self.hr.tag, tag_class):
            # htag caught the app's exception (and logged it) and made a page of its own,
            # ``init error : <its text>``, unescaped: a query string a link sets would put
            # markup in the site's pages. The process does not start; the worker shows its
            # own page, with the text escaped and only under debug.
            raise AppInitError(_cut(_init_error_text(self.hr.tag), 2000))
        self.hr.sendactions = self._sendactions

    # --- timers -------------------------------------------------------------------------
    def _arm_alarm(self) -> None:
        if self.timeout_interaction > 0:
            signal.setitimer(signal.ITIMER_REAL, self.timeout_interaction)
        if self.busy >= 0:
            os.pwrite(self.busy, wire.BUSY.pack(time.monotonic()), 0)

    def _disarm_alarm(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if self.busy >= 0:
            os.pwrite(self.busy, _NOT_BUSY, 0)

    def open_busy_mark(self, path: str) -> None:
        """Open the busy mark (see :data:`wire.BUSY`) that the timer's arming updates (a
        write to an open file: no mapping, whose page would count in each process's memory)."""
        try:
            self.busy = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.pwrite(self.busy, _FRESH_MARK, 0)  # not busy, no contact yet, never rendered
        except OSError as exc:  # the watchdog then falls back on its deadline alone
            logger.warning("process %s: no busy mark at %s: %s", os.getpid(), path, exc)

    def mark_contacted(self) -> None:
        """The page made contact: said once in the busy mark, where the fork server looks
        when it needs room (it ends the oldest process whose page never did)."""
        if self.contacted:
            return
        self.contacted = True
        if self.busy >= 0:
            try:
                os.pwrite(self.busy, wire.CONTACTED, wire.CONTACT_OFFSET)
            except OSError:
                pass

    def touch(self) -> None:
        """An interaction happened: push the inactivity deadline back. Only a timestamp per
        interaction; the one timer re-arms itself when it finds the deadline moved."""
        if self.timeout_inactivity <= 0:
            return
        loop = asyncio.get_running_loop()
        self._last_touch = loop.time()
        if self._inactivity_handle is None:
            self._inactivity_handle = loop.call_at(self._last_touch + self.timeout_inactivity, self._check_inactive)

    def _check_inactive(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = self._last_touch + self.timeout_inactivity
        if self.lock.locked():  # an interaction (or a render) is running: not inactive
            deadline = max(deadline, loop.time() + self.timeout_inactivity)
        if deadline - loop.time() > 0.001:  # moved since armed (a timer may fire a tick early)
            self._inactivity_handle = loop.call_at(deadline, self._check_inactive)
            return
        self._inactivity_handle = None
        self._inactive()

    def await_contact(self) -> None:
        """Exit if the page never makes contact (see timeout_abandoned): what rendered it
        runs no JavaScript (a crawler, a link preview)."""
        if self.timeout_abandoned > 0:
            asyncio.get_running_loop().call_later(self.timeout_abandoned, self._check_contact)

    def _check_contact(self) -> None:
        if self.contacted or self.subscribers or self.lock.locked():
            return
        logger.info("process %s for %s exits: its page made no contact in %ss", os.getpid(), self.key[:8], self.timeout_abandoned)
        self._bye_reason = "abandoned"
        self.stopping.set()

    def _inactive(self) -> None:
        logger.info("process %s for %s exits after %ss without interaction", os.getpid(), self.key[:8], self.timeout_inactivity)
        self._bye_reason = "inactivity"
        self.stopping.set()

    def _exit_from_app(self) -> None:
        logger.info("process %s for %s exits: the app called exit()", os.getpid(), self.key[:8])
        self._bye_reason = "exit"
        self.stopping.set()

    # --- pushes -------------------------------------------------------------------------
    async def _sendactions(self, actions: Dict[str, Any]) -> bool:
        if self.http_only or not self.subscribers:
            return False
        meta: Dict[str, Any] = {"t": "push", "diff": self.session.take_diff()}
        plain: Optional[bytes] = None
        delivered = False
        for peer, page in list(self.subscribers.items()):
            try:
                if self.parano:
                    key = self.keys.get(page or "")
                    if key is None:
                        continue  # this page has not agreed a key yet: it gets nothing in clear
                    data = wire.encode(meta, self.max_frame_bytes, raw=_json_bytes({"p": key.seal(actions)}))
                else:
                    if plain is None:
                        plain = wire.encode(meta, self.max_frame_bytes, raw=_json_bytes(actions))
                    data = plain
            except FrameTooLarge as exc:  # update() returns False: nothing was delivered
                logger.error("process %s: a push not sent: %s", os.getpid(), exc)
                return False
            try:
                peer.write(data)
                await peer.drain()
                delivered = True
            except (ConnectionError, RuntimeError):
                self.subscribers.pop(peer, None)
        return delivered

    async def say_bye(self) -> None:
        data = wire.encode({"t": "bye", "reason": self._bye_reason})
        for peer in list(self.subscribers):
            try:
                peer.write(data)
                await peer.drain()
            except (ConnectionError, RuntimeError):
                pass

    # --- requests -----------------------------------------------------------------------
    def _check_offered(self, data: Dict[str, Any]) -> Optional[str]:
        oid = data.get("id")
        method = data.get("method")
        if not isinstance(oid, int) or isinstance(oid, bool):
            return "interaction refused: 'id' must be an integer"
        if method is not None and not isinstance(method, str):
            return "interaction refused: 'method' must be a string or null"
        kargs = data.get("kargs", {})
        if not isinstance(data.get("args", []), list) or not isinstance(kargs, dict):
            return "interaction refused: 'args' must be a list and 'kargs' an object"
        if kargs and not all(0 < len(k) <= _MAX_NAME and k.isprintable() for k in kargs):
            # names the app gave its binds; htag would print (and echo) anything else whole
            return "interaction refused: a 'kargs' name is empty, too long or not printable"
        event = data.get("event")
        if event is not None and not isinstance(event, dict):
            return "interaction refused: 'event' must be an object"
        from htag import Tag

        target: Any = Tag.find_tag(oid)  # what htag's interact will call: a tag, else a generator
        holder = target
        if target is None:
            running = self.hr._loop.get(oid) if isinstance(getattr(self.hr, "_loop", None), dict) else None
            if isinstance(running, dict):
                target, holder = running.get("gen"), running.get("tag")
        if target is None or method not in _offered.get(target, ()):
            return f"interaction refused: the page offers no method {_shown(method)} on element {_shown(oid)}"
        if isinstance(holder, Tag) and not _on_page(holder, self.hr.tag):
            # removed from the page since it was offered (a row replaced, a button taken
            # away): the page no longer shows it, so it is not the page's to call
            return f"interaction refused: element {_shown(oid)} is no longer on the page"
        if method in ("__on__", "__on_event__"):
            args = data.get("args") or []
            obj = Tag.find_tag(oid)
            if obj is None or not args or not isinstance(args[0], str) or args[0] not in obj._callbacks_:
                return "interaction refused: unknown callback"
        elif method is not None and method.startswith("_"):
            return f"interaction refused: {_shown(method)} is private"
        return None

    async def render(self, frame: Dict[str, Any]) -> Dict[str, Any]:
        async with self.lock:
            if frame.get("session") is not None:
                self.session.sync(frame["session"])
            self.touch()
            _offered.clear()  # a full render re-offers everything the page now holds
            if not self.contacted and self.busy >= 0:
                # a page handed out (again): the fork server, full, leaves this process
                # alone until that page has had its time to make contact
                try:
                    os.pwrite(self.busy, wire.RENDERED.pack(time.monotonic()), wire.RENDERED_OFFSET)
                except OSError:
                    pass
            self._arm_alarm()  # the app's render() runs here: it gets the time an interaction gets
            try:
                html = str(self.hr)
            finally:
                self._disarm_alarm()
            return {"t": "html", "html": html, "diff": self.session.take_diff()}

    async def interact(self, data: Dict[str, Any], session: Optional[Dict[str, Any]]) -> Tuple[Dict[str, Any], Any]:
        """Run one (already decoded) interaction: ``(actions, session diff)``."""
        if not self.contacted:
            self.mark_contacted()
        refusal = self._check_offered(data)
        if refusal:
            logger.warning("process %s: %s", os.getpid(), refusal)
            return {"err": refusal}, None
        async with self.lock:
            if session is not None:
                self.session.sync(session)
            self.touch()
            self._arm_alarm()
            try:
                actions = await self.hr.interact(
                    data["id"], data.get("method"), data.get("args") or [], data.get("kargs") or {}, data.get("event")
                )
            finally:
                self._disarm_alarm()
                self.touch()  # inactivity counts from an interaction's end, not its start
            if "err" in actions and not self.debug:
                # htag sends the exception's text (str(e)); what it may hold (paths, data,
                # queries) is for the log, where htag wrote it with its traceback
                actions = {**actions, "err": _APP_FAILED}
            return actions, self.session.take_diff()

    def resync_actions(self) -> Dict[str, Any]:
        """Actions that redraw the whole body: sent to a page that reconnects, so that the
        pushes it missed while disconnected are not lost. Under the interaction timer: it
        runs the app's render()."""
        self._arm_alarm()
        try:
            return self.hr._mkReponse([self.hr.tag])
        finally:
            self._disarm_alarm()

    async def serve_peer(self, peer: "_Peer") -> None:
        """Answer one connection's frames in order, until it ends or breaks the protocol."""
        frames = peer.frames
        try:
            while True:
                while not frames:
                    if peer.eof:
                        return
                    await peer.readable()
                payload = frames.popleft()
                if payload is None:
                    logger.warning("process %s: dropping a connection that broke the protocol: %s", os.getpid(), peer.error)
                    return
                peer.release(len(payload))
                try:
                    frame, raw = wire.split_payload(payload)
                except ProtocolError as exc:
                    logger.warning("process %s: dropping a connection that broke the protocol: %s", os.getpid(), exc)
                    return
                reply, out = await self._dispatch(frame, raw, peer)
                if reply is not None:
                    try:
                        data = wire.encode(reply, self.max_frame_bytes, raw=out)
                    except FrameTooLarge as exc:  # the app's answer: the page is told, the process lives on
                        logger.error("process %s: %s", os.getpid(), exc)
                        reply, out = _page_error(f"the application's answer is too large to send ({exc})")
                        data = wire.encode(reply, self.max_frame_bytes, raw=out)
                    peer.write(data)
                    if gc.isenabled():
                        self.collector.after_answer()
                    await peer.drain()
        except (ConnectionError, OSError):
            return
        except asyncio.CancelledError:
            return  # the process is stopping; nothing is waiting for this task's result
        finally:
            self.subscribers.pop(peer, None)
            peer.close()

    def _hello(self, obj: Dict[str, Any], peer: "_Peer") -> Tuple[Dict[str, Any], bytes]:
        from ..crypto import PageKey

        if not self.parano:
            return _page_error("this app is not in parano mode")
        page = obj.get("k")
        if not isinstance(page, str) or not _PAGE_ID_RE.match(page):
            return _page_error("invalid page id")
        known = self.keys.get(page)
        if known is not None and known.last_seq > 0:
            # a page agrees on one key (again only if its socket went before the answer
            # came, so before it used the key): a second agreement for a page whose key is
            # in use comes from someone else, who would break that page's channel
            logger.warning("process %s: refused a second key agreement for a page in use", os.getpid())
            return _page_error("this page already has a key")
        try:
            key, pub = PageKey.agree(obj.get("hello"), self.token.encode())  # type: ignore[arg-type]
        except ProtocolError as exc:
            return _page_error(str(exc))
        self.keys[page] = key
        self.keys.move_to_end(page)
        if peer in self.subscribers:
            self.subscribers[peer] = page
        if len(self.keys) > _MAX_PAGE_KEYS:
            # least recently used first, but never the key of a page connected right now
            live = set(self.subscribers.values())
            for old in [p for p in self.keys if p not in live][: len(self.keys) - _MAX_PAGE_KEYS]:
                del self.keys[old]
        return {"t": "hello"}, _json_bytes({"asgi_htag": "hello", "pub": pub})

    async def _interact_frame(
        self, frame: Dict[str, Any], raw: Optional[bytes], peer: "_Peer"
    ) -> Tuple[Dict[str, Any], bytes]:
        """What the page sent (``raw``, passed through untouched by the worker) -> the
        frame for the worker and the bytes for the page."""
        try:
            obj = wire.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError) as exc:
            return _page_error(f"interaction is not valid JSON: {_cut(str(exc))}", 400)
        if not isinstance(obj, dict):
            return _page_error("interaction must be a JSON object", 400)
        session = frame.get("session")
        if "contact" in obj:  # an http_only page says it is open (over a websocket, subscribing does)
            self.mark_contacted()
            return {"t": "actions", "diff": None}, b"{}"
        if "hello" in obj:
            self.mark_contacted()
            return self._hello(obj, peer)
        if "p" in obj:
            if not self.parano:
                return _page_error("this app does not take encrypted interactions", 400)
            page = obj.get("k") if isinstance(obj.get("k"), str) else ""
            key = self.keys.get(page)  # type: ignore[arg-type]
            if key is None:
                return _page_error("no key agreed for this page; reload it")
            self.keys.move_to_end(page)  # type: ignore[arg-type]
            try:
                data = key.open(obj["p"])
            except ProtocolError as exc:
                logger.warning("process %s: refused an encrypted interaction: %s", os.getpid(), exc)
                return _page_error(f"interaction refused: {exc}")
            actions, diff = await self.interact(data, session)
            return {"t": "actions", "diff": diff}, _json_bytes({"p": key.seal(actions)})
        if self.parano:
            return _page_error("interaction refused: this app only takes encrypted interactions", 400)
        if "id" not in obj or "method" not in obj:
            return _page_error("interaction needs 'id' and 'method'", 400)
        actions, diff = await self.interact(obj, session)
        return {"t": "actions", "diff": diff}, _json_bytes(actions)

    async def _dispatch(
        self, frame: Dict[str, Any], raw: Optional[bytes], peer: "_Peer"
    ) -> Tuple[Optional[Dict[str, Any]], Optional[bytes]]:
        t = frame.get("t")
        if frame.get("token") != self.token:
            return {"t": "gone"}, None
        try:
            if t == "interact":
                return await self._interact_frame(frame, raw, peer)
            if t == "render":
                return await self.render(frame), None
            if t == "subscribe":
                if self.http_only:
                    return {"t": "error", "message": "this app is served in http_only mode"}, None
                page = frame.get("k") if isinstance(frame.get("k"), str) else None
                self.subscribers[peer] = page
                self.mark_contacted()
                reply: Dict[str, Any] = {
                    "t": "subscribed",
                    "timeout_interaction": self.timeout_interaction,
                    "pid": os.getpid(),
                }
                out: Optional[bytes] = None
                if frame.get("session") is not None:
                    async with self.lock:
                        self.session.sync(frame["session"])
                if frame.get("resync"):
                    async with self.lock:
                        actions = self.resync_actions()
                    if not self.parano:
                        out = _json_bytes(actions)
                    elif page in self.keys:
                        out = _json_bytes({"p": self.keys[page].seal(actions)})  # type: ignore[index]
                return reply, out
            if t == "ping":
                return {"t": "pong", "pid": os.getpid()}, None
            return {"t": "error", "message": f"unknown frame type {_shown(t)}"}, None
        except Exception as exc:  # the app's bug must not take the process down
            logger.exception("process %s: error while handling %r", os.getpid(), t)
            msg = traceback.format_exc() if self.debug else f"{_APP_FAILED} ({type(exc).__name__})"
            return _page_error(msg)


class Collector:
    """The garbage collection a session process runs after each answer.

    htag leaves reference cycles behind every interaction (its Stater): a young-generation
    collection right after the answer is on its way frees them, and the next click reuses
    their memory instead of piling it up until the collector's turn. But that collection
    also resets the counts that start CPython's own collections, so a click that allocates
    fewer objects than the first threshold (700) would never get to a full one, and what an
    app drops after it has lived through a click (the rows it replaces, with their cycles)
    would stay for the life of the process. So the full collection is run here, by CPython's
    own rule: once the oldest generation's count passes its threshold (10 young collections)
    and the objects moved into it since the last full collection exceed a quarter of those
    it held then (estimated from the young generation's count before each collection, less
    what that collection freed).
    """

    __slots__ = ("pending", "total", "full_collections")

    def __init__(self) -> None:
        self.pending = 0  # objects moved to the oldest generation since the last full collection (estimate)
        self.total = -1  # objects in the oldest generation after the last full collection (-1: not counted yet)
        self.full_collections = 0

    def after_answer(self) -> None:
        young = gc.get_count()[0]
        found = gc.collect(1)
        if young > found:
            self.pending += young - found
        if gc.get_count()[2] <= gc.get_threshold()[2]:
            return
        if self.total < 0:
            self.total = len(gc.get_objects(2))
        if self.pending > self.total // 4:
            gc.collect()
            self.full_collections += 1
            self.total = len(gc.get_objects(2))
            self.pending = 0


def _on_page(tag: Any, body: Any) -> bool:
    """Whether ``tag`` is in the tree under ``body`` (htag unsets ``_parent`` when it
    removes a child)."""
    for _ in range(100_000):  # bounded: a parent chain an app made circular
        if tag is body:
            return True
        tag = getattr(tag, "_parent", None)
        if tag is None:
            return False
    return False


class AppInitError(Exception):
    """The app's constructor raised: its text (htag logged the traceback)."""


def _init_error_text(tag: Any) -> str:
    """The text of htag's stand-in page for an app whose constructor raised."""
    text = "".join(c for c in getattr(tag, "childs", ()) if isinstance(c, str))
    prefix = "init error : "
    return "the app's constructor raised: " + (text[len(prefix):] if text.startswith(prefix) else text)


class _Peer(wire.FlowProtocol):
    """One connection from a worker. Whole frames are cut from what arrives and queued for
    the connection's one task (:meth:`AppHost.serve_peer`), which answers them in order: no
    StreamReader, no read call per header and per payload. Reading pauses while more than
    ``PAUSE_ABOVE`` bytes of frames wait (see :class:`wire.FlowProtocol`). Also what a
    subscriber is for pushes: ``write``, ``drain`` and ``close``, as on a StreamWriter."""

    def __init__(self, host: AppHost) -> None:
        super().__init__()
        self.host = host
        self.incoming = wire.FrameBuffer(host.max_frame_bytes)
        self.frames: "Deque[Optional[bytes]]" = deque()  # None: the protocol was broken here
        self.error: Optional[ProtocolError] = None
        self.task: "Optional[asyncio.Task[None]]" = None  # held here: the loop keeps tasks only weakly

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.task = asyncio.get_running_loop().create_task(self.host.serve_peer(self))

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        self.incoming.feed(data)
        size = 0
        try:
            payload = self.incoming.next_payload()
            while payload is not None:
                self.frames.append(payload)
                size += len(payload)
                payload = self.incoming.next_payload()
        except ProtocolError as exc:  # refused before the payload is buffered
            self.error = exc
            self.frames.append(None)
            self.incoming.clear()
        self._hold(size)

    def eof_received(self) -> bool:
        super().eof_received()
        return True  # keep the transport open: the frames already queued still get answers

    def write(self, data: bytes) -> None:
        if self.lost or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the worker closed the connection")
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


_NOT_BUSY = wire.BUSY.pack(0.0)
_FRESH_MARK = _NOT_BUSY + b"\x00" + wire.RENDERED.pack(0.0)
_APP_FAILED = "the application failed; the server's log has the details"
_MAX_NAME = 256


def _cut(text: str, limit: int = 120) -> str:
    """``text`` for a message (a log line, an error the page shows), cut to ``limit``
    characters: what a client sends may be a megabyte long."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown(value: Any) -> str:
    return _cut(repr(value), 80)


def _json_bytes(obj: Any) -> bytes:
    return _dumps(obj).encode()


def _page_error(message: str, status: int = 200) -> Tuple[Dict[str, Any], bytes]:
    """An error for the page (a control message it shows), and the HTTP status for POSTs."""
    return {"t": "error", "status": status}, _json_bytes({"asgi_htag": "error", "message": message})


async def serve(spec: Dict[str, Any], tag_class: type, client_js: str, ready_fd: int, life_fd: int = -1) -> None:
    """Create the instance, listen on ``spec["sock_path"]``, report READY on ``ready_fd``,
    and serve until inactivity, ``exit()``, SIGTERM, or EOF on ``life_fd`` (the fork
    server is gone)."""
    install_offer_recorder()
    host = AppHost(spec, tag_class, client_js)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, host.stopping.set)
    if life_fd >= 0:

        def fork_server_gone() -> None:  # EOF: the one writer is gone (or it went meanwhile)
            loop.remove_reader(life_fd)
            logger.info("process %s exits: its fork server is gone", os.getpid())
            host.stopping.set()

        loop.add_reader(life_fd, fork_server_gone)

    path = spec["sock_path"]
    host.open_busy_mark(wire.busy_path(path))  # before the socket: a worker may look at it
    tmp = f"{path}.{os.getpid()}.t"
    server = await loop.create_unix_server(lambda: _Peer(host), path=tmp)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)  # atomic: a worker never connects to a half-made socket
    os.write(ready_fd, (json.dumps({"ok": True, "pid": os.getpid()}) + "\n").encode())
    os.close(ready_fd)
    inode = os.stat(path).st_ino
    host.touch()
    host.await_contact()
    try:
        await host.stopping.wait()
        await host.say_bye()
    finally:
        server.close()
        try:
            # unlink only our own socket (and mark): a replacement process may own the name
            if os.stat(path).st_ino == inode:
                os.unlink(path)
                os.unlink(wire.busy_path(path))
        except OSError:
            pass


async def warm_up(tag_class: type, sock_path: str, clicks: int = 64) -> None:
    """Run, once, what every session process runs per frame: an :class:`AppHost` of
    ``tag_class`` (a tag with a ``noop`` method on its root, offered by its render)
    answering a render, a subscribe, ``clicks`` interactions (some changing the session)
    and a ping over a Unix socket. The fork server calls it before it forks: the code it
    runs is then specialised in pages every child shares, where each child would otherwise
    specialise (so write, so copy) them for itself on its first clicks."""
    install_offer_recorder()
    spec = {"key": "warm", "token": "warm", "opts": {}, "init": [[], {}], "session": {"n": 0}}
    host = AppHost(spec, tag_class, "")
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(lambda: _Peer(host), path=sock_path)
    writer: Optional[asyncio.StreamWriter] = None
    try:
        reader, writer = await asyncio.open_unix_connection(sock_path)

        async def exchange(obj: Dict[str, Any], raw: Optional[bytes] = None) -> Tuple[Dict[str, Any], Optional[bytes]]:
            assert writer is not None
            writer.write(wire.encode(obj, raw=raw))
            await writer.drain()
            header = await reader.readexactly(wire.HEADER_SIZE)
            return wire.split_payload(await reader.readexactly(wire.decode_length(header)))

        await exchange({"t": "render", "token": "warm", "session": {"n": 0}})
        await exchange({"t": "subscribe", "token": "warm", "resync": True, "k": None, "session": {"n": 0}})
        click = _json_bytes({"id": id(host.hr.tag), "method": "noop", "args": [], "kargs": {}, "event": {}})
        for i in range(clicks):
            session = {"n": i} if i % 8 == 0 else None
            await exchange({"t": "interact", "token": "warm", "session": session}, click)
        await exchange({"t": "ping", "token": "warm"})
    finally:
        if writer is not None:
            writer.close()
        server.close()
        await server.wait_closed()
        _offered.clear()
        try:
            os.unlink(sock_path)
        except FileNotFoundError:
            pass  # Python 3.13+ removes a Unix server's socket file on close


__all__ = ("AppHost", "Collector", "SyncedSession", "serve", "warm_up", "install_offer_recorder")
