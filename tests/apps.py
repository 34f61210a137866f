"""htag apps used by the tests (module level, so per-session processes can import them)."""
import asyncio
import os
import time
import weakref

from htag import Tag


class Counter(Tag.body):
    def init(self):
        self.count = 0
        self.button = Tag.button("+1", _onclick=self.bind.inc(), _data_test="inc")
        self.value = Tag.span("0", _data_test="value")
        self.pid = Tag.span(str(os.getpid()), _data_test="pid")
        self <= self.button
        self <= self.value
        self <= self.pid

    def inc(self):
        self.count += 1
        self.value.clear(str(self.count))

    def never_offered(self):
        """A public method no element binds: a client must not be able to call it."""
        self.value.clear("HIJACKED")


class Pusher(Tag.body):
    """Updates itself from a background task with tag.update()."""

    def init(self):
        self.ticks = Tag.span("0", _data_test="ticks")
        self.result = Tag.span("", _data_test="update-result")
        self <= Tag.button("start", _onclick=self.bind.start(), _data_test="start")
        self <= self.ticks
        self <= self.result
        self._task = None

    def start(self):
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self):
        for i in range(1, 4):
            await asyncio.sleep(0.05)
            self.ticks.clear(str(i))
            ok = await self.ticks.update()
            self.result.clear(str(ok))
            await self.result.update()


class Query(Tag.body):
    """Shows how the query string built it."""

    def init(self, *args, **kargs):
        self <= Tag.div(repr(args), _data_test="args")
        self <= Tag.div(repr(sorted(kargs.items())), _data_test="kargs")
        self.count = 0
        self.value = Tag.span("0", _data_test="value")
        self <= Tag.button("+1", _onclick=self.bind.inc(), _data_test="inc")
        self <= self.value

    def inc(self):
        self.count += 1
        self.value.clear(str(self.count))


class State(Tag.body):
    """Reads and writes the session, the one a route sees as request.session."""

    def init(self):
        self.shown = Tag.span(repr(self.session.get("from_route")), _data_test="from-route")
        self <= self.shown
        self <= Tag.button("read", _onclick=self.bind.read(), _data_test="read")
        self <= Tag.button("write", _onclick=self.bind.write(), _data_test="write")
        self <= Tag.button("state", _onclick=self.bind.use_state(), _data_test="state")
        self.statev = Tag.span(str(self.state.get("clicks", 0)), _data_test="statev")
        self <= self.statev

    def read(self):
        self.shown.clear(repr(self.session.get("from_route")))

    def write(self):
        self.session["from_app"] = "written-by-app"

    def use_state(self):
        self.state["clicks"] = self.state.get("clicks", 0) + 1
        self.statev.clear(str(self.state["clicks"]))


class Slow(Tag.body):
    """An interaction that blocks far longer than timeout_interaction."""

    def init(self):
        self <= Tag.button("slow", _onclick=self.bind.slow(), _data_test="slow")
        self <= Tag.button("+1", _onclick=self.bind.inc(), _data_test="inc")
        self.value = Tag.span("0", _data_test="value")
        self <= self.value
        self.count = 0

    def slow(self):
        time.sleep(30)

    def inc(self):
        self.count += 1
        self.value.clear(str(self.count))


class Crashy(Tag.body):
    def init(self):
        self <= Tag.button("boom", _onclick=self.bind.boom(), _data_test="boom")
        self <= Tag.button("ok", _onclick=self.bind.ok(), _data_test="ok")
        self.n = Tag.span("0", _data_test="n")
        self <= self.n

    def boom(self):
        raise ValueError("boom in the app")

    def ok(self):
        self.n.clear(str(int(self.n.childs[0]) + 1))


class _Row(Tag.div):
    made = 0
    freed = 0

    def init(self, text):
        self <= text
        _Row.made += 1
        weakref.finalize(self, _Row._freed)

    @staticmethod
    def _freed():
        _Row.freed += 1


class Replacer(Tag.body):
    """Each click replaces its 20 rows (with their parent/child cycles, after they have
    lived through a click) and shows how many rows this process still holds."""

    def init(self):
        self.alive = Tag.span("0", _data_test="alive")
        self <= Tag.button("replace", _onclick=self.bind.replace(), _data_test="replace")
        self <= self.alive
        self.rows = Tag.div()
        self <= self.rows
        self.replace()

    def replace(self):
        self.rows.clear()
        for i in range(20):
            self.rows <= _Row(str(i))
        self.alive.clear(str(_Row.made - _Row.freed))


