"""What the `crystal_structures` builder does to each CIF: tasks, parsing workers, counts.

A `ParseTask` names one CIF (a file, or the bytes of an archive member); workers turn tasks
into `Structure`s and `Skip`s. The split of a task follows from its file stem's family and
the near-copy groups (`cryknn.nearcopies`) the builder's first pass found.

Local builds parse in a pool of spawned processes (`Parser`); Beam builds run
`beam_parse` on the workers. Both feed the same examples, skip rows and element counts.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from cryknn import cif
from cryknn import errors
from cryknn import elements as elements_lib
from cryknn import families
from cryknn import util
from cryknn.datasets.crystal_structures import ENV_WORKERS


@dataclasses.dataclass(frozen=True)
class ParseTask:
    """One CIF to parse.

    Attributes:
      stem: file name without .cif; decides the family and split before parsing.
      source: the file's path, or `<archive>!<member>`; recorded in every result.
      data: the CIF's bytes, or None to read the file at `source`.
    """

    stem: str
    source: str
    data: bytes | None = None

    def split(self, group_of: dict[str, str] | None = None) -> str:
        """The task's split: its family's, or that of the near-copy group it joined."""
        family = families.family_of(self.stem)
        return families.split_of((group_of or {}).get(family, family))


@dataclasses.dataclass(frozen=True)
class ArchiveShard:
    """A Beam task: every `shards`-th CIF of one split of a core-mof archive, from `shard`."""

    version: str
    split: str
    shard: int
    shards: int
    limit: int | None
    group_of: dict[str, str] | None = None  # near-copy groups: {family: group}


def file_tasks(root: str, limit: int | None = None) -> Iterator[ParseTask]:
    """Tasks of the `*.cif` files under root, in `cif.iter_cif_paths` order."""
    for count, path in enumerate(cif.iter_cif_paths([root])):
        if limit is not None and count >= limit:
            return
        yield ParseTask(families.file_stem(os.fspath(path)), os.fspath(path))


def archive_tasks(archive: str, limit: int | None = None, *, label: str | None = None,
                  with_data: bool = True) -> Iterator[ParseTask]:
    """Tasks of the `*.cif` members of a tar archive, sources `<label>!<member>`.

    label defaults to the archive's file name; with_data=False streams names only.
    """
    label = label or os.path.basename(archive)
    for member, data in cif.iter_tar_cifs(archive, limit):
        yield ParseTask(families.file_stem(member), f"{label}!{member}",
                        data if with_data else b"")


def core_mof_tasks(version: str, limit: int | None = None, *, with_data: bool = True
                   ) -> Iterator[ParseTask]:
    """Tasks of the installed core-mof package's `<version>.tar.xz` ('2019-ASR', '2014')."""
    archive = os.fspath(cif.core_mof_archive(version))
    return archive_tasks(archive, limit, with_data=with_data)


def in_split(tasks: Iterable[ParseTask], split: str,
             group_of: dict[str, str] | None = None) -> Iterator[ParseTask]:
    """The tasks whose family (or near-copy group, `group_of`) puts them in `split`."""
    return (task for task in tasks if task.split(group_of) == split)


def stem_of_source(source: str) -> str:
    """The file stem of a task's source: a path, or `<archive>!<member>`."""
    return families.file_stem(source.rsplit("!", 1)[-1])


def parse_task(task: ParseTask, options: cif.ReadOptions | None = None
               ) -> list[cif.Structure | cif.Skip]:
    """Structures and Skips of one task; a reader bug becomes a Skip, never an exception."""
    options = options or cif.ReadOptions()
    try:
        if task.data is None:
            structures, skips = cif.read_cif(task.source, options)
        else:
            structures, skips = cif.read_cif_text(task.data, task.stem, options,
                                                             source=task.source)
    except Exception as e:  # noqa: BLE001 - a reader bug must not end a big build: record it
        return [cif.Skip(task.source, "", f"reader error: {type(e).__name__}: {e}")]
    return list(structures) + list(skips)


def parse_chunk(tasks: Sequence[ParseTask], options: cif.ReadOptions | None = None
                ) -> list[tuple[str, list]]:
    """Worker entry point: (source, results) of each task, in order."""
    return [(task.source, parse_task(task, options)) for task in tasks]


