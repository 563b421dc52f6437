"""Datasets of crystal structures: families, splits, building, loading, and the data CLI.

  python -m cryknn.data build --dataset=crystal_structures/core_mof_2019_asr [--data_dir=DIR]
  python -m cryknn.data build --dataset=crystal_structures/cif_dir --manual_dir=DIR [--data_dir=DIR]
  python -m cryknn.data stats --dataset=crystal_structures/CONFIG [--data_dir=DIR] [--out=F.png]

The TFDS builder lives in `cryknn/datasets/crystal_structures/`; this module holds what it
and the training job share: the family rule (`family_of`), the split rule (`split_of`),
element statistics, the CIF-parsing workers, and `build` / `load_split` / `element_stats`.

This module imports TensorFlow and TFDS only inside the functions that need them, so
`family_of` and the parsing workers stay cheap to import (worker processes import it).
Files written beside a built dataset (`<data_dir>/crystal_structures/<config>/<version>/`):
  skipped.csv         file, block, reason: everything the reader could not read
  element_stats.json  per split: structures, atoms, and atoms/structures per element symbol
  build_info.json     what was built from (manual_dir, limit), counts, seconds taken
"""

from __future__ import annotations

import collections
import contextlib
import csv
import hashlib
import io
import json
import os
import re
import sys
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from cryknn import elements as elements_lib

DATASET_NAME = "crystal_structures"
CONFIG_NAMES = ("core_mof_2019_asr", "core_mof_2014", "cif_dir")
DEFAULT_DATASET = f"{DATASET_NAME}/core_mof_2019_asr"
SPLITS = ("train", "validation", "test")
# Per-mille buckets of the family hash: [0, 800) train, [800, 900) validation, [900, 1000) test.
SPLIT_BOUNDS = (("train", 800), ("validation", 900), ("test", 1000))

SKIPPED_CSV = "skipped.csv"
ELEMENT_STATS_JSON = "element_stats.json"
BUILD_INFO_JSON = "build_info.json"
SKIP_FIELDS = ("file", "block", "reason")

# Environment variables read by the builder (a builder kwarg of the same name wins).
ENV_LIMIT = "CRYKNN_DATA_LIMIT"  # read only the first N CIF files / archive members
ENV_WORKERS = "CRYKNN_DATA_WORKERS"  # parsing processes (0 or 1: parse in this process)


class DatasetError(Exception):
    """A dataset cannot be built or read as asked (bad name, missing folder, not built...)."""


# ----------------------------------------------------------------------------
# Families and splits.

_REFCODE = re.compile(r"^([A-Z]{6})(?![A-Za-z])")
_DEPOSITION = re.compile(r"^(\d{5,})(?!\d)")
_CORE_SUFFIXES = re.compile(
    r"(?:_(?:clean(?:_h(?:_min)?|_b|5b)?|charged|SL(?:_part)?|manual|ion_b|auto"
    r"|neutral(?:_b|_5b)?|uncharged_b|freeONLY))+$")
_EMBEDDED_REFCODE = re.compile(r"(?:^|_)([A-Z]{6})(?:\d{2}|\d{5,})?(?=_|$)")
_PUBLICATION = re.compile(r"^([a-z][a-z0-9.]*\d[a-z0-9.]*|S\d{10,})_.")


