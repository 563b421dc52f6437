"""A second lane for the suite: child processes that tests only wait for (a dataset build,
a tool run end to end, an 8-device run) are started as soon as collection shows their
tests are selected, and run one after another beside the in-process tests.

The suite mostly keeps one core busy (compiling, or waiting on one child); on two cores
these children then cost little wall time. A test marked

    @pytest.mark.side_lane(job=make_job)     # make_job(folder: Path) -> Job

gets its child's result from the `side_job` fixture (conftest.py); `folder` is a fresh
directory for the child's files, kept until the session ends.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable


@dataclasses.dataclass
class Job:
    """What to run: argv with env in cwd, killed after `timeout` seconds."""

    argv: list[str]
    env: dict
    cwd: Path
    timeout: float = 600.0


# A job of several commands run side by side or in turn (`commands_job`): each one's output
# goes to files, not pipes, so a chatty command never waits for another to be read.
_COMMANDS = """
import json, socket, subprocess, sys
from pathlib import Path
folder, commands, side_by_side = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3] == "1"
with socket.socket() as s:  # a free port, for commands that need one ('{free_port}')
    s.bind(("localhost", 0))
    port = str(s.getsockname()[1])
procs = []
for i, argv in enumerate(commands):
    out, err = folder / f"command{i}.out", folder / f"command{i}.err"
    with open(out, "w") as out, open(err, "w") as err:
        procs.append(subprocess.Popen([a.replace("{free_port}", port) for a in argv],
                                      stdout=out, stderr=err))
    if not side_by_side:
        procs[-1].wait()
(folder / "returncodes.json").write_text(json.dumps([p.wait() for p in procs]))
"""


def commands_job(folder: Path, commands: list[list[str]], env: dict, cwd: Path,
                 timeout: float = 600.0, side_by_side: bool = True) -> Job:
    """A job running `commands` (argvs) side by side (or one after another), all in env and
    cwd; `Done.commands` gives their results. '{free_port}' in an argument becomes one free
    local port."""
    return Job([sys.executable, "-c", _COMMANDS, str(folder), json.dumps(commands),
                "1" if side_by_side else "0"], env, cwd, timeout)


@dataclasses.dataclass
class Done:
    """A finished job: its process's output, and the folder it was given."""

    result: subprocess.CompletedProcess
    folder: Path

    def commands(self) -> list[subprocess.CompletedProcess]:
        """The results of a `commands_job`'s commands, in order (returncode, stdout,
        stderr); raises if the job itself failed."""
        if self.result.returncode != 0:
            raise RuntimeError(f"the side-lane job failed: {self.result.stderr[-3000:]}")
        codes = json.loads((self.folder / "returncodes.json").read_text())
        return [subprocess.CompletedProcess(
            [], code, (self.folder / f"command{i}.out").read_text(errors="replace"),
            (self.folder / f"command{i}.err").read_text(errors="replace"))
            for i, code in enumerate(codes)]


class SideLane:
    """One worker thread that runs submitted jobs in order; `result` waits for one."""

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        self._futures: dict[str, Future] = {}
        self._folders: list[Path] = []
        self._running: subprocess.Popen | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.seconds: dict[str, float] = {}  # wall seconds of each finished job

    def submit(self, name: str, make_job: Callable[[Path], Job]) -> None:
        """Queue `make_job`'s job under `name` (once; later submissions are ignored)."""
        if name in self._futures:
            return
        folder = Path(tempfile.mkdtemp(prefix=f"cryknn_side_{name.replace('/', '_')}_"))
        self._folders.append(folder)
        future: Future = Future()
        self._futures[name] = future
        try:
            job = make_job(folder)
        except Exception as e:  # the test that waits for it fails, not the collection
            future.set_exception(e)
            return
        self._jobs.put((name, job, folder, future))
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="side-lane", daemon=True)
            self._thread.start()

    def result(self, name: str, make_job: Callable[[Path], Job]) -> Done:
        """The finished job `name` (submitted now if collection did not)."""
        self.submit(name, make_job)
        return self._futures[name].result()

    def _work(self) -> None:
        while not self._stopped.is_set():
            try:
                name, job, folder, future = self._jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            if not future.set_running_or_notify_cancel():
                continue
            start = time.monotonic()
            try:
                future.set_result(Done(self._run(job), folder))
            except BaseException as e:  # the waiting test reports it
                future.set_exception(e)
            self.seconds[name] = time.monotonic() - start

    def _run(self, job: Job) -> subprocess.CompletedProcess:
        # Its own process group: worker processes it starts end with it.
        proc = subprocess.Popen(job.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=job.env, cwd=job.cwd, start_new_session=True)
        self._running = proc
        try:
            out, err = proc.communicate(timeout=job.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        finally:
            self._running = None
        return subprocess.CompletedProcess(job.argv, proc.returncode, out, err)

    def stop(self) -> None:
        """End the session: cancel queued jobs, stop the running one, remove the folders."""
        self._stopped.set()
        for future in self._futures.values():
            future.cancel()
        proc = self._running
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        if self._thread is not None:
            self._thread.join(timeout=30)
        for folder in self._folders:
            shutil.rmtree(folder, ignore_errors=True)
