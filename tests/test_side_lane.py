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


def test_a_commands_job_runs_its_commands_side_by_side(tmp_path):
    """The first command waits for a file the second writes (run one after the other, it
    would time out); output of any size goes to files; '{free_port}' becomes a port."""
    flag = tmp_path / "flag"
    wait = (f"import pathlib, time\nwhile not pathlib.Path({str(flag)!r}).exists(): "
            f"time.sleep(0.05)\nprint('saw it')")
    write = (f"import pathlib, sys\npathlib.Path({str(flag)!r}).touch()\n"
             f"sys.stderr.write('x' * 200000)\nprint(sys.argv[1])\nraise SystemExit(3)")
    lane = side_lane.SideLane()
    try:
        done = lane.result("both", lambda folder: side_lane.commands_job(
            folder, [[sys.executable, "-c", wait],
                     [sys.executable, "-c", write, "port {free_port}"]], {}, folder, 60))
        first, second = done.commands()
    finally:
        lane.stop()
    assert first.returncode == 0 and first.stdout == "saw it\n"
    assert second.returncode == 3 and second.stderr == "x" * 200000
    assert second.stdout.split()[0] == "port" and int(second.stdout.split()[1]) > 0