def family_of(structure_id: str) -> str:
    """The family of a structure: structures of one family always land in the same split.

    `structure_id` is `<file stem>:<block>` (a bare file stem works too); only the file stem
    counts, so all blocks of one file are one family. Rules, first match wins:

    1. CSD refcode: a stem that starts with six capital letters not followed by another
       letter is a CSD entry; the family is those six letters. ABAVIJ, ABAVIJ01,
       ABAVIJ_clean, ABAVIJ01_charged and ABAVIJ_clean_h are all family "ABAVIJ".
    2. Deposition number: a stem that starts with five or more digits (COD ids, CCDC
       deposition numbers) has that number as its family: "1000002-test-hall" and
       "1000002-test-hm" are family "1000002"; "4300123" is "4300123";
       "1499489-acs.cgd.6b01265_1499490_clean" is "1499489".
    3. Otherwise CoRE MOF processing suffixes are removed from the end of the stem
       (_clean, _clean_h, _clean_h_min, _clean_b, _clean5b, _charged, _SL, _SL_part,
       _manual, _ion_b, _auto, _neutral, _neutral_b, _neutral_5b, _uncharged_b, _freeONLY,
       any number of them), and then:
       a. a refcode embedded as an underscore-separated token (six capitals, optionally
          followed by 2 digits or by a 5+ digit deposition number) is the family:
          "acs.cgd.5b01554_VAGNUP1452791_clean" is family "VAGNUP";
       b. a name of the form `<publication>_<item>`, where <publication> is a journal
          manuscript or DOI-suffix identifier (starts with a lowercase letter, only
          lowercase letters, digits and dots, at least one digit; or an IUCr "S" + 10 or
          more digits), has the publication as its family, so the structures of one paper's
          supporting information stay together: "ic501898x_si_004_clean" and
          "ic501898x_si_005_clean" are family "ic501898x",
          "acscombsci.5b00188_8372_clean" is "acscombsci.5b00188";
       c. anything else is its own family: the stem without those suffixes
          ("006_ethylnitramine", "mof_001", "UiO66").
    """
    stem = structure_id.split(":", 1)[0]
    if not stem:
        raise ValueError(f"structure id {structure_id!r} has an empty file stem")
    m = _REFCODE.match(stem) or _DEPOSITION.match(stem)
    if m:
        return m.group(1)
    base = _CORE_SUFFIXES.sub("", stem) or stem
    m = _EMBEDDED_REFCODE.search(base)
    if m:
        return m.group(1)
    m = _PUBLICATION.match(base)
    if m:
        return m.group(1)
    return base


def split_of(family: str) -> str:
    """'train', 'validation' or 'test' (80/10/10) from a stable hash of the family name.

    The first 8 bytes of sha256(family, UTF-8) as a big-endian integer, modulo 1000, pick
    the bucket: [0, 800) train, [800, 900) validation, [900, 1000) test. The result never
    depends on the run, the machine, or which other structures are in the dataset.
    """
    bucket = int.from_bytes(hashlib.sha256(family.encode("utf-8")).digest()[:8], "big") % 1000
    for name, bound in SPLIT_BOUNDS:
        if bucket < bound:
            return name
    raise AssertionError("unreachable")


def split_of_id(structure_id: str) -> str:
    """Split of a structure id or file stem: `split_of(family_of(structure_id))`."""
    return split_of(family_of(structure_id))


def file_stem(path: str) -> str:
    """File name without folder and .cif extension: 'a/b/ABAVIJ_clean.cif' -> 'ABAVIJ_clean'.

    Only a .cif extension (any case) is removed: dots inside DOI-like names stay.
    """
    name = os.fspath(path).replace("\\", "/").rsplit("/", 1)[-1]
    return name[: -len(".cif")] if name.lower().endswith(".cif") else name


# ----------------------------------------------------------------------------
# Element statistics.


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


def top_elements(stats: dict, n: int, split: str = "train") -> list[str]:
    """The n element symbols with the most atoms in `split` of an element_stats() dict.

    Ties go to the lower atomic number (the order of element_stats.json).
    """
    table = stats["splits"].get(split, {}).get("elements", {})
    ranked = sorted(table, key=lambda e: (-table[e]["atoms"], elements_lib.atomic_number(e)))
    return ranked[:n]


# ----------------------------------------------------------------------------
# Reading CIFs: what the builder hands to the parsing workers.
#
# A task is ("file", path) or ("text", member_name, data_bytes, source); workers turn a
# list of tasks into a list of (task_index, Structure | Skip) results.


def core_mof_archive(version: str) -> str:
    """Path of the installed core-mof package's `<version>.tar.xz` ('2019-ASR', '2014')."""
    from cryknn import structures as structures_lib

    try:
        return os.fspath(structures_lib.core_mof_archive(version))
    except structures_lib.DataNotFoundError as e:
        raise DatasetError(str(e)) from None