class _OwnedRow(Tag.div):
    def init(self, app, owner, n, deletable):
        self.app, self.owner, self.n = app, owner, n
        self <= f"{owner}:{n}"
        if deletable:  # only the user's own rows get a delete button
            self <= Tag.button("del", _onclick=self.bind.delete(), _data_test=f"del-{n}")

    def delete(self):
        self.app.deleted.add(Tag.li(f"{self.owner}:{self.n}"))


class Rows(Tag.body):
    """The user's rows (with delete buttons) or someone else's (without); the rows taken
    off the page are kept (an app caching them), so they stay alive, detached."""

    def init(self):
        self.kept = []
        self.listing = Tag.div()
        self.deleted = Tag.ul(_data_test="deleted")
        self <= Tag.button("mine", _onclick=self.bind.mine(), _data_test="mine")
        self <= Tag.button("others", _onclick=self.bind.others(), _data_test="others")
        self <= self.listing
        self <= self.deleted
        self.mine()

    def _show(self, owner, deletable):
        self.kept.extend(self.listing.childs)
        self.listing.clear()
        for n in range(3):
            self.listing <= _OwnedRow(self, owner, n, deletable)

    def mine(self):
        self._show("me", True)

    def others(self):
        self._show("bob", False)


class BadInit(Tag.body):
    """Its constructor raises with the query string's value in the message, as
    ``int(age)`` does: htag would show that text as markup."""

    def init(self, age="1"):
        self <= Tag.span(str(int(age)), _data_test="age")


class SlowInit(Tag.body):
    """Its creation blocks far longer than timeout_interaction."""

    def init(self):
        time.sleep(30)


class Ticker(Tag.body):
    """Pushes an update every 50 ms, forever, once started."""

    def init(self):
        self.ticks = Tag.span("0", _data_test="ticks")
        self <= Tag.button("start", _onclick=self.bind.start(), _data_test="start")
        self <= self.ticks
        self._n = 0
        self._task = None

    def start(self):
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self):
        while True:
            await asyncio.sleep(0.05)
            self._n += 1
            self.ticks.clear(str(self._n))
            await self.ticks.update()


class Stuck(Tag.body):
    """An interaction that blocks SIGALRM and then hangs: only the worker's backstop can
    end it."""

    def init(self):
        self <= Tag.button("stuck", _onclick=self.bind.stuck(), _data_test="stuck")

    def stuck(self):
        import signal

        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)


class LoopName(Tag.body):
    """Shows which event loop its process runs on (the process_loop setting)."""

    def init(self):
        import asyncio

        self <= Tag.span(type(asyncio.get_running_loop()).__module__, _data_test="loop")


class Quitter(Tag.body):
    """Calls exit(), and its process then lingers a moment after it has closed its socket
    (a task that is slow to cancel): the window in which the process is leaving but the
    fork server still counts it."""

    def init(self):
        self <= Tag.button("quit", _onclick=self.bind.quit(), _data_test="quit")
        self <= Tag.span(str(os.getpid()), _data_test="pid")

    def quit(self):
        import asyncio

        async def linger():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await asyncio.sleep(1.5)  # the process's shutdown waits for it
                raise

        self._linger = asyncio.ensure_future(linger())
        self.exit()


class Lingerer(Tag.body):
    """Whatever ends its process (SIGTERM included), the end lingers 1.5 s: a task started
    at creation is slow to cancel."""

    def init(self):
        import asyncio

        async def linger():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await asyncio.sleep(1.5)
                raise

        self._linger = asyncio.ensure_future(linger())
        self <= Tag.span(str(os.getpid()), _data_test="pid")


class Holder(Tag.body):
    """Each click holds the process for as long as the page's query asks (``/holder?1.5``,
    at most 10 s): interactions that stay in flight for a known while."""

    def init(self, seconds="1"):
        self.seconds = min(float(seconds), 10.0)
        self <= Tag.button("hold", _onclick=self.bind.hold(), _data_test="hold")
        self.done = Tag.span("0", _data_test="done")
        self <= self.done
        self.count = 0

    def hold(self):
        time.sleep(self.seconds)
        self.count += 1
        self.done.clear(str(self.count))


class Napper(Tag.body):
    """An interaction that takes a moment (well under any timeout): concurrent clicks
    keep several connections to the process busy at once."""

    def init(self):
        self <= Tag.button("nap", _onclick=self.bind.nap(), _data_test="nap")
        self.naps = Tag.span("0", _data_test="naps")
        self <= self.naps
        self <= Tag.span(str(os.getpid()), _data_test="pid")
        self.count = 0

    nap_seconds = 0.2

    def nap(self):
        time.sleep(self.nap_seconds)
        self.count += 1
        self.naps.clear(str(self.count))


