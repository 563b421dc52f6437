"""Small helpers every layer uses: one-line messages, chunking, atomic file writes.

Atomic writes: every file a cryknn tool writes goes to a temporary file in the same folder
first and is renamed over the target only when complete, so a crash or `kill -9` leaves
either the old file or the new one, never a truncated one.

This module imports nothing from cryknn.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")


def one_line(text: object, limit: int | None = None) -> str:
    """`text` with all runs of white space (newlines included) folded to one space,
    cut to `limit` characters with '...' when longer."""
    line = " ".join(str(text).split())
    if limit is not None and len(line) > limit:
        line = line[: limit - 3] + "..."
    return line


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class UnsafeOutputError(OSError):
    """An output path that is not (and may not become) a plain regular file: a device, a
    FIFO, a folder or a symbolic link. cryknn never replaces such a thing."""


TEMP_MARK = "cryknn-partial"  # in every temporary file's name: '.<name>.cryknn-partial-<pid>.*'


def check_output_path(path: str | os.PathLike) -> None:
    """Raise UnsafeOutputError unless `path` is absent or an existing regular file (a
    symbolic link is refused even to a regular file: the write would replace the link)."""
    import stat

    path = os.fspath(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise UnsafeOutputError(f"{path} is a symbolic link: name the file it points to, "
                                f"cryknn does not replace links")
    if not stat.S_ISREG(mode):
        raise UnsafeOutputError(f"{path} exists and is not a regular file (a folder, device "
                                f"or FIFO): cryknn writes only regular files")


def remove_stale_temporaries(path: str | os.PathLike) -> int:
    """Removes the temporary files that writers of `path` killed mid-write (kill -9, power
    loss) left beside it: '.<name>.cryknn-partial-<pid>.*' whose process is gone.
    Returns how many were removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}.{TEMP_MARK}-"
    removed = 0
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix)]
    except OSError:
        return 0
    for name in names:
        pid = name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
                removed += 1
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's) or cannot tell: leave its file alone
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """A temporary path beside `path`; renamed to `path` when the block ends without error,
    removed otherwise. `suffix` keeps an extension that a writer insists on (numpy adds
    '.npz' to names without it).

    Only regular files are written: `path` may not be a symbolic link, device, FIFO or
    folder (UnsafeOutputError, checked before and again just before the rename). The
    temporary file is named '.<name>.cryknn-partial-<pid>.<random>.tmp'; ones left by
    killed writers are removed the next time `path` is written."""
    path = os.fspath(path)
    check_output_path(path)
    remove_stale_temporaries(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{TEMP_MARK}-{os.getpid()}.",
                               suffix=f".tmp{suffix}", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give what open() would
        check_output_path(path)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[Any]:
    """open() for writing whose result appears at `path` only once fully written."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def finite_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> None:
    """Writes strictly valid JSON atomically: NaN and infinities become null."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(finite_json(value), f, indent=indent, allow_nan=False)
        f.write("\n")


@contextlib.contextmanager
def stderr_silenced() -> Iterator[None]:
    """Silences file descriptor 2 inside the block: the C++ start-up logging of native
    libraries (TensorFlow's oneDNN notice, absl's pre-init warning) bypasses Python."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr (embedded, captured)
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class ProgressBar:
    """A tqdm bar on stderr, created at the first update(done, total) (total known then);
    `unit` names what is counted."""

    def __init__(self, unit: str = "file"):
        self.unit = unit
        self._bar = None

    def update(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=self.unit, file=sys.stderr, dynamic_ncols=True)
        self._bar.update(done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