def iter_archive_members(archive: str, limit: int | None = None, *, label: str | None = None
                         ) -> Iterator[tuple[str, bytes, str]]:
    """Streams (member stem, bytes, source) of the `*.cif` members of a tar archive.

    The members of `cryknn.structures.iter_tar_cifs` (so the same as `iter_core_mof`);
    source is `<label>!<member>`, label defaulting to the archive's file name.
    """
    from cryknn import structures as structures_lib

    label = label or os.path.basename(archive)
    for member, data in structures_lib.iter_tar_cifs(archive, limit):
        yield file_stem(member), data, f"{label}!{member}"


def iter_cif_files(root: str, limit: int | None = None) -> Iterator[str]:
    """Streams the paths of the `*.cif` files under root, as `cryknn.structures.iter_cif_paths`."""
    from cryknn import structures as structures_lib

    for count, path in enumerate(structures_lib.iter_cif_paths([root])):
        if limit is not None and count >= limit:
            return
        yield os.fspath(path)


def task_stem(task: tuple) -> str:
    """File stem of a task (for its family and split before it is parsed)."""
    return file_stem(task[1]) if task[0] == "file" else task[1]


def task_key(task: tuple) -> str:
    """Where a task's CIF comes from: its path, or `archive!member`."""
    return task[1] if task[0] == "file" else task[3]


def skip_type() -> type:
    from cryknn import structures as structures_lib

    return structures_lib.Skip


def parse_task(task: tuple, options: Any = None) -> list:
    """Structures and Skips of one task ("file", path) or ("text", stem, data, source)."""
    from cryknn import structures as structures_lib

    options = options or structures_lib.ReadOptions()
    try:
        if task[0] == "file":
            structures, skips = structures_lib.read_cif(task[1], options)
        else:
            _, stem, data, source = task
            structures, skips = structures_lib.read_cif_text(data, stem, options, source=source)
    except Exception as e:  # noqa: BLE001 - a reader bug must not end a big build: record it
        return [structures_lib.Skip(task_key(task), "",
                                    f"reader error: {type(e).__name__}: {e}")]
    return list(structures) + list(skips)


def parse_chunk(tasks: Sequence[tuple]) -> list[tuple[str, list]]:
    """Worker entry point: (task_key, results) of each task, in order."""
    return [(task_key(task), parse_task(task)) for task in tasks]


class Parser:
    """Parses tasks in worker processes (or here when num_workers <= 1), keeping their order.

    `parse(tasks)` yields (task_key, [Structure | Skip, ...]) per task. At most
    `2 * num_workers` chunks are in flight, so memory does not grow with the number of
    files. Workers are spawned, not forked: the parent runs TensorFlow's threads.
    """

    def __init__(self, num_workers: int, chunk_size: int = 8):
        self.num_workers = max(0, int(num_workers))
        self.chunk_size = chunk_size
        self._pool = None
        if self.num_workers > 1:
            import multiprocessing

            self._pool = multiprocessing.get_context("spawn").Pool(self.num_workers)

    def parse(self, tasks: Iterable[tuple]) -> Iterator[tuple[str, list]]:
        if self._pool is None:
            for task in tasks:
                yield task_key(task), parse_task(task)
            return
        pending = collections.deque()
        chunk = []
        for task in tasks:
            chunk.append(task)
            if len(chunk) >= self.chunk_size:
                pending.append(self._pool.apply_async(parse_chunk, (chunk,)))
                chunk = []
                while len(pending) >= 2 * self.num_workers:
                    yield from pending.popleft().get()
        if chunk:
            pending.append(self._pool.apply_async(parse_chunk, (chunk,)))
        while pending:
            yield from pending.popleft().get()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


def iter_split_tasks(tasks: Iterable[tuple], split: str) -> Iterator[tuple]:
    """The tasks whose file name puts them in `split`."""
    for task in tasks:
        if split_of_id(task_stem(task)) == split:
            yield task


def archive_tasks(version: str, limit: int | None = None, *, with_data: bool = True
                  ) -> Iterator[tuple]:
    """("text", name, data, source) tasks of a core-mof archive (data b"" if not with_data)."""
    for name, data, source in iter_archive_members(core_mof_archive(version), limit):
        yield ("text", name, data if with_data else b"", source)


