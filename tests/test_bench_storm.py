"""bench/storm.py (W5, the reconnect storm) still works against this source tree.

A small storm: 200 clients connect and join, chat, are drained by SIGTERM
(close 1001), and all come back to the restarted daemon, resuming with
``since`` exactly what they missed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(90)
def test_storm_200_clients_all_back_and_resumed(tmp_path: Path) -> None:
    out = tmp_path / "storm.jsonl"
    argv = [sys.executable, str(ROOT / "bench" / "storm.py"), "-n", "200", "--out", str(out)]
    argv += ["--backoff-cap", "4", "--drain-timeout", "4", "--timeout", "40"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=80)
    assert done.returncode == 0, done.stdout + done.stderr
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == line  # --out appends the same line
    assert line["failures"] == 0 and line["pass"] is True, line
    assert (line["conns_ok"], line["conns_failed"]) == (200, 0)
    assert line["drain_close_codes"] == {"1001": 200} and line["drain_exit_status"] == 0
    assert line["not_back"] == 0 and line["back_all_s"] is not None
    assert (line["resume_wrong"], line["resume_gaps"], line["resume_dups"]) == (0, 0, 0)
    assert line["resumed_all_s"] is not None
    assert line["away_rooms"] > 0 and line["resumed_msgs"] > 0  # resume had something to deliver
    assert line["server_cpu_ms_per_conn"] > 0
    assert "PASS" in done.stderr


@pytest.mark.timeout(90)
def test_storm_on_a_socket_activated_port_refuses_no_reconnect(tmp_path: Path) -> None:
    """With the port held across the restart (chatd.socket), clients that come
    back while chatd drains wait for the next process: one attempt each."""
    argv = [sys.executable, str(ROOT / "bench" / "storm.py"), "-n", "200", "--socket-activation"]
    argv += ["--backoff", "full-jitter", "--drain-timeout", "4", "--timeout", "40"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=80)
    assert done.returncode == 0, done.stdout + done.stderr
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["socket_activation"] is True and line["pass"] is True, line
    assert line["drain_close_codes"] == {"1001": 200} and line["not_back"] == 0
    assert line["reconnect_refusals"] == {} and line["reconnect_attempts_max"] == 1, line
    assert (line["resume_wrong"], line["resume_gaps"], line["resume_dups"]) == (0, 0, 0)
