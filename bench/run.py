#!/usr/bin/env python
"""asgi_htag benchmark: every figure measured on this machine, in one run, next to its floor.

    python bench/run.py              # full run (a few minutes)
    python bench/run.py --quick      # smoke run (under a minute; 10 and 100 sessions)
    python bench/run.py --json PATH  # where the JSON goes (default bench/results/latest.json)
    python bench/run.py --loop asyncio

See bench/README.md for what each figure means and how the floors are measured. This
script prints; it asserts nothing about durations and is not part of the test suite.
"""
import argparse
import asyncio
import html as htmlmod
import json
import logging
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

import httpx
from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.apps (the Counter) for floor (a)

log = logging.getLogger("bench")

FULL = dict(
    cold=50, warmup_renders=5, ws_warmup=300, ws_clicks=2000, http_warmup=200, posts=1000, rt_rounds=10,
    hol_rounds=3, hol_burst=50, hol_baseline=300, tp_levels=(1, 10, 50), tp_seconds=6.0, tp_warmup=1.0, tp_rounds=6,
    mem_levels=(10, 100, 1000), mem_used_clicks=500, floor_a=3000, floor_b=5000, floor_d_seconds=2.0,
)
QUICK = dict(
    cold=10, warmup_renders=2, ws_warmup=50, ws_clicks=300, http_warmup=30, posts=200, rt_rounds=4,
    hol_rounds=1, hol_burst=20, hol_baseline=100, tp_levels=(1, 10, 50), tp_seconds=1.5, tp_warmup=0.3, tp_rounds=2,
    mem_levels=(10, 100), mem_used_clicks=100, floor_a=500, floor_b=1000, floor_d_seconds=0.5,
)

# targets (issue #4)
RT_TARGET = 1.3  # asgi_htag round trip <= 1.3 x (in-process runner round trip + raw Unix round trip)
COLD_TARGET = 5.0  # cold first render <= 5 x warm render
HOL_TARGET = 3.0  # worst click while new sessions start <= 3 x median click
TP_TARGET = 0.8  # throughput with 10 and 50 sessions >= 0.8 x in-process runner's
USS_TARGET_MB = 4.0  # unique memory per idle session
HELD_TARGET = 1000  # live sessions held at once, every one answering

CFG_RE = re.compile(r"var cfg = (\{.*?\});")
INTERACT_RE = re.compile(r"interact\( (\{.*?\}) \)")
LOG_ISSUE_RE = re.compile(r"Traceback|ERROR|CRITICAL|WARNING|Exception|Error:", re.I)