# --- Beam workers (apache_beam imported only on the workers that run these) ---------------


def beam_parse_tasks(chunk: Sequence[tuple]) -> Iterator[Any]:
    """Beam FlatMap: (key, example) per structure; TaggedOutput('skips', row) per skip.

    A chunk holds ("file", path) tasks, or one ("archive", version, split, shard, shards,
    limit) task: stream that core-mof archive and parse every shards-th member of split.
    """
    import apache_beam as beam

    Skip = skip_type()
    for task in chunk:
        if task[0] == "archive":
            _, version, split, shard, shards, limit = task
            members = iter_split_tasks(archive_tasks(version, limit), split)
            tasks = (t for i, t in enumerate(members) if i % shards == shard)
        else:
            tasks = [task]
        for t in tasks:
            for i, result in enumerate(parse_task(t)):
                if isinstance(result, Skip):
                    yield beam.pvalue.TaggedOutput("skips", skip_row(result))
                else:
                    yield f"{task_key(t)}#{i}", structure_example(result)


def counter_of_example(key_example: tuple[str, dict]) -> ElementCounter:
    counter = ElementCounter()
    counter.add(key_example[1]["numbers"])
    return counter


def write_stats_json(counter: ElementCounter, path: str) -> None:
    from etils import epath  # local paths and gs:// alike

    epath.Path(path).write_text(json.dumps(counter.to_json(), indent=1))


def default_workers() -> int:
    env = os.environ.get(ENV_WORKERS)
    if env:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def structure_example(structure: Any) -> dict:
    """The TFDS example of a Structure (features of `crystal_structures`)."""
    n = int(structure.numbers.shape[0])
    return {
        "id": structure.id,
        "family": family_of(structure.id),
        "source": structure.source,
        "lattice": np.asarray(structure.lattice, np.float64).reshape(3, 3),
        "frac": np.asarray(structure.frac, np.float64).reshape(n, 3),
        "numbers": np.asarray(structure.numbers, np.int32).reshape(n),
        "labels": np.asarray([str(s) for s in structure.labels], dtype=object).reshape(n),
        "occupancies": np.asarray(structure.occupancies, np.float32).reshape(n),
        "num_atoms": np.int32(n),
    }


def skip_row(skip: Any) -> list[str]:
    return [str(skip.file), str(skip.block), str(skip.reason)]


