"""The suite's side lane (tests/side_lane.py): jobs run in order, once, and a job that
fails to start, fails or runs too long fails only the test that waits for it."""

from __future__ import annotations

import sys

import pytest

from tests import side_lane


def _python(code: str, timeout: float = 60):
    return lambda folder: side_lane.Job([sys.executable, "-c", code], {}, folder, timeout)


def test_jobs_run_once_in_order_each_in_its_own_folder():
    lane = side_lane.SideLane()
    try:
        first = _python("import time; print(time.time())")
        second = _python("import time; print(time.time())")
        lane.submit("first", first)
        lane.submit("second", second)
        lane.submit("first", second)  # a name is queued once
        a, b = lane.result("first", first), lane.result("second", second)
        assert a.result.returncode == 0 and b.result.returncode == 0
        assert float(a.result.stdout) <= float(b.result.stdout)
        assert a.folder != b.folder and a.folder.is_dir()
    finally:
        lane.stop()
    assert not a.folder.exists()  # removed when the session ends


def test_a_broken_or_slow_job_fails_only_its_own_test():
    lane = side_lane.SideLane()

    def broken(folder):
        raise ValueError("no data")

    try:
        lane.submit("broken", broken)
        with pytest.raises(ValueError, match="no data"):
            lane.result("broken", broken)
        slow = _python("import time; time.sleep(30)", timeout=0.5)
        with pytest.raises(Exception, match="timed out"):
            lane.result("slow", slow)
        done = lane.result("after", _python("raise SystemExit(3)"))
        assert done.result.returncode == 3
    finally:
        lane.stop()