# --- statistics ---------------------------------------------------------------------------
def pct(xs: List[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def summary(xs: List[float]) -> Dict[str, Any]:
    """Durations in seconds -> a dict in milliseconds."""
    if not xs:
        return {"n": 0}
    return {
        "n": len(xs),
        "median_ms": statistics.median(xs) * 1e3,
        "p99_ms": pct(xs, 99) * 1e3,
        "max_ms": max(xs) * 1e3,
        "mean_ms": statistics.fmean(xs) * 1e3,
    }


# --- processes and memory -----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_of(pid: int) -> Dict[str, float]:
    """USS (Private_Clean + Private_Dirty), PSS and RSS of a process, in MB."""
    fields: Dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return {"uss_mb": uss / 1024, "pss_mb": fields.get("Pss", 0) / 1024, "rss_mb": fields.get("Rss", 0) / 1024}


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pids_naming(needle: str) -> List[int]:
    """Live (non-zombie) processes whose command line or environment holds ``needle``."""
    found = []
    raw = needle.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            env = Path(f"/proc/{entry}/environ").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(") ", 1)[-1].startswith("Z"):
            continue
        if raw in cmd or raw in env:
            found.append(int(entry))
    return found


class Server:
    """uvicorn serving ``target`` in a subprocess on 127.0.0.1, with its own temp dirs."""

    def __init__(self, name: str, target: str, loop: str, http: str, env: Optional[Dict[str, str]] = None) -> None:
        self.name = name
        self.env = dict(env or {})
        self.target = target
        self.loop = loop
        self.http = http
        self.port = free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix="ahb-", dir="/tmp"))
        self.state_dir = self.tmp / "s"
        self.runtime_dir = self.tmp / "r"
        self.log_path = self.tmp / "server.log"
        self.proc: Optional[subprocess.Popen] = None
        self.log_text = ""
        self.stop_report: Dict[str, Any] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_base(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def command(self) -> List[str]:
        return [sys.executable, "-m", "uvicorn", self.target, "--host", "127.0.0.1", "--port", str(self.port),
                "--loop", self.loop, "--http", self.http, "--log-level", "warning", "--no-access-log"]

    async def start(self, timeout: float = 60) -> "Server":
        env = dict(os.environ)
        env.update({
            "ASGI_HTAG_STATE_DIR": str(self.state_dir),
            "ASGI_HTAG_RUNTIME_DIR": str(self.runtime_dir),
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.env)
        logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as c:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited at start-up:\n{self.log_path.read_text()[-3000:]}")
                try:
                    if (await c.get("/_stats")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not answer within {timeout}s")
                await asyncio.sleep(0.1)
        log.info("%s: pid %s on %s", self.name, self.proc.pid, self.url)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> Dict[str, Any]:
        """SIGTERM, wait, then check (bounded) that no process of this server remains;
        kill what is left. Returns what happened."""
        report: Dict[str, Any] = {"exit": None, "left": [], "killed": []}
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    report["killed_group"] = True
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            report["exit"] = self.proc.returncode
        needle = str(self.runtime_dir)
        deadline = time.monotonic() + 30
        left = pids_naming(needle)
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = pids_naming(needle)
        report["left"] = left
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                report["killed"].append(pid)
            except ProcessLookupError:
                pass
        try:
            self.log_text = self.log_path.read_text(errors="replace")
        except OSError:
            self.log_text = ""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.stop_report = report
        return report

    def log_issues(self) -> List[str]:
        return [line for line in self.log_text.splitlines() if LOG_ISSUE_RE.search(line)]


async def server_stats(server: Server, timeout: float = 30) -> Dict[str, Any]:
    """The server's ``/_stats`` (its session processes' pids under ``"pids"``)."""
    async with httpx.AsyncClient(base_url=server.url, timeout=timeout) as c:
        return (await c.get("/_stats")).json()  # type: ignore[no-any-return]


# --- pages and sessions -------------------------------------------------------------------
def find_inc(text: str) -> Dict[str, Any]:
    """The Counter's "inc" interaction, read from the button's onclick as tests/client.py does."""
    for m in INTERACT_RE.finditer(htmlmod.unescape(text)):
        try:
            o = json.loads(m.group(1).replace("jevent(event)", "{}"))
        except ValueError:
            continue
        if isinstance(o, dict) and o.get("method") == "inc":
            return o
    raise ValueError("no inc interaction in the page")


def parse_page(text: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(cfg, the "inc" interaction) of a Counter page."""
    m = CFG_RE.search(text)
    if not m:
        raise ValueError("no cfg in the page")
    return json.loads(m.group(1)), find_inc(text)


class Session:
    """One browser session: its page config, its "inc" frame, its cookie, maybe a ws."""

    __slots__ = ("cfg", "frame", "cookie", "ws")

    def __init__(self, cfg: Dict[str, Any], inc: Dict[str, Any], cookie: str) -> None:
        self.cfg = cfg
        self.frame = json.dumps(inc)
        self.cookie = cookie
        self.ws: Optional[ClientConnection] = None

    def ws_url(self, server: Server) -> str:
        return f"{server.ws_base}{self.cfg['ws']}?t={self.cfg['token']}"

    def post_url(self) -> str:
        return f"{self.cfg['post']}?t={self.cfg['token']}"

    async def open_ws(self, server: Server) -> ClientConnection:
        self.ws = await connect(self.ws_url(server), additional_headers={"Cookie": self.cookie},
                                max_size=2 ** 24, open_timeout=60, ping_interval=None, close_timeout=2)
        return self.ws

    async def click(self) -> str:
        assert self.ws is not None
        await self.ws.send(self.frame)
        return await self.ws.recv()  # type: ignore[return-value]


async def new_session(client: httpx.AsyncClient, path: str = "/") -> Session:
    client.cookies.clear()
    r = await client.get(path)
    if r.status_code != 200:
        raise RuntimeError(f"GET {path}: {r.status_code}")
    cfg, inc = parse_page(r.text)
    cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    return Session(cfg, inc, cookie)


def answered(msg: Any) -> bool:
    return isinstance(msg, str) and '"update"' in msg and '"err"' not in msg


# --- floors (a) and (b) -------------------------------------------------------------------
async def floor_interact(n: int) -> Dict[str, Any]:
    """(a) HRenderer.interact called in-process, on the same Counter."""
    from htag.render import HRenderer

    from tests.apps import Counter

    hr = HRenderer(Counter, "", init=((), {}))
    inc = find_inc(str(hr))
    oid, method = inc["id"], inc["method"]
    for _ in range(200):
        await hr.interact(oid, method, [], {}, {})
    lat = []
    pc = time.perf_counter
    for _ in range(n):
        t0 = pc()
        actions = await hr.interact(oid, method, [], {}, {})
        lat.append(pc() - t0)
    if "update" not in actions:
        raise RuntimeError(f"unexpected actions {actions!r}")
    return summary(lat)


def floor_processes(levels: Tuple[int, ...], seconds: float) -> Dict[str, Any]:
    """(d) The Counter clicked in N forked processes vs N renderers in one process, no web
    stack (bench/procfloor.py, in its own interpreter)."""
    out = subprocess.run([sys.executable, str(BENCH / "procfloor.py"), str(seconds), *map(str, levels)],
                         capture_output=True, text=True, timeout=120 + 10 * seconds * len(levels))
    if out.returncode != 0:
        raise RuntimeError(f"bench/procfloor.py failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def _unix_round(n: int, tmp: Path, pin: Optional[Tuple[int, int]] = None) -> Tuple[List[float], int]:
    """One echo server subprocess, one connection, ``n`` measured round trips (after 300
    unmeasured). ``pin`` = (client CPU, server CPU), or None to let the scheduler place them."""
    path = str(tmp / f"echo{time.monotonic_ns()}.s")
    preexec = (lambda: os.sched_setaffinity(0, {pin[1]})) if pin else None  # type: ignore[index]
    proc = subprocess.Popen([sys.executable, str(BENCH / "unix_echo.py"), path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, preexec_fn=preexec)
    old_affinity = os.sched_getaffinity(0)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        if proc.stdout.readline().strip() != "READY":
            raise RuntimeError("echo server did not start")
        if pin:
            os.sched_setaffinity(0, {pin[0]})  # this thread only
        frame = json.dumps({"t": "interact", "data": {"id": 140245362312016, "method": "inc", "args": [], "kargs": {},
                                                      "event": {}}, "token": "x" * 24, "session": {}},
                           separators=(",", ":")).encode()
        data = struct.pack(">I", len(frame)) + frame
        size = len(data)
        view = memoryview(bytearray(size))
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)

        def rt() -> None:
            s.sendall(data)
            got = 0
            while got < size:
                k = s.recv_into(view[got:], size - got)
                if not k:
                    raise EOFError
                got += k

        for _ in range(300):
            rt()
        lat = []
        pc = time.perf_counter
        for _ in range(n):
            t0 = pc()
            rt()
            lat.append(pc() - t0)
        s.close()
        return lat, size
    finally:
        if pin:
            os.sched_setaffinity(0, old_affinity)
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def floor_unix(n: int, tmp: Path, rounds: int = 5) -> Dict[str, Any]:
    """(b) A raw Unix-socket request/response of an interaction-sized frame, from a
    blocking client, against an echo server in a subprocess.

    The figure used is unpinned (the scheduler places both ends), over ``rounds`` fresh
    echo processes, because one round lands either on one CPU (~10 us here) or on two
    (~40 us, an inter-CPU wake-up each way) and stays there. Pinned runs on one CPU and on
    two CPUs are recorded next to it for context."""
    lat: List[float] = []
    per_round = []
    size = 0
    for _ in range(rounds):
        got, size = _unix_round(max(1, n // rounds), tmp)
        lat.extend(got)
        per_round.append(statistics.median(got) * 1e3)
    out = summary(lat)
    out.update(frame_bytes=size, round_medians_ms=per_round)
    cpus = sorted(os.sched_getaffinity(0))
    if cpus:
        out["same_cpu"] = summary(_unix_round(max(1, n // 2), tmp, (cpus[0], cpus[0]))[0])
    if len(cpus) >= 2:
        out["two_cpus"] = summary(_unix_round(max(1, n // 2), tmp, (cpus[0], cpus[1]))[0])
    return out


# --- phases -------------------------------------------------------------------------------
async def renders(server: Server, n: int, warmup: int) -> Dict[str, Any]:
    """Cold first render (new session, process start included) and warm render (the same
    session reloading), on one keep-alive client whose cookies are cleared before each
    cold GET."""
    cold: List[float] = []
    warm: List[float] = []
    pc = time.perf_counter
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
        await c.get("/_stats")  # opens the keep-alive connection
        for i in range(warmup + n):
            c.cookies.clear()
            t0 = pc()
            r = await c.get("/")
            t1 = pc()
            r2 = await c.get("/")
            t2 = pc()
            if r.status_code != 200 or r2.status_code != 200:
                raise RuntimeError(f"{server.name}: render status {r.status_code}/{r2.status_code}")
            parse_page(r.text)
            if i >= warmup:
                cold.append(t1 - t0)
                warm.append(t2 - t1)
    return {"cold": summary(cold), "warm": summary(warm)}


class _Prober:
    """One session of one server, ready to time one round trip at a time (ws click or
    http_only POST)."""

    def __init__(self, server: Server, kind: str) -> None:
        self.server = server
        self.kind = kind
        self.lat: List[float] = []
        self.round_medians: List[float] = []
        self.bad = 0
        self.done = 0
        self.last = ""
        self.client = httpx.AsyncClient(base_url=server.url, timeout=60)
        self.sess: Optional[Session] = None

    async def open(self) -> None:
        self.sess = await new_session(self.client, "/" if self.kind == "ws" else "/http")
        if self.kind == "ws":
            await self.sess.open_ws(self.server)
        elif self.sess.cfg.get("mode") != "http":
            raise RuntimeError(f"{self.server.name}: /http is not an http_only page")

    async def one(self) -> float:
        assert self.sess is not None
        pc = time.perf_counter
        if self.kind == "ws":
            t0 = pc()
            msg = await self.sess.click()
            t1 = pc()
            self.bad += not answered(msg)
        else:
            t0 = pc()
            r = await self.client.post(self.sess.post_url(), content=self.sess.frame.encode(),
                                       headers={"content-type": "application/json"})
            t1 = pc()
            msg = r.text
            self.bad += r.status_code != 200 or not answered(msg)
        self.done += 1
        self.last = msg
        return t1 - t0

    async def close(self) -> None:
        if self.sess is not None and self.sess.ws is not None:
            await self.sess.ws.close()
        await self.client.aclose()

    def result(self) -> Dict[str, Any]:
        out = summary(self.lat)
        out.update(bad_answers=self.bad, round_medians_ms=[m * 1e3 for m in self.round_medians])
        if self.kind == "ws":  # the count shown is every click this session made: none lost
            value = next(iter(json.loads(self.last)["update"].values()))
            out["final_count_ok"] = f">{self.done}<" in value
        return out


async def round_trips(servers: List[Server], kind: str, warmup: int, n: int, rounds: int) -> Dict[str, Dict[str, Any]]:
    """ws (``kind="ws"``: one session, one websocket, clicks) or http_only (``"http"``: one
    session, one keep-alive client, POSTs) round trips of every server, measured in
    ``rounds`` blocks that alternate between the servers (the first server of a block
    alternates too), so that a change in the machine's background load falls on all of
    them alike. ``n`` measured round trips per server after ``warmup``."""
    probers = [_Prober(s, kind) for s in servers]
    try:
        for p in probers:
            await p.open()
            for _ in range(warmup):
                await p.one()
        per = max(1, n // rounds)
        for r in range(rounds):
            for p in (probers if r % 2 == 0 else probers[::-1]):
                block = [await p.one() for _ in range(per)]
                p.lat.extend(block)
                p.round_medians.append(statistics.median(block))
        return {p.server.name: p.result() for p in probers}
    finally:
        for p in probers:
            await p.close()


async def head_of_line(server: Server, rounds: int, burst: int, baseline: int, path: str = "/") -> Dict[str, Any]:
    """One user clicks over ws in a closed loop; meanwhile another process fires ``burst``
    GETs of ``path`` from as many new clients at once (``/``: new sessions starting). Worst
    click in the burst window vs the same user's median click just before it; and, for
    reference, the worst click over as many clicks with nothing starting."""
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
        sess = await new_session(c, "/")
    await sess.open_ws(server)
    base_all: List[float] = []
    during_all: List[float] = []
    worsts: List[float] = []
    window_sizes: List[int] = []
    quiet_worsts: List[float] = []
    gets: List[float] = []
    statuses: Dict[str, int] = {}
    bad = 0
    pc = time.perf_counter
    mono = time.monotonic
    try:
        for _ in range(100):
            bad += not answered(await sess.click())
        for _ in range(rounds):
            helper = await asyncio.create_subprocess_exec(
                sys.executable, str(BENCH / "burst.py"), server.url, path, str(burst),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            assert helper.stdout is not None and helper.stdin is not None
            line = await helper.stdout.readline()
            if line.strip() != b"READY":
                raise RuntimeError("burst helper did not start")
            for _ in range(baseline):
                t0 = pc()
                msg = await sess.click()
                base_all.append(pc() - t0)
                bad += not answered(msg)
            helper.stdin.write(b"go\n")
            await helper.stdin.drain()
            result_task = asyncio.ensure_future(helper.stdout.readline())
            clicks: List[Tuple[float, float, float]] = []  # (start, end) monotonic, latency
            while not result_task.done():
                m0 = mono()
                t0 = pc()
                msg = await sess.click()
                lat = pc() - t0
                clicks.append((m0, mono(), lat))
                bad += not answered(msg)
            result = json.loads(await result_task)
            await helper.wait()
            window = [lat for (s, e, lat) in clicks if e >= result["t0"] and s <= result["t1"]]
            during_all.extend(window)
            window_sizes.append(len(window))
            worsts.append(max(window) if window else float("nan"))
            for status, dur in result["results"]:
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                gets.append(dur)
        # The reference: the same user's worst click over as many clicks as each burst
        # window held, with nothing starting (after a pause in which the burst's new
        # sessions settle). The worst of n clicks grows with n on a shared machine.
        await asyncio.sleep(1.0)
        for n in window_sizes:
            worst_quiet = 0.0
            for _ in range(max(n, 1)):
                t0 = pc()
                msg = await sess.click()
                worst_quiet = max(worst_quiet, pc() - t0)
                bad += not answered(msg)
            quiet_worsts.append(worst_quiet)
    finally:
        await sess.ws.close()  # type: ignore[union-attr]
    median = statistics.median(base_all)
    worst = max(worsts)
    return {
        "median_click_ms": median * 1e3,
        "worst_click_ms": worst * 1e3,
        "worst_per_round_ms": [w * 1e3 for w in worsts],
        "ratio": worst / median,
        "clicks_in_window": len(during_all),
        "clicks_per_window": window_sizes,
        "quiet_worst_click_ms": max(quiet_worsts) * 1e3,
        "quiet_worst_per_round_ms": [w * 1e3 for w in quiet_worsts],
        "quiet_ratio": max(quiet_worsts) / median,
        "median_click_during_burst_ms": statistics.median(during_all) * 1e3 if during_all else None,
        "burst_get": summary(gets),
        "burst_statuses": statuses,
        "bad_answers": bad,
    }


class _Clickers:
    """``n`` sessions of one server, each with its own ws, clicking in a closed loop during
    the windows :meth:`window` is asked for."""

    def __init__(self, server: Server, n: int, server_pids: Callable[[], Awaitable[List[int]]]) -> None:
        self.server = server
        self.n = n
        self.server_pids = server_pids
        self.sessions: List[Session] = []
        self.pids: List[int] = []
        self.lats: List[float] = []
        self.count = 0
        self.elapsed = 0.0
        self.bad = 0
        self.client_cpu = 0.0
        self.cpu: Dict[int, float] = {}

    async def open(self) -> None:
        async with httpx.AsyncClient(base_url=self.server.url, timeout=120) as c:
            for _ in range(self.n):
                self.sessions.append(await new_session(c, "/"))
        await asyncio.gather(*(s.open_ws(self.server) for s in self.sessions))
        for s in self.sessions:
            await s.click()
        self.pids = await self.server_pids()  # after the sessions exist: their processes are included

    async def window(self, seconds: float, measured: bool = True) -> None:
        pc = time.perf_counter
        stop_at = pc() + seconds
        lats: List[float] = []

        async def clicker(s: Session) -> None:
            while True:
                t0 = pc()
                if t0 >= stop_at:
                    return
                msg = await s.click()
                lats.append(pc() - t0)
                self.bad += not answered(msg)

        c0, cpu0, t0 = time.process_time(), {p: cpu_seconds(p) for p in self.pids}, pc()
        await asyncio.gather(*(clicker(s) for s in self.sessions))
        elapsed = pc() - t0
        if not measured:
            return
        self.client_cpu += time.process_time() - c0
        for p, v in cpu0.items():
            self.cpu[p] = self.cpu.get(p, 0.0) + cpu_seconds(p) - v
        self.lats.extend(lats)
        self.count += len(lats)
        self.elapsed += elapsed

    async def close(self) -> None:
        await asyncio.gather(*(s.ws.close() for s in self.sessions if s.ws is not None))

    def result(self) -> Dict[str, Any]:
        out = summary(self.lats)
        out.update(
            sessions=self.n,
            interactions_per_s=self.count / self.elapsed,
            seconds=self.elapsed,
            bad_answers=self.bad,
            client_cpu=self.client_cpu / self.elapsed,
            server_cpu=sum(self.cpu.values()) / self.elapsed,
            cpu_by_pid={str(p): v / self.elapsed for p, v in self.cpu.items()},
        )
        return out


async def throughput(servers: List[Server], n_sessions: int, seconds: float, warmup: float, rounds: int,
                     server_pids: Dict[str, Callable[[], Awaitable[List[int]]]]) -> Dict[str, Dict[str, Any]]:
    """``n_sessions`` sessions per server, each clicking over its own ws in a closed loop:
    after ``warmup`` s each, ``seconds`` s per server measured in ``rounds`` windows that
    alternate between the servers (the other server's sessions wait meanwhile), so that a
    change in the machine's background load falls on all of them alike."""
    groups = [_Clickers(s, n_sessions, server_pids[s.name]) for s in servers]
    try:
        for g in groups:
            await g.open()
            await g.window(warmup, measured=False)
        for r in range(rounds):
            for g in (groups if r % 2 == 0 else groups[::-1]):
                await g.window(seconds / rounds)
        return {g.server.name: g.result() for g in groups}
    finally:
        for g in groups:
            await g.close()


async def hold_sessions(server: Server, live: List[Session], target: int, failures: List[str],
                        concurrency: int = 16) -> None:
    """Create sessions (GET + ws + one answered interaction, ws kept open) until ``live``
    holds ``target`` of them."""
    todo = target - len(live)
    counter = [0]

    async def creator() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            while counter[0] < todo:
                counter[0] += 1
                try:
                    s = await new_session(c, "/")
                    await s.open_ws(server)
                    msg = await asyncio.wait_for(s.click(), 60)
                    if not answered(msg):
                        failures.append(f"first interaction: {msg[:200]!r}")
                        await s.ws.close()  # type: ignore[union-attr]
                        continue
                    live.append(s)
                except Exception as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(creator() for _ in range(concurrency)))


async def roll_call(live: List[Session]) -> Tuple[int, List[str]]:
    """Every live session clicks once more over its open ws: how many answer."""
    sem = asyncio.Semaphore(100)
    errors: List[str] = []

    async def one(s: Session) -> bool:
        async with sem:
            try:
                return answered(await asyncio.wait_for(s.click(), 60))
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return False

    oks = await asyncio.gather(*(one(s) for s in live))
    return sum(oks), errors[:10]


async def close_all(live: List[Session]) -> None:
    sem = asyncio.Semaphore(200)

    async def one(s: Session) -> None:
        async with sem:
            if s.ws is not None:
                try:
                    await s.ws.close()
                except Exception:
                    pass

    await asyncio.gather(*(one(s) for s in live))


async def children_uss(server: Server) -> Tuple[Dict[str, Any], List[float]]:
    """The server's ``/_stats`` and the USS (MB) of every session process it names."""
    st = await server_stats(server, timeout=60)
    children = []
    for pid in st["pids"]:
        try:
            children.append(memory_of(pid)["uss_mb"])
        except OSError:
            pass
    return st, children


async def memory_asgi(server: Server, levels: Tuple[int, ...], used_clicks: int) -> List[Dict[str, Any]]:
    """On a fresh asgi_htag server: memory after 10, 100, 1000 live sessions. At the first
    level, also after every session has clicked ``used_clicks`` more times: a session
    that has been used, not only opened (its process's memory grows with its first clicks)."""
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
        st0 = (await c.get("/_stats")).json()
    zpid = st0["pid"]
    base_total = memory_of(server.pid)["uss_mb"] + memory_of(zpid)["uss_mb"]
    live: List[Session] = []
    failures: List[str] = []
    out = []
    try:
        for level in levels:
            t0 = time.perf_counter()
            await hold_sessions(server, live, level, failures)
            created_s = time.perf_counter() - t0
            await asyncio.sleep(1.0)
            st, children = await children_uss(server)
            worker = memory_of(server.pid)
            zygote = memory_of(st["pid"])
            forker = memory_of(st["forker"]) if st.get("forker") else {"uss_mb": 0.0, "rss_mb": 0.0}
            ok, errors = await roll_call(live)
            total = worker["uss_mb"] + zygote["uss_mb"] + forker["uss_mb"] + sum(children)
            row = {
                "sessions": level,
                "live": len(live),
                "processes": st["count"],
                "answered": ok,
                "roll_call_errors": errors,
                "create_seconds": created_s,
                "child_uss_mb_mean": statistics.fmean(children) if children else None,
                "child_uss_mb_median": statistics.median(children) if children else None,
                "child_uss_mb_max": max(children) if children else None,
                "worker_uss_mb": worker["uss_mb"],
                "worker_rss_mb": worker["rss_mb"],
                "zygote_uss_mb": zygote["uss_mb"],
                "zygote_rss_mb": zygote["rss_mb"],
                "forker_uss_mb": forker["uss_mb"],
                "total_uss_mb": total,
                "marginal_uss_mb_per_session": (total - base_total) / max(1, len(live)),
                "failures": failures[:20],
                "failure_count": len(failures),
            }
            out.append(row)
            log.info("asgi_htag memory: %d sessions (%d live, %d answered), child USS %.2f MB, total USS %.1f MB, created in %.1fs",
                     level, len(live), ok, row["child_uss_mb_mean"] or 0, total, created_s)
            if level == levels[0] and used_clicks:
                bad = 0
                for _ in range(used_clicks):
                    for s in live:
                        bad += not answered(await s.click())
                await asyncio.sleep(1.0)
                _, used = await children_uss(server)
                row["after_clicks"] = {
                    "clicks_each": used_clicks + 2,  # with the first interaction and the roll call's
                    "child_uss_mb_mean": statistics.fmean(used) if used else None,
                    "child_uss_mb_max": max(used) if used else None,
                    "bad_answers": bad,
                }
                log.info("asgi_htag memory: %d sessions after %d clicks each, child USS %.2f MB",
                         level, used_clicks + 2, row["after_clicks"]["child_uss_mb_mean"] or 0)
    finally:
        await close_all(live)
    return out


async def memory_inproc(server: Server, levels: Tuple[int, ...]) -> List[Dict[str, Any]]:
    """The in-process runner's memory growth for the same live sessions (floor)."""
    base = memory_of(server.pid)["uss_mb"]
    live: List[Session] = []
    failures: List[str] = []
    out = []
    try:
        for level in levels:
            await hold_sessions(server, live, level, failures)
            await asyncio.sleep(0.5)
            mem = memory_of(server.pid)
            ok, errors = await roll_call(live)
            out.append({
                "sessions": level,
                "live": len(live),
                "answered": ok,
                "uss_mb": mem["uss_mb"],
                "rss_mb": mem["rss_mb"],
                "uss_mb_per_session": (mem["uss_mb"] - base) / max(1, len(live)),
                "failure_count": len(failures),
                "failures": failures[:10],
            })
    finally:
        await close_all(live)
    return out


# --- report -------------------------------------------------------------------------------
def fmt_ms(ms: Optional[float]) -> str:
    if ms is None or (isinstance(ms, float) and math.isnan(ms)):
        return "-"
    if ms < 1:
        return f"{ms * 1000:.0f} us"
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 100:
        return f"{ms:.1f} ms"
    return f"{ms:.0f} ms"


def fmt_x(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def verdict(ok: Optional[bool]) -> str:
    return "" if ok is None else ("PASS" if ok else "FAIL")


def build_rows(res: Dict[str, Any]) -> Tuple[List[List[str]], List[Dict[str, Any]]]:
    rows: List[List[str]] = []
    targets: List[Dict[str, Any]] = []
    A = res["asgi_htag"]
    I = res["inprocess"]
    B = res.get("bare") or {}
    F = res["floors"]

    def row(figure: str, value: str, floor: str, ratio: str, target: str = "", ok: Optional[bool] = None) -> None:
        rows.append([figure, value, floor, ratio, target, verdict(ok)])
        if ok is not None:
            targets.append({"figure": figure, "target": target, "pass": ok})

    # floors
    fa, fb = F["interact"], F["unix"]
    row("floor (a) HRenderer.interact, median / p99", f"{fmt_ms(fa['median_ms'])} / {fmt_ms(fa['p99_ms'])}", "", "")
    pinned = ", ".join(f"{label} {fmt_ms(fb[k]['median_ms'])}" for k, label in (("same_cpu", "1 CPU"), ("two_cpus", "2 CPUs")) if k in fb)
    row(f"floor (b) raw Unix RT ({fb['frame_bytes']} B), median / p99", f"{fmt_ms(fb['median_ms'])} / {fmt_ms(fb['p99_ms'])}",
        f"pinned: {pinned}" if pinned else "", "")
    for n, d in F.get("processes", {}).items():
        one, many = d["inprocess"], d["processes"]
        row(f"floor (d) CPU per click, {n} session(s) in {n} process(es)", f"{many['cpu_us_per_interaction']:.0f} us",
            f"{n} in one process {one['cpu_us_per_interaction']:.0f} us",
            fmt_x(many["cpu_us_per_interaction"] / one["cpu_us_per_interaction"]), "(info)")
    for key, label in (("ws", "ws round trip"), ("http", "http_only round trip")):
        if key in B:
            e, i = B[key], I[key]
            row(f"floor (e) bare process per session: {label}, median", fmt_ms(e["median_ms"]),
                f"in-proc {fmt_ms(i['median_ms'])} + unix {fmt_ms(fb['median_ms'])}",
                fmt_x(e["median_ms"] / (i["median_ms"] + fb["median_ms"])), f"(info; as the <= {RT_TARGET:g}x target)")
    for e, i in zip(B.get("throughput", []), I["throughput"]):
        row(f"floor (e) bare process per session: throughput, {e['sessions']} session(s)",
            f"{e['interactions_per_s']:.0f}/s", f"in-proc {i['interactions_per_s']:.0f}/s",
            fmt_x(e["interactions_per_s"] / i["interactions_per_s"]),
            f"(info; as the >= {TP_TARGET:g}x target)" if e["sessions"] in (10, 50) else "(info)")
    rows.append(None)  # type: ignore[arg-type]

    cold, warm = A["renders"]["cold"], A["renders"]["warm"]
    icold, iwarm = I["renders"]["cold"], I["renders"]["warm"]
    r = cold["median_ms"] / warm["median_ms"]
    row("cold first render, median", fmt_ms(cold["median_ms"]), f"in-proc {fmt_ms(icold['median_ms'])}",
        fmt_x(cold["median_ms"] / icold["median_ms"]), f"cold/warm {r:.1f}x <= {COLD_TARGET:g}x", r <= COLD_TARGET)
    row("warm render (reload), median", fmt_ms(warm["median_ms"]), f"in-proc {fmt_ms(iwarm['median_ms'])}",
        fmt_x(warm["median_ms"] / iwarm["median_ms"]))

    for key, label in (("ws", "ws round trip"), ("http", "http_only round trip")):
        a, i = A[key], I[key]
        floor_med = i["median_ms"] + fb["median_ms"]
        floor_p99 = i["p99_ms"] + fb["p99_ms"]
        ratio = a["median_ms"] / floor_med
        row(f"{label}, median (n={a['n']})", fmt_ms(a["median_ms"]),
            f"in-proc {fmt_ms(i['median_ms'])} + unix {fmt_ms(fb['median_ms'])}", fmt_x(ratio),
            f"<= {RT_TARGET:g}x", ratio <= RT_TARGET)
        row(f"{label}, p99", fmt_ms(a["p99_ms"]), f"in-proc {fmt_ms(i['p99_ms'])} + unix {fmt_ms(fb['p99_ms'])}",
            fmt_x(a["p99_ms"] / floor_p99), "(info)")
        if key in B:
            row("  the median over floor (e)'s", fmt_ms(a["median_ms"]), f"floor (e) {fmt_ms(B[key]['median_ms'])}",
                fmt_x(a["median_ms"] / B[key]["median_ms"]), "(info)")

    h, ih = A["hol"], I["hol"]
    row("head-of-line: median click before the burst", fmt_ms(h["median_click_ms"]),
        f"in-proc {fmt_ms(ih['median_click_ms'])}", fmt_x(h["median_click_ms"] / ih["median_click_ms"]))
    row(f"head-of-line: worst click, {res['params']['hol_burst']} new sessions starting", fmt_ms(h["worst_click_ms"]),
        f"in-proc {fmt_ms(ih['worst_click_ms'])}", fmt_x(h["worst_click_ms"] / ih["worst_click_ms"]),
        f"worst/median {h['ratio']:.1f}x <= {HOL_TARGET:g}x", h["ratio"] <= HOL_TARGET)
    row("  the same number of clicks with nothing starting (reference)", fmt_ms(h["quiet_worst_click_ms"]),
        f"in-proc {fmt_ms(ih['quiet_worst_click_ms'])}", fmt_x(h["quiet_ratio"]),
        f"(info: worst/median; in-proc {ih['quiet_ratio']:.1f}x)")
    hp = A.get("hol_ping")
    if hp:
        row(f"  same burst of {res['params']['hol_burst']} new clients at a do-nothing route", fmt_ms(hp["worst_click_ms"]),
            f"its median {fmt_ms(hp['median_click_ms'])}", fmt_x(hp["ratio"]), "(info: worst/median)")

    for a, i in zip(A["throughput"], I["throughput"]):
        n = a["sessions"]
        ratio = a["interactions_per_s"] / i["interactions_per_s"]
        target = f">= {TP_TARGET:g}x" if n in (10, 50) else "(info)"
        row(f"throughput, {n} session(s) (interactions/s)", f"{a['interactions_per_s']:.0f}/s",
            f"in-proc {i['interactions_per_s']:.0f}/s", fmt_x(ratio), target, ratio >= TP_TARGET if n in (10, 50) else None)
        row(f"  p99 click at {n} session(s)", fmt_ms(a["p99_ms"]), f"in-proc {fmt_ms(i['p99_ms'])}",
            fmt_x(a["p99_ms"] / i["p99_ms"]), "(info)")
        e = next((t for t in B.get("throughput", []) if t["sessions"] == n), None)
        if e is not None:
            row(f"  throughput at {n} session(s) over floor (e)'s", f"{a['interactions_per_s']:.0f}/s",
                f"floor (e) {e['interactions_per_s']:.0f}/s", fmt_x(a["interactions_per_s"] / e["interactions_per_s"]), "(info)")

    for a, i in zip(A["memory"], I["memory"]):
        n = a["sessions"]
        per = a["child_uss_mb_mean"]
        row(f"USS per session process, {n} live (mean)", f"{per:.2f} MB",
            f"in-proc {i['uss_mb_per_session']:.3f} MB/session", fmt_x(per / i["uss_mb_per_session"]) if i["uss_mb_per_session"] > 0 else "-",
            f"<= {USS_TARGET_MB:g} MB", per <= USS_TARGET_MB)
        used = a.get("after_clicks")
        if used and used["child_uss_mb_mean"] is not None:
            per_used = used["child_uss_mb_mean"]
            row(f"USS per session process, {n} live, after {used['clicks_each']} clicks each (mean)", f"{per_used:.2f} MB",
                f"max {used['child_uss_mb_max']:.2f} MB", "", f"<= {USS_TARGET_MB:g} MB", per_used <= USS_TARGET_MB)
        row(f"  server total USS at {n} (worker {a['worker_uss_mb']:.0f} + zygote {a['zygote_uss_mb']:.0f} + forker {a.get('forker_uss_mb', 0):.0f} + children)",
            f"{a['total_uss_mb']:.0f} MB", f"in-proc {i['uss_mb']:.0f} MB", fmt_x(a["total_uss_mb"] / i["uss_mb"]),
            f"(worker RSS {a['worker_rss_mb']:.0f} MB)")
        row(f"  server USS added per session at {n}", f"{a['marginal_uss_mb_per_session']:.2f} MB",
            f"in-proc {i['uss_mb_per_session']:.3f} MB", fmt_x(a["marginal_uss_mb_per_session"] / i["uss_mb_per_session"])
            if i["uss_mb_per_session"] > 0 else "-", "(info)")
        held_target = n >= HELD_TARGET
        row(f"  sessions answering at {n} live", f"{a['answered']}/{n}", f"in-proc {i['answered']}/{n}",
            "", "all answer" if held_target else "(info)", (a["answered"] == n) if held_target else None)
    if max(m["sessions"] for m in A["memory"]) < HELD_TARGET:
        row(f"{HELD_TARGET} live sessions, every one answering", "not measured (--quick)", "", "", "all answer")
    return rows, targets


def print_table(rows: List[List[str]], header: List[str]) -> None:
    real = [r for r in rows if r is not None]
    widths = [max(len(header[i]), *(len(r[i]) for r in real)) for i in range(len(header))]
    sep = "-+-".join("-" * w for w in widths)

    def line(cells: List[str]) -> str:
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) if i in (1, 3) else c.ljust(w)
                          for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print(line(header))
    print(sep)
    for r in rows:
        print(sep if r is None else line(r))


# --- main ---------------------------------------------------------------------------------
def versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("asgi_htag", "htag", "uvicorn", "starlette", "anyio", "httpx", "websockets", "uvloop", "httptools", "h11"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def machine() -> Dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "asgi_htag"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip())
    except OSError:
        commit, dirty = "", False
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "cpu": cpu, "memory": mem, "git": commit + ("+dirty asgi_htag" if dirty else "")}


def resolved_impls(http: str) -> str:
    """What uvicorn's "auto" picks here (the same for every server)."""
    if http == "auto":
        try:
            import httptools  # noqa: F401

            http = "httptools"
        except ImportError:
            http = "h11"
    return f"http {http}, ws websockets-sansio"


def raise_fd_limit() -> Tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def run(args: argparse.Namespace, P: Dict[str, Any]) -> Dict[str, Any]:
    res: Dict[str, Any] = {"params": {k: list(v) if isinstance(v, tuple) else v for k, v in P.items()},
                           "floors": {}, "asgi_htag": {}, "inprocess": {}, "bare": {}, "servers": {}}
    res["params"].update(loop=args.loop, http=args.http, impls=resolved_impls(args.http), quick=args.quick,
                         worker_batch=args.worker_batch)
    servers: List[Server] = []
    scratch = Path(tempfile.mkdtemp(prefix="ahb-", dir="/tmp"))

    def stop(server: Server) -> None:
        rep = server.stop()
        servers.remove(server)
        issues = server.log_issues()
        res["servers"][server.name] = {"stop": rep, "log_issue_count": len(issues), "log_issues": issues[:40]}
        if rep["left"]:
            log.warning("%s: processes left after stop, killed: %s", server.name, rep["left"])

    try:
        log.info("floor (a): HRenderer.interact in-process")
        res["floors"]["interact"] = await floor_interact(P["floor_a"])
        log.info("floor (b): raw Unix-socket round trip")
        res["floors"]["unix"] = await asyncio.get_running_loop().run_in_executor(None, floor_unix, P["floor_b"], scratch)
        log.info("floor (d): one process per session, no web stack")
        res["floors"]["processes"] = await asyncio.get_running_loop().run_in_executor(
            None, floor_processes, P["tp_levels"], P["floor_d_seconds"])

        inproc = Server("inprocess", "bench.inprocess_runner:app", args.loop, args.http)
        servers.append(inproc)
        asgi_env = {"BENCH_WORKER_BATCH": args.worker_batch} if args.worker_batch else {}
        asgi = Server("asgi_htag", "bench.server:app", args.loop, args.http, asgi_env)
        servers.append(asgi)
        bare = Server("bare", "bench.bare_process_runner:app", args.loop, args.http)  # floor (e)
        servers.append(bare)
        await inproc.start()
        await asgi.start()
        await bare.start()

        async def asgi_stats() -> Dict[str, Any]:
            return await server_stats(asgi)

        # as the server has it, not as --worker-batch asked: what the table's header says
        # it measured; and the policy seen from outside, at rest
        st = await asgi_stats()
        res["asgi_htag"]["worker_batch_scheduling"] = st["worker_batch_scheduling"]
        res["asgi_htag"]["worker_batch_at_rest"] = os.sched_getscheduler(asgi.pid) == os.SCHED_BATCH
        # how many times "auto" switched the worker's policy, per phase
        switches: Dict[str, int] = {}
        seen = [st["worker_policy_switches"]]

        async def count_switches(phase: str) -> None:
            st = await asgi_stats()
            switches[phase] = st["worker_policy_switches"] - seen[0]
            seen[0] = st["worker_policy_switches"]
            res["asgi_htag"]["worker_policy_backoffs"] = st["worker_policy_backoffs"]

        res["asgi_htag"]["worker_policy_switches"] = switches

        async def inproc_pids() -> List[int]:
            return [inproc.pid]

        async def asgi_pids() -> List[int]:
            return [asgi.pid] + list((await asgi_stats())["pids"])

        async def bare_pids() -> List[int]:
            return [bare.pid] + list((await server_stats(bare))["pids"])

        for name, server in (("inprocess", inproc), ("asgi_htag", asgi)):
            log.info("%s: cold and warm renders", name)
            res[name]["renders"] = await renders(server, P["cold"], P["warmup_renders"])
        await count_switches("renders")

        for kind, warmup, n in (("ws", P["ws_warmup"], P["ws_clicks"]), ("http", P["http_warmup"], P["posts"])):
            log.info("%s round trips, the three servers in %d alternating blocks", kind, P["rt_rounds"])
            got = await round_trips([inproc, asgi, bare], kind, warmup, n, P["rt_rounds"])
            for name in ("inprocess", "asgi_htag", "bare"):
                res[name][kind] = got[name]
            await count_switches(kind)

        for name, server in (("inprocess", inproc), ("asgi_htag", asgi)):
            R = res[name]
            log.info("%s: head-of-line blocking", name)
            R["hol"] = await head_of_line(server, P["hol_rounds"], P["hol_burst"], P["hol_baseline"])
            if server is asgi:
                log.info("%s: head-of-line blocking, the same burst at a do-nothing route", name)
                R["hol_ping"] = await head_of_line(server, P["hol_rounds"], P["hol_burst"], P["hol_baseline"], "/_ping")
            R["throughput"] = []
        res["bare"]["throughput"] = []
        await count_switches("hol")

        for n in P["tp_levels"]:
            log.info("throughput with %d sessions, the three servers in %d alternating windows", n, P["tp_rounds"])
            got = await throughput([inproc, asgi, bare], n, P["tp_seconds"], P["tp_warmup"], P["tp_rounds"],
                                   {"inprocess": inproc_pids, "asgi_htag": asgi_pids, "bare": bare_pids})
            for name in ("inprocess", "asgi_htag", "bare"):
                res[name]["throughput"].append(got[name])
            await count_switches(f"throughput_{n}")

        res["asgi_htag"]["processes_after_phases"] = (await asgi_stats())["count"]

        log.info("inprocess: memory with %s live sessions", "/".join(map(str, P["mem_levels"])))
        res["inprocess"]["memory"] = await memory_inproc(inproc, P["mem_levels"])
        stop(inproc)
        stop(asgi)
        stop(bare)

        asgi2 = Server("asgi_htag-memory", "bench.server:app", args.loop, args.http, asgi_env)
        servers.append(asgi2)
        await asgi2.start()
        log.info("asgi_htag: memory with %s live sessions (fresh server)", "/".join(map(str, P["mem_levels"])))
        res["asgi_htag"]["memory"] = await memory_asgi(asgi2, P["mem_levels"], P["mem_used_clicks"])
        stop(asgi2)
    finally:
        for server in list(servers):
            stop(server)
        shutil.rmtree(scratch, ignore_errors=True)
    return res


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small counts, 10 and 100 sessions (< 1 min)")
    ap.add_argument("--json", default=str(BENCH / "results" / "latest.json"), help="where to write the results")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop of every server and the client")
    ap.add_argument("--http", choices=("auto", "h11", "httptools"), default="auto", help="uvicorn HTTP implementation (every server)")
    ap.add_argument("--worker-batch", choices=("on", "off", "auto"),
                    help="serve asgi_htag with worker_batch_scheduling=True, False or \"auto\" "
                         "(default: the Engine's default, False; see the README's Settings)")
    args = ap.parse_args(argv)
    # progress on stderr from this script's logger only: the root logger stays at WARNING so
    # that htag's and httpx's info logs cost nothing in the measured loops
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    P = dict(QUICK if args.quick else FULL)
    limits = raise_fd_limit()
    if limits[0] < 4 * max(P["mem_levels"]):
        log.warning("open file limit is %d: %d live websockets may not fit", limits[0], max(P["mem_levels"]))

    started = time.perf_counter()
    host = machine()  # before the run: the git state of the code being measured
    coro = run(args, P)
    if args.loop == "uvloop":
        import uvloop

        res = uvloop.run(coro)
    else:
        res = asyncio.run(coro)
    wall = time.perf_counter() - started
    res["meta"] = {"machine": host, "versions": versions(), "wall_seconds": wall, "fd_limit": limits,
                   "command": " ".join([Path(sys.executable).name, "bench/run.py", *(argv if argv is not None else sys.argv[1:])])}

    rows, targets = build_rows(res)
    res["targets"] = targets
    m = res["meta"]["machine"]
    print()
    print(f"asgi_htag benchmark - {m['cpus']} CPUs ({m['cpu']}), {m['memory']} RAM, Python {m['python']}, "
          f"--loop {args.loop} ({resolved_impls(args.http)}), {'quick' if args.quick else 'full'} run, asgi_htag {m['git']}"
          + f", worker_batch_scheduling={res['asgi_htag']['worker_batch_scheduling']!r}")
    print()
    print_table(rows, ["figure", "asgi_htag", "floor", "x floor", "target", ""])
    print()
    passed = sum(t["pass"] for t in targets)
    print(f"targets: {passed}/{len(targets)} PASS" + ("" if passed == len(targets) else
          " - FAIL: " + "; ".join(t["figure"] for t in targets if not t["pass"])))
    for name in ("inprocess", "asgi_htag", "bare"):
        tp = ", ".join(f"{t['sessions']}: client {t['client_cpu']:.2f} / server {t['server_cpu']:.2f}"
                       for t in res[name]["throughput"])
        if "hol" not in res[name]:  # floor (e): its renders and bursts are not timed
            print(f"{name} (floor (e)): CPU cores used during throughput ({tp})")
            continue
        h = res[name]["hol"]["burst_get"]
        print(f"{name}: CPU cores used during throughput ({tp}); burst GETs (new sessions) "
              f"median {fmt_ms(h['median_ms'])}, max {fmt_ms(h['max_ms'])}")
    for name, info in res["servers"].items():
        rep = info["stop"]
        left = f"left after stop and killed: {rep['left']}" if rep["left"] else "no process left"
        code = rep["exit"]
        ended = f"ended by signal {-code}" if isinstance(code, int) and code < 0 else f"exit {code}"
        print(f"{name}: {ended}, {left}, {info['log_issue_count']} warning/error line(s) in its log")
        for line in info["log_issues"][:8]:
            print(f"    {line[:200]}")
    for name in ("asgi_htag", "inprocess"):
        for m_ in res[name]["memory"]:
            if m_.get("failure_count"):
                print(f"{name}: {m_['failure_count']} session(s) failed to start by {m_['sessions']}: {m_['failures'][:3]}")
    print(f"wall time {wall:.0f} s; JSON: {args.json}")

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