def csv_line(row: Sequence[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(row)
    return buf.getvalue()


# ----------------------------------------------------------------------------
# Dataset names, building and loading (TFDS imported here only).


def parse_dataset_name(dataset: str) -> tuple[str, str, str | None]:
    """'crystal_structures/CONFIG[:VERSION]' -> (name, config, version); DatasetError if bad."""
    name, _, rest = (dataset or "").partition("/")
    config, _, version = rest.partition(":")
    if name != DATASET_NAME or config not in CONFIG_NAMES:
        raise DatasetError(
            f"unknown dataset {dataset!r}: expected {DATASET_NAME}/CONFIG with CONFIG one of "
            f"{', '.join(CONFIG_NAMES)}")
    return name, config, version or None


@contextlib.contextmanager
def _stderr_silenced():
    """Silences file descriptor 2 (C++ logging of native libraries) inside the block."""
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


def import_tfds():
    """tensorflow_datasets, importing TensorFlow first without its start-up chatter on stderr."""
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        with _stderr_silenced():
            import tensorflow  # noqa: F401
    import tensorflow_datasets as tfds

    return tfds


def get_builder(dataset: str, data_dir: str | None = None, **builder_kwargs):
    """The TFDS builder of `dataset` (registers `crystal_structures` first)."""
    parse_dataset_name(dataset)
    tfds = import_tfds()

    import cryknn.datasets  # noqa: F401  (registers crystal_structures)

    return tfds.builder(dataset, data_dir=data_dir, **builder_kwargs)


def is_built(builder) -> bool:
    return os.path.isfile(os.path.join(builder.data_dir, "dataset_info.json"))


def _check_build_info(builder, manual_dir: str | None, limit: int | None) -> None:
    """Refuse to reuse a cif_dir build made from another folder, or a limited build."""
    info = read_build_info(builder.data_dir)
    if not info:
        return
    if manual_dir and info.get("manual_dir") not in (None, os.path.abspath(manual_dir)):
        raise DatasetError(
            f"{builder.data_dir} was built from {info.get('manual_dir')}, not {manual_dir}: "
            "use another --data_dir, or --overwrite")
    if limit is not None and limit != info.get("limit"):
        raise DatasetError(
            f"{builder.data_dir} was built with limit={info.get('limit')}, not {limit}: "
            "use another --data_dir, or --overwrite")


def read_build_info(dataset_dir: str) -> dict:
    path = os.path.join(dataset_dir, BUILD_INFO_JSON)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def build(dataset: str = DEFAULT_DATASET, data_dir: str | None = None, *,
          manual_dir: str | None = None, limit: int | None = None,
          num_workers: int | None = None, beam_runner: Any = None, beam_options: Any = None,
          overwrite: bool = False, log=print):
    """Builds `dataset` in data_dir (unless already built) and returns its TFDS builder.

    manual_dir: the CIF folder tree for `cif_dir` (required there, ignored otherwise).
    limit: read only the first `limit` CIF files / archive members (tests, smoke runs).
    num_workers: parsing processes (default: the CPUs this process may use).
    beam_runner / beam_options: build as an Apache Beam pipeline (e.g. 'DirectRunner', or
      PipelineOptions for Dataflow/Flink/Spark); needs `pip install apache-beam`.
    Prints the skip summary through `log`. Raises DatasetError for anything the user can fix.
    """
    _, config, _ = parse_dataset_name(dataset)
    if config == "cif_dir":
        if not manual_dir:
            raise DatasetError(f"{dataset} needs --manual_dir=DIR, the folder tree of CIF files")
        if not os.path.isdir(manual_dir):
            raise DatasetError(f"--manual_dir {manual_dir} is not a directory")
    elif manual_dir:
        raise DatasetError(f"--manual_dir is only for {DATASET_NAME}/cif_dir, not {dataset}")
    if data_dir is not None:
        parent = os.path.dirname(os.path.abspath(data_dir))
        if not os.path.isdir(data_dir) and not os.path.isdir(parent):
            raise DatasetError(f"--data_dir {data_dir}: its parent folder {parent} does not exist")
    if beam_runner is not None or beam_options is not None:
        try:
            from apache_beam.options.pipeline_options import PipelineOptions
        except ImportError:
            raise DatasetError("a Beam build needs apache-beam: pip install apache-beam") from None
        if beam_options is None:  # Beam's default would parse (and complain about) sys.argv
            beam_options = PipelineOptions([])
    kwargs = {}
    if limit is not None:
        kwargs["limit"] = limit
    if num_workers is not None:
        kwargs["num_workers"] = num_workers
    builder = get_builder(dataset, data_dir, **kwargs)
    if is_built(builder) and not overwrite:
        _check_build_info(builder, manual_dir, limit)
        log(f"{dataset} is already built in {builder.data_dir}")
    else:
        import tensorflow_datasets as tfds

        download_config = tfds.download.DownloadConfig(
            manual_dir=os.path.abspath(manual_dir) if manual_dir else None,
            beam_runner=beam_runner, beam_options=beam_options,
            download_mode=(tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if not overwrite
                           else tfds.download.GenerateMode.FORCE_REDOWNLOAD))
        try:
            builder.download_and_prepare(download_config=download_config)
        except DatasetError:
            raise
        except PermissionError as e:
            raise DatasetError(f"cannot write the dataset: {e}") from None
        except AssertionError as e:
            if "No examples were yielded" in str(e):
                raise DatasetError(f"{dataset}: a split has files but no readable structure "
                                   f"({str(e).splitlines()[0]})") from None
            raise
        log(f"built {dataset} in {builder.data_dir}")
    log(summarize_build(builder.data_dir))
    return builder


def summarize_build(dataset_dir: str, top: int = 12) -> str:
    """Examples per split and skips per reason, as printed after `build`."""
    lines = []
    info = read_build_info(dataset_dir)
    if info.get("limit") is not None:
        lines.append(f"note: a limited build, only the first {info['limit']} CIF files")
    stats = _read_json(os.path.join(dataset_dir, ELEMENT_STATS_JSON))
    if stats:
        per_split = ", ".join(f"{s} {v['structures']} structures / {v['atoms']} atoms"
                              for s, v in stats["splits"].items())
        lines.append(f"read: {per_split}")
    skips = read_skips(dataset_dir)
    if skips is None:
        lines.append("no skip report")
    else:
        files = len({s[0] for s in skips})
        lines.append(f"skipped: {len(skips)} blocks or files in {files} files"
                     f" (report: {os.path.join(dataset_dir, SKIPPED_CSV)})")
        from cryknn import structures as structures_lib

        lines.extend(structures_lib.summarize_skips((s[2] for s in skips), top))
    return "\n".join(lines)


def read_skips(dataset_dir: str) -> list[tuple[str, str, str]] | None:
    """Rows (file, block, reason) of skipped.csv, or None if there is none."""
    path = os.path.join(dataset_dir, SKIPPED_CSV)
    if not os.path.isfile(path):
        return None
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return [tuple(r) for r in rows[1:]]


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _ready_builder(dataset: str, data_dir: str | None, build_if_missing: bool, **build_kwargs):
    builder = get_builder(dataset, data_dir)
    if is_built(builder):
        return builder
    if build_if_missing:
        return build(dataset, data_dir, **build_kwargs)
    raise DatasetError(
        f"{dataset} is not built in {builder.data_dir}: run "
        f"python -m cryknn.data build --dataset={dataset}"
        + (f" --data_dir={data_dir}" if data_dir else ""))


def element_stats(dataset: str = DEFAULT_DATASET, data_dir: str | None = None) -> dict:
    """The element statistics stored with a built dataset (element_stats.json).

    {'dataset': ..., 'splits': {split: {'structures': int, 'atoms': int,
     'elements': {symbol: {'atoms': int, 'structures': int}}}}}, elements most atoms first.
    Use `top_elements(stats, n)` for the n most abundant training elements.
    """
    builder = _ready_builder(dataset, data_dir, build_if_missing=False)
    stats = _read_json(os.path.join(builder.data_dir, ELEMENT_STATS_JSON))
    if stats is None:
        raise DatasetError(f"{builder.data_dir} has no {ELEMENT_STATS_JSON}")
    stats["data_dir"] = os.fspath(builder.data_dir)
    return stats


def load_split(dataset: str = DEFAULT_DATASET, split: str = "train",
               data_dir: str | None = None, *, build_if_missing: bool = True,
               per_process: bool = False, manual_dir: str | None = None,
               shuffle_files: bool = False) -> Iterator[dict]:
    """Streams the examples of a split as dicts of numpy arrays and Python strings.

    Keys: id, family, source (str); lattice (3, 3) float64; frac (N, 3) float64;
    numbers (N,) int32; labels (N,) str; occupancies (N,) float32; num_atoms int.
    per_process: read only this JAX process's part (`tfds.split_for_jax_process`), so each
      host of a multi-host run reads its own shard.
    build_if_missing: build the dataset first (cif_dir needs manual_dir); otherwise a
      missing dataset raises DatasetError.
    """
    if split not in SPLITS and not re.match(r"^(train|validation|test)\[", split):
        raise DatasetError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    builder = _ready_builder(dataset, data_dir, build_if_missing, manual_dir=manual_dir)
    base = split.split("[", 1)[0]
    if base not in builder.info.splits:
        raise DatasetError(f"{dataset} has no {base!r} split (too few structures); it has "
                           f"{', '.join(builder.info.splits.keys())}")
    import tensorflow as tf
    import tensorflow_datasets as tfds

    try:  # tf.data only feeds the host: keep TensorFlow off any accelerator JAX uses
        with _stderr_silenced():  # (and quiet about the CUDA it does not find)
            tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):
        pass
    _drop_tfds_dtype_warning()
    if per_process:
        split = tfds.split_for_jax_process(split)
    ds = builder.as_dataset(split=split, shuffle_files=shuffle_files)
    return _decoded(tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)))


