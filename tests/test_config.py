"""State and runtime directories, and the shared signing secret."""
import contextlib
import os
import stat
import subprocess
import sys
import threading

import pytest

from asgi_htag.config import (
    check_process_loop,
    ENV_SECRET,
    Secret,
    check_runtime_dir,
    default_runtime_dir,
    ensure_private_dir,
    LoadScheduling,
    load_secret,
    use_batch_scheduling,
)
from asgi_htag.exceptions import ConfigurationError


def test_secret_is_made_once_with_mode_0600_and_shared(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_SECRET, raising=False)
    s1 = load_secret(tmp_path / "state")
    path = tmp_path / "state" / "secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    s2 = load_secret(tmp_path / "state")
    assert bytes(s1) == bytes(s2)
    # another process (another worker) reads the same secret
    out = subprocess.run(
        [sys.executable, "-c", "import sys;from asgi_htag.config import load_secret;"
         "sys.stdout.write(bytes(load_secret(sys.argv[1])).decode())", str(tmp_path / "state")],
        capture_output=True, text=True, check=True, env={k: v for k, v in os.environ.items() if k != ENV_SECRET},
    )
    assert out.stdout == bytes(s1).decode()


def test_secret_from_argument_and_env(tmp_path, monkeypatch):
    assert bytes(load_secret(tmp_path, "x" * 20)) == b"x" * 20
    monkeypatch.setenv(ENV_SECRET, "y" * 32)
    assert bytes(load_secret(tmp_path)) == b"y" * 32
    assert not (tmp_path / "secret").exists()


def test_secret_never_shows_itself():
    s = Secret("supersecretvalue-123456")
    assert "supersecret" not in repr(s) and "supersecret" not in str(s) and "supersecret" not in f"{s}"


@pytest.mark.parametrize("value", ["", "short", b"1234567890"])
def test_short_secret_is_refused(value):
    with pytest.raises(ConfigurationError, match="at least 16 bytes"):
        Secret(value)


def test_truncated_secret_file_is_reported(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_SECRET, raising=False)
    d = ensure_private_dir(tmp_path / "s")
    (d / "secret").write_bytes(b"abc")
    with pytest.raises(ConfigurationError, match="truncated"):
        load_secret(d)


def test_runtime_dir_checks(tmp_path):
    d = tmp_path / "rt"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    ensure_private_dir(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    long = tmp_path / ("x" * 80)
    with pytest.raises(ConfigurationError, match="too long"):
        check_runtime_dir(long)
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ConfigurationError, match="not a directory"):
        ensure_private_dir(f)


def test_default_runtime_dir_is_short_and_per_state_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("ASGI_HTAG_RUNTIME_DIR", raising=False)
    a = default_runtime_dir(tmp_path / "a")
    b = default_runtime_dir(tmp_path / "b")
    assert a != b and len(os.fsencode(a)) <= 70
    assert default_runtime_dir(tmp_path / "a") == a


@pytest.mark.parametrize("name", ["auto", "uvloop", "asyncio"])
def test_process_loop_names(name):
    assert check_process_loop(name) == name


@pytest.mark.parametrize("name", ["", "trio", "UVLOOP", "asyncio ", None, 1])
def test_process_loop_other_values_are_refused_at_construction(tmp_path, name):
    from asgi_htag import HtagASGI, Runner
    from tests.apps import Counter

    with pytest.raises(ConfigurationError, match="process_loop"):
        check_process_loop(name)
    with pytest.raises(ConfigurationError, match="process_loop"):
        Runner(Counter, state_dir=tmp_path, process_loop=name)
    with pytest.raises(ConfigurationError, match="process_loop"):
        HtagASGI(Counter, state_dir=tmp_path, process_loop=name)