def default_workers() -> int:
    """Parsing processes: $CRYKNN_DATA_WORKERS, else the CPUs this process may use."""
    env = os.environ.get(ENV_WORKERS)
    if env:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Parser:
    """Parses tasks in worker processes (or here when num_workers <= 1), keeping their order.

    `parse(tasks)` yields (source, [Structure | Skip, ...]) per task. At most
    `2 * num_workers` chunks are in flight, so memory does not grow with the number of
    files. Workers are spawned, not forked: the parent runs TensorFlow's threads. A worker
    that dies (killed for memory, or a script that builds at its top level without
    `if __name__ == "__main__":`) ends the build with a DataError instead of waiting forever
    for its chunk (`multiprocessing.Pool` replaces the worker and never answers).
    """

    def __init__(self, num_workers: int, chunk_size: int = 8,
                 options: cif.ReadOptions | None = None):
        self.num_workers = max(0, int(num_workers))
        self.chunk_size = chunk_size
        self.options = options
        self._pool = None
        if self.num_workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(self.num_workers,
                                             mp_context=multiprocessing.get_context("spawn"))

    def parse(self, tasks: Iterable[ParseTask]) -> Iterator[tuple[str, list]]:
        if self._pool is None:
            for task in tasks:
                yield task.source, parse_task(task, self.options)
            return
        pending: collections.deque = collections.deque()
        for chunk in util.chunked(tasks, self.chunk_size):
            pending.append(self._submit(chunk))
            while len(pending) >= 2 * self.num_workers:
                yield from _chunk_results(pending.popleft())
        while pending:
            yield from _chunk_results(pending.popleft())

    def _submit(self, chunk: list[ParseTask]):
        from concurrent.futures.process import BrokenProcessPool

        try:
            return self._pool.submit(parse_chunk, chunk, self.options)
        except BrokenProcessPool as e:
            raise _worker_died() from e

    def close(self) -> None:
        """Stops the workers now, mid-chunk too (an interrupted or failed build does not
        wait for them), as `multiprocessing.Pool.terminate` did."""
        if self._pool is not None:
            workers = list((getattr(self._pool, "_processes", None) or {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for worker in workers:
                worker.terminate()
                worker.join()
            self._pool = None


def _chunk_results(future) -> list[tuple[str, list]]:
    from concurrent.futures.process import BrokenProcessPool

    try:
        return future.result()
    except BrokenProcessPool as e:
        raise _worker_died() from e


def _worker_died() -> errors.DataError:
    return errors.DataError(
        "a CIF parsing worker process died (out of memory, or this script builds the "
        "dataset at its top level: put that code under `if __name__ == \"__main__\":`, "
        f"or set {ENV_WORKERS}=1 to parse in this process)")


# ----------------------------------------------------------------------------
# Examples, skip rows and element counts.


def structure_example(structure: cif.Structure) -> dict:
    """The TFDS example of a Structure (features of `crystal_structures`)."""
    n = int(structure.numbers.shape[0])
    return {
        "id": structure.id,
        "family": families.family_of(structure.id),
        "source": structure.source,
        "lattice": np.asarray(structure.lattice, np.float64).reshape(3, 3),
        "frac": np.asarray(structure.frac, np.float64).reshape(n, 3),
        "numbers": np.asarray(structure.numbers, np.int32).reshape(n),
        "labels": np.asarray([str(s) for s in structure.labels], dtype=object).reshape(n),
        "occupancies": np.asarray(structure.occupancies, np.float32).reshape(n),
        "site_index": np.asarray(structure.site_index, np.int32).reshape(n),
        "num_atoms": np.int32(n),
    }


def skip_row(skip: cif.Skip) -> list[str]:
    return [str(skip.file), str(skip.block), str(skip.reason)]


def removal_rows(structure: cif.Structure) -> list[list[str]]:
    """Rows (structure id, source, policy, atoms) of the atoms reading policies removed."""
    return [[structure.id, structure.source, policy, str(n)]
            for policy, n in structure.removed.items() if n]


def csv_line(row: Sequence[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(row)
    return buf.getvalue()


class ElementCounter:
    """Atoms and structures per atomic number, for one split.

    atoms: (119,) int64 sites per atomic number (index 0 unused);
    structures: (119,) int64 structures containing the element at least once.
    """

    def __init__(self):
        self.atoms = np.zeros(elements_lib.NUM_ELEMENTS + 1, np.int64)
        self.structures = np.zeros(elements_lib.NUM_ELEMENTS + 1, np.int64)
        self.num_structures = 0

    def add(self, numbers: np.ndarray) -> None:
        """Count one structure with (N,) atomic numbers."""
        counts = np.bincount(np.asarray(numbers, np.int64), minlength=self.atoms.shape[0])
        self.atoms += counts
        self.structures += counts > 0
        self.num_structures += 1

    def merge(self, other: "ElementCounter") -> "ElementCounter":
        self.atoms += other.atoms
        self.structures += other.structures
        self.num_structures += other.num_structures
        return self

    @classmethod
    def merged(cls, counters: Iterable["ElementCounter"]) -> "ElementCounter":
        total = cls()
        for c in counters:
            total.merge(c)
        return total

    def to_json(self) -> dict:
        """{'structures', 'atoms', 'elements': {symbol: {'atoms', 'structures'}}}, most atoms first."""
        order = sorted(np.nonzero(self.atoms)[0].tolist(), key=lambda z: (-self.atoms[z], z))
        return {
            "structures": int(self.num_structures),
            "atoms": int(self.atoms.sum()),
            "elements": {elements_lib.symbol(z): {"atoms": int(self.atoms[z]),
                                                  "structures": int(self.structures[z])}
                         for z in order},
        }


def write_stats_json(counter: ElementCounter, path: str) -> None:
    from etils import epath  # local paths and gs:// alike

    epath.Path(path).write_text(json.dumps(counter.to_json(), indent=1))


# --- Beam workers (apache_beam imported only on the workers that run these) ---------------


def beam_parse(chunk: Sequence[ParseTask | ArchiveShard],
               options: cif.ReadOptions | None = None) -> Iterator[Any]:
    """Beam FlatMap: (key, example) per structure; TaggedOutput('skips', row) per skip and
    TaggedOutput('removed', row) per policy that removed atoms of a structure.

    A chunk holds file tasks, or one ArchiveShard: stream that core-mof archive and parse
    every shards-th member of its split.
    """
    import apache_beam as beam

    for item in chunk:
        if isinstance(item, ArchiveShard):
            members = in_split(core_mof_tasks(item.version, item.limit), item.split,
                               item.group_of)
            tasks: Iterable[ParseTask] = (t for i, t in enumerate(members)
                                          if i % item.shards == item.shard)
        else:
            tasks = [item]
        for task in tasks:
            for i, result in enumerate(parse_task(task, options)):
                if isinstance(result, cif.Skip):
                    yield beam.pvalue.TaggedOutput("skips", skip_row(result))
                else:
                    for row in removal_rows(result):
                        yield beam.pvalue.TaggedOutput("removed", row)
                    yield f"{task.source}#{i}", structure_example(result)


def counter_of_example(key_example: tuple[str, dict]) -> ElementCounter:
    counter = ElementCounter()
    counter.add(key_example[1]["numbers"])
    return counter