class _DropMessage:
    """logging filter: drops records whose message contains a given text."""

    def __init__(self, text: str):
        self.text = text

    def filter(self, record) -> bool:
        return self.text not in str(record.msg)


def _drop_tfds_dtype_warning() -> None:
    """TFDS 4.9 warns about its own use of FeatureConnector.dtype when decoding raw bytes."""
    import logging as py_logging

    logger = py_logging.getLogger("absl")
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage("FeatureConnector.dtype` is deprecated"))


def _decoded(examples: Iterable[dict]) -> Iterator[dict]:
    for ex in examples:
        out = dict(ex)
        for key in ("id", "family", "source"):
            out[key] = ex[key].decode("utf-8")
        out["labels"] = _decode_labels(ex["labels"])
        out["num_atoms"] = int(ex["num_atoms"])
        yield out


def _decode_labels(labels: np.ndarray) -> np.ndarray:
    """(N,) bytes -> (N,) str; vectorised for ASCII labels (nearly all of them)."""
    raw = np.asarray(labels).astype(bytes)
    try:
        return raw.astype(str)
    except UnicodeDecodeError:
        return np.asarray([s.decode("utf-8", errors="replace") for s in raw], dtype=str)


def load_structures(dataset: str = DEFAULT_DATASET, split: str = "train",
                    data_dir: str | None = None, **kwargs) -> Iterator[Any]:
    """Like load_split, as cryknn.structures.Structure records."""
    from cryknn import structures as structures_lib

    for ex in load_split(dataset, split, data_dir, **kwargs):
        yield structures_lib.Structure(
            id=ex["id"], source=ex["source"], lattice=ex["lattice"], frac=ex["frac"],
            numbers=ex["numbers"], labels=ex["labels"], occupancies=ex["occupancies"])