class SlowStart(Tag.body):
    """Its creation takes 1 s (well under timeout_interaction)."""

    def init(self):
        time.sleep(1)
        self <= Tag.span("ok", _data_test="ok")


class Progress(Tag.body):
    """The usual progress bar: an async handler that pushes as it goes, for about 1.5 s."""

    def init(self):
        self.v = Tag.span("0", _data_test="v")
        self <= Tag.button("run", _onclick=self.bind.run(), _data_test="run")
        self <= self.v

    async def run(self):
        for i in range(1, 16):
            self.v.clear(str(i))
            await self.v.update()
            await asyncio.sleep(0.1)


class BadRender(Tag.body):
    """Once "break" is clicked its render() fails: so does every resync after a reconnect."""

    def init(self):
        self.broken = False
        self <= Tag.button("break", _onclick=self.bind.brk(), _data_test="brk")

    def brk(self):
        self.broken = True

    def render(self):
        if self.broken:
            raise RuntimeError("render fails in this state")


class Sleeper(Tag.body):
    """An async interaction that takes 2 s (awaiting, as a slow API call does)."""

    def init(self):
        self <= Tag.button("sleep", _onclick=self.bind.sleep(), _data_test="sleep")
        self.done = Tag.span("0", _data_test="done")
        self <= self.done

    async def sleep(self):
        await asyncio.sleep(2)
        self.done.clear("1")


class Flash(Tag.body):
    """Shows the session's "from_route" once and removes it (a one-shot message), then counts."""

    def init(self):
        self <= Tag.span(repr(self.session.pop("from_route", None)), _data_test="flash")
        self.value = Tag.span("0", _data_test="value")
        self <= Tag.button("+1", _onclick=self.bind.inc(), _data_test="inc")
        self <= self.value

    def inc(self):
        self.value.clear(str(int(self.value.childs[0]) + 1))


class SlowRender(Tag.body):
    """Its render() blocks from the second render on (a slow query in a dynamic render)."""

    def init(self):
        self.n = 0

    def render(self):
        self.clear()
        self.n += 1
        if self.n > 1:
            time.sleep(3600)
        self <= Tag.span(str(self.n), _data_test="n")
        self <= Tag.span(str(os.getpid()), _data_test="pid")


class LongNap(Napper):
    """A blocking interaction of 0.8 s: legal under timeout_interaction=1."""

    nap_seconds = 0.8


class Huge(Tag.body):
    """Answers and pushes larger than a frame to the worker may be (16 MiB)."""

    def init(self):
        self <= Tag.button("big", _onclick=self.bind.big(), _data_test="big")
        self <= Tag.button("bigpush", _onclick=self.bind.bigpush(), _data_test="bigpush")
        self <= Tag.button("small", _onclick=self.bind.small(), _data_test="small")
        self.out = Tag.span("", _data_test="out")
        self.pushed = Tag.span("", _data_test="pushed")
        self <= self.out
        self <= self.pushed

    def big(self):
        self.out.clear("x" * (17 * 1024 * 1024))

    async def bigpush(self):
        self.out.clear("y" * (17 * 1024 * 1024))
        ok = await self.out.update()
        self.out.clear("")
        self.pushed.clear(str(ok))

    def small(self):
        self.out.clear("small")


class BackgroundBlock(Tag.body):
    """'arm' answers at once, then a callback blocks the loop for 30 s: no interaction runs,
    so no interaction timer is armed; only the worker's backstop can end it."""

    def init(self):
        self <= Tag.button("arm", _onclick=self.bind.arm(), _data_test="arm")
        self <= Tag.button("+1", _onclick=self.bind.inc(), _data_test="inc")
        self.value = Tag.span("0", _data_test="value")
        self <= self.value
        self <= Tag.span(str(os.getpid()), _data_test="pid")

    def arm(self):
        asyncio.get_running_loop().call_later(0.2, time.sleep, 30)

    def inc(self):
        self.value.clear("1")


class Lister(Tag.body):
    """Adds a row per click, and shows how many classes its rows have: htag makes a new
    class for every ``Tag.li``; a session process shares one per name."""

    def init(self):
        self.items = Tag.ul(_data_test="items")
        self.kinds = Tag.span("0", _data_test="kinds")
        self <= Tag.button("more", _onclick=self.bind.more(), _data_test="more")
        self <= self.items
        self <= self.kinds

    def more(self):
        self.items <= Tag.li(str(len(self.items.childs) + 1))
        self.kinds.clear(str(len({type(c) for c in self.items.childs})))