@pytest.mark.parametrize("value", ["", "on", "AUTO", None, 1, 0])
def test_worker_batch_scheduling_other_values_are_refused_at_construction(tmp_path, value):
    from asgi_htag import HtagASGI, Runner
    from tests.apps import Counter

    with pytest.raises(ConfigurationError, match="worker_batch_scheduling must be True, False or 'auto'"):
        Runner(Counter, state_dir=tmp_path, worker_batch_scheduling=value)
    with pytest.raises(ConfigurationError, match="worker_batch_scheduling"):
        HtagASGI(Counter, state_dir=tmp_path, worker_batch_scheduling=value)


def test_process_loop_uvloop_without_uvloop_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what an environment without it sees
    with pytest.raises(ConfigurationError, match="not installed"):
        check_process_loop("uvloop")
    assert check_process_loop("auto") == "auto"


def test_batch_scheduling_applies_to_the_calling_thread_and_reports_refusals(monkeypatch, caplog):
    import threading

    got = {}
    before = os.sched_getscheduler(0)

    def in_a_thread():
        # a thread of its own, so that this test leaves the test process's policy alone
        got["applied"] = use_batch_scheduling("a test thread")
        got["policy"] = os.sched_getscheduler(0)

    t = threading.Thread(target=in_a_thread)
    t.start()
    t.join()
    assert got == {"applied": True, "policy": os.SCHED_BATCH}
    assert os.sched_getscheduler(0) == before

    def refuse(pid, policy, param):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    with caplog.at_level("WARNING", logger="asgi_htag"):
        assert use_batch_scheduling("the web worker") is False
    assert "cannot use SCHED_BATCH for the web worker" in caplog.text

    monkeypatch.delattr(os, "SCHED_BATCH")  # a platform without the policy: nothing to say
    caplog.clear()
    assert use_batch_scheduling("the web worker") is False
    assert caplog.text == ""


@contextlib.contextmanager
def _followed_thread(load):
    """A thread that stands for the worker's event loop: ``load`` attached to it while it
    lives. Yields (whether attach() succeeded, the thread's id); the test process's own
    policy is left alone."""
    box = {}
    ready, done = threading.Event(), threading.Event()

    def run():
        box["attached"] = load.attach()
        box["tid"] = threading.get_native_id()
        ready.set()
        done.wait(30)

    t = threading.Thread(target=run)
    t.start()
    ready.wait(30)
    try:
        yield box["attached"], box["tid"]
    finally:
        done.set()
        t.join()


def test_load_scheduling_switches_its_thread_with_hysteresis_and_never_counts_below_zero():
    load = LoadScheduling(high=3, low=1)
    with _followed_thread(load) as (attached, tid):
        assert attached is True
        _hysteresis(load, tid)


def _hysteresis(load, tid):
    steps = []
    for op in ("s", "s", "s", "f", "s", "f", "f", "f", "f", "f", "s", "s"):
        load.started() if op == "s" else load.finished()
        steps.append((load.inflight, os.sched_getscheduler(tid)))
    B, O = os.SCHED_BATCH, os.SCHED_OTHER
    assert steps == [
        (1, O), (2, O), (3, B),  # at high: batch
        (2, B), (3, B), (2, B),  # between low and high: stays as it is
        (1, O),                  # at low: back
        (0, O), (0, O), (0, O),  # more answers than clicks (a page gone): not below zero
        (1, O), (2, O),
    ]
    load.started()
    load.finished(3)  # a websocket that closes with three clicks in flight
    assert (load.inflight, os.sched_getscheduler(tid), load.switches) == (0, O, 4)
    assert os.sched_getscheduler(0) == O  # the thread that called is not the one switched