# ----------------------------------------------------------------------------
# Element table and chart (the `stats` command).


def format_stats(stats: dict, top: int | None = None) -> str:
    """A text table: one row per element (most training atoms first), atoms/structures per split."""
    splits = [s for s in SPLITS if s in stats["splits"]]
    order = list(stats["splits"].get("train", {}).get("elements", {}))
    for s in splits:
        order += [e for e in stats["splits"][s]["elements"] if e not in order]
    if top:
        order = order[:top]
    columns = [(s, k) for s in splits for k in ("atoms", "structures")]
    widths = [max(12, len(f"{s} {k}") + 2) for s, k in columns]
    rows = [f"{'element':<8}" + "".join(f"{s + ' ' + k:>{w}}" for (s, k), w in zip(columns, widths))]
    for e in order:
        cells = [stats["splits"][s]["elements"].get(e, {}).get(k, 0) for s, k in columns]
        rows.append(f"{e:<8}" + "".join(f"{c:>{w}d}" for c, w in zip(cells, widths)))
    totals = [stats["splits"][s][k] for s, k in columns]
    rows.append(f"{'total':<8}" + "".join(f"{c:>{w}d}" for c, w in zip(totals, widths)))
    return "\n".join(rows)


def plot_stats(stats: dict, out: str, top: int = 40) -> None:
    """Bar chart PNG of atoms per element (log scale), one bar group per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = [s for s in SPLITS if s in stats["splits"]]
    order = list(stats["splits"].get(splits[0], {}).get("elements", {}))[:top]
    x = np.arange(len(order))
    width = 0.8 / max(1, len(splits))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(order) + 2), 4.5))
    for i, s in enumerate(splits):
        table = stats["splits"][s]["elements"]
        ax.bar(x + (i - (len(splits) - 1) / 2) * width,
               [table.get(e, {}).get("atoms", 0) for e in order], width, label=s)
    ax.set_xticks(x)
    ax.set_xticklabels(order, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("atoms")
    ax.set_title(f"{stats.get('dataset', '')}: atoms per element")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------
# CLI.

COMMANDS = ("build", "stats")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("dataset", DEFAULT_DATASET, "TFDS name/config: crystal_structures/"
                        + "|".join(CONFIG_NAMES))
    flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR or "
                        "~/tensorflow_datasets)")
    flags.DEFINE_string("manual_dir", None, "folder tree of CIF files (cif_dir only)")
    flags.DEFINE_string("out", None, "stats: bar chart PNG (default: element_stats.png in "
                        "the dataset folder)")
    flags.DEFINE_integer("limit", None, "read only the first N CIF files / archive members "
                         "(smoke builds; recorded in build_info.json)", lower_bound=1)
    flags.DEFINE_integer("num_workers", None, "parsing processes (default: available CPUs)",
                         lower_bound=0)
    flags.DEFINE_string("beam_runner", None, "build with Apache Beam on this runner "
                        "(e.g. DirectRunner); needs apache-beam")
    flags.DEFINE_string("beam_options", None, "Beam pipeline options, e.g. "
                        "'--runner=DataflowRunner --project=P --region=R'")
    flags.DEFINE_boolean("overwrite", False, "build: rebuild even if already built")
    flags.DEFINE_integer("top", None, "stats: only the N most abundant training elements",
                         lower_bound=1)


def default_data_dir() -> str:
    """TFDS's default data dir: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), "tensorflow_datasets")


