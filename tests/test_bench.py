"""The benchmark's smoke run (``python bench/run.py --quick``) still runs end to end, and
what it checks besides speed holds: every interaction answered, none lost, every burst
GET served, every live session answering, servers stopped with nothing left behind and
nothing logged at warning level. No duration is asserted: speed is judged by the
benchmark's printed ratios, not here."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.server


def test_quick_benchmark_runs_and_loses_nothing(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "targets:" in proc.stdout
    res = json.loads(out.read_text())

    assert {"interact", "unix", "processes"} <= set(res["floors"])
    assert set(res["floors"]["processes"]) == {"1", "10", "50"}
    assert len(res["targets"]) >= 8 and all(isinstance(t["pass"], bool) for t in res["targets"])

    for name in ("asgi_htag", "inprocess"):
        r = res[name]
        for kind in ("ws", "http"):
            assert r[kind]["n"] > 0 and r[kind]["bad_answers"] == 0, (name, kind)
        assert r["ws"]["final_count_ok"], f"{name}: a click was lost"
        assert r["hol"]["bad_answers"] == 0
        assert set(r["hol"]["burst_statuses"]) == {"200"}, r["hol"]["burst_statuses"]
        # one quiet reference per burst round, over as many clicks as that round's window
        assert len(r["hol"]["quiet_worst_per_round_ms"]) == len(r["hol"]["clicks_per_window"]) == res["params"]["hol_rounds"]
        assert sum(r["hol"]["clicks_per_window"]) == r["hol"]["clicks_in_window"] > 0
        assert [t["sessions"] for t in r["throughput"]] == [1, 10, 50]
        assert all(t["bad_answers"] == 0 and t["interactions_per_s"] > 0 for t in r["throughput"])
        for m in r["memory"]:
            assert m["answered"] == m["sessions"], (name, m["sessions"], m.get("failures"))
    # floor (e), the bare process-per-session runner: its round trips and throughput
    bare = res["bare"]
    for kind in ("ws", "http"):
        assert bare[kind]["n"] == res["asgi_htag"][kind]["n"] > 0 and bare[kind]["bad_answers"] == 0, kind
    assert bare["ws"]["final_count_ok"], "floor (e): a click was lost"
    assert [t["sessions"] for t in bare["throughput"]] == [1, 10, 50]
    assert all(t["bad_answers"] == 0 and t["interactions_per_s"] > 0 for t in bare["throughput"])
    # each of its sessions in a process of its own, counted by the throughput windows
    assert len(bare["throughput"][-1]["cpu_by_pid"]) >= 1 + 50
    assert "floor (e) bare process per session: throughput, 50 session(s)" in proc.stdout
    assert res["asgi_htag"]["hol_ping"]["bad_answers"] == 0
    # the default run measures the defaults: the worker's policy left alone throughout
    assert res["asgi_htag"]["worker_batch_scheduling"] is False
    assert res["asgi_htag"]["worker_batch_at_rest"] is False
    assert set(res["asgi_htag"]["worker_policy_switches"].values()) == {0}, res["asgi_htag"]["worker_policy_switches"]
    assert all(m["child_uss_mb_mean"] > 0 for m in res["asgi_htag"]["memory"])
    used = res["asgi_htag"]["memory"][0]["after_clicks"]  # the first level, used as well as opened
    assert used["clicks_each"] == res["params"]["mem_used_clicks"] + 2
    assert used["bad_answers"] == 0 and used["child_uss_mb_mean"] > 0

    assert set(res["servers"]) == {"inprocess", "asgi_htag", "bare", "asgi_htag-memory"}
    for name, info in res["servers"].items():
        assert info["stop"]["left"] == [], f"{name} left processes behind: {info['stop']}"
        assert info["log_issue_count"] == 0, f"{name}: {info['log_issues']}"