def test_load_scheduling_defaults_refusals_and_platforms_without_the_policy(monkeypatch, caplog):
    cpus = len(os.sched_getaffinity(0))
    load = LoadScheduling()
    assert (load.high, load.low) == (2 * cpus, cpus)
    for high, low in ((2, 2), (1, 3), (3, -1)):
        with pytest.raises(ConfigurationError, match="0 <= low < high"):
            LoadScheduling(high=high, low=low)

    def refuse(pid, policy, param):
        raise PermissionError(1, "Operation not permitted")

    load = LoadScheduling(high=1, low=0)
    assert load.attach()
    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    with caplog.at_level("WARNING", logger="asgi_htag"):
        load.started()
        load.finished()
        load.started()
    assert caplog.text.count("cannot switch the web worker's scheduling policy") == 1  # said once, then no more tries
    assert (load.batch, load.switches, load.inflight) == (False, 0, 1)

    monkeypatch.delattr(os, "SCHED_BATCH")
    load = LoadScheduling(high=1, low=0)
    assert load.attach() is False
    load.started()
    assert (load.inflight, load.batch) == (1, False)  # counted, nothing switched


def test_load_scheduling_backs_off_when_the_thread_waits_long_for_a_cpu(monkeypatch):
    """Batched, the followed thread's average wait for a CPU per time slice (from its
    schedstat) is checked every check_seconds; above max_wait_seconds it goes back to
    the default policy and stays there for backoff_seconds, however many interactions
    are in flight."""
    from asgi_htag import config

    clock = [1000.0]
    monkeypatch.setattr(config.time, "monotonic", lambda: clock[0])
    stats = [(0, 0)]
    load = LoadScheduling(high=2, low=0, max_wait_seconds=300e-6, check_seconds=0.25, backoff_seconds=10)
    with _followed_thread(load) as (_, tid):
        _backoff(load, tid, clock, stats, monkeypatch)


def _backoff(load, tid, clock, stats, monkeypatch):
    real = load.schedstat()
    assert real[1] >= 1  # the kernel does tell: this thread has had time slices
    monkeypatch.setattr(load, "schedstat", lambda: stats[0])

    def policy():
        return os.sched_getscheduler(tid)

    load.started(); load.started()
    assert policy() == os.SCHED_BATCH
    stats[0] = (100 * 50_000, 100)  # 50 us per slice: session work, as expected
    clock[0] += 0.3
    load.started()
    assert policy() == os.SCHED_BATCH and load.backoffs == 0
    stats[0] = (100 * 50_000 + 10 * 2_000_000, 110)  # then 2 ms per slice: someone else's CPU
    clock[0] += 0.1
    load.started()
    assert policy() == os.SCHED_BATCH  # not checked before check_seconds have passed
    clock[0] += 0.2
    load.started()
    assert (policy(), load.backoffs) == (os.SCHED_OTHER, 1)
    clock[0] += 9.0
    load.started()
    assert policy() == os.SCHED_OTHER  # held back for backoff_seconds, 6 in flight or not
    for _ in range(6):
        load.finished()
    clock[0] += 1.5
    load.started(); load.started()
    assert policy() == os.SCHED_BATCH  # tried again after the backoff
    assert (load.switches, load.backoffs) == (3, 1)
    load.finished(2)
    assert policy() == os.SCHED_OTHER


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_processes": 0}, "max_processes must be an int >= 1"),
        ({"max_processes": float("inf")}, "max_processes must be an int >= 1"),
        ({"max_processes": True}, "max_processes must be an int >= 1"),
        ({"max_processes": "10"}, "max_processes must be an int >= 1"),
        ({"zygote_grace_seconds": -1}, "zygote_grace_seconds must be"),
        ({"zygote_grace_seconds": float("inf")}, "zygote_grace_seconds must be"),
        ({"zygote_grace_seconds": float("nan")}, "zygote_grace_seconds must be"),
    ],
)
def test_process_limits_out_of_range_are_refused_at_construction(tmp_path, options, message):
    """They would reach the fork server, which a float('inf') used to stop."""
    from asgi_htag import HtagASGI
    from tests.apps import Counter

    with pytest.raises(ConfigurationError, match=message):
        HtagASGI(Counter, state_dir=str(tmp_path), **options)