def _check_config_folder(dataset: str, data_dir: str | None) -> None:
    """Fails fast (before importing TensorFlow) when no version of dataset was ever built."""
    name, config, _ = parse_dataset_name(dataset)
    folder = os.path.join(data_dir or default_data_dir(), name, config)
    if not os.path.isdir(folder):
        raise DatasetError(
            f"{dataset} is not built in {data_dir or default_data_dir()}: run "
            f"python -m cryknn.data build --dataset={dataset}"
            + (f" --data_dir={data_dir}" if data_dir else ""))


def _fail(message: str, code: int = 1) -> None:
    print(f"cryknn.data: error: {message}", file=sys.stderr)
    sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__, 2)


def main(argv: list[str]) -> None:
    from absl import flags
    from absl import logging

    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:  # TFDS logs every file it writes at INFO
        logging.set_verbosity(logging.WARNING)
    args = argv[1:]
    if len(args) != 1 or args[0] not in COMMANDS:
        got = " ".join(args) or "nothing"
        _fail(f"expected one command, build or stats; got {got}", 2)
    try:
        if args[0] == "build":
            beam_options = None
            if FLAGS.beam_options:
                try:
                    from apache_beam.options.pipeline_options import PipelineOptions
                except ImportError:
                    raise DatasetError("--beam_options needs apache-beam: "
                                       "pip install apache-beam") from None
                beam_options = PipelineOptions(FLAGS.beam_options.split())
            beam_runner = FLAGS.beam_runner
            if beam_runner is not None:
                try:
                    import apache_beam  # noqa: F401
                except ImportError:
                    raise DatasetError("--beam_runner needs apache-beam: "
                                       "pip install apache-beam") from None
            build(FLAGS.dataset, FLAGS.data_dir, manual_dir=FLAGS.manual_dir,
                  limit=FLAGS.limit, num_workers=FLAGS.num_workers,
                  beam_runner=beam_runner, beam_options=beam_options,
                  overwrite=FLAGS.overwrite)
        else:
            if FLAGS.data_dir is not None and not os.path.isdir(FLAGS.data_dir):
                raise DatasetError(f"--data_dir {FLAGS.data_dir} is not a directory")
            if FLAGS.manual_dir:
                raise DatasetError("--manual_dir is only for build")
            if FLAGS.out and not os.path.isdir(os.path.dirname(os.path.abspath(FLAGS.out))):
                raise DatasetError(f"--out {FLAGS.out}: its folder does not exist")
            _check_config_folder(FLAGS.dataset, FLAGS.data_dir)
            stats = element_stats(FLAGS.dataset, FLAGS.data_dir)
            print(format_stats(stats, FLAGS.top))
            out = FLAGS.out or os.path.join(stats["data_dir"], "element_stats.png")
            plot_stats(stats, out)
            print(f"chart: {out}")
    except DatasetError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main, flags_parser=_parse_flags)
