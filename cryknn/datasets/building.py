"""Building the `crystal_structures` TFDS dataset and reading what a build wrote beside it.

TensorFlow and TFDS are imported only inside the functions that need them, so importing
this module is cheap.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import sys
from typing import Any, Callable

from cryknn import errors
from cryknn import util
from cryknn.datasets import crystal_structures as names


def default_data_dir() -> str:
    """TFDS's default data dir: $TFDS_DATA_DIR (when set and not empty), else
    ~/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"),
                                                            "tensorflow_datasets")


def parse_dataset_name(dataset: str) -> tuple[str, str, str | None]:
    """'crystal_structures/CONFIG[:VERSION]' -> (name, config, version); DataError if bad."""
    name, _, rest = (dataset or "").partition("/")
    config, _, version = rest.partition(":")
    if name != names.DATASET_NAME or config not in names.CONFIG_NAMES:
        raise errors.DataError(
            f"unknown dataset {dataset!r}: expected {names.DATASET_NAME}/CONFIG with CONFIG "
            f"one of {', '.join(names.CONFIG_NAMES)}")
    return name, config, version or None


def import_tfds():
    """tensorflow_datasets, importing TensorFlow first without its start-up chatter on stderr."""
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        with util.stderr_silenced():
            import tensorflow  # noqa: F401
    import tensorflow_datasets as tfds

    return tfds


def get_builder(dataset: str, data_dir: str | None = None, **builder_kwargs):
    """The TFDS builder of `dataset`; importing the builder module registers it with TFDS."""
    parse_dataset_name(dataset)
    tfds = import_tfds()
    from cryknn.datasets.crystal_structures import crystal_structures_dataset_builder  # noqa: F401

    return tfds.builder(dataset, data_dir=data_dir, **builder_kwargs)


def is_built(builder) -> bool:
    return os.path.isfile(os.path.join(builder.data_dir, "dataset_info.json"))


def read_build_info(dataset_dir: str) -> dict:
    """build_info.json of a built dataset ({} when there is none)."""
    return read_json(os.path.join(dataset_dir, names.BUILD_INFO_JSON)) or {}


def dataset_dir(dataset: str, data_dir: str | None = None) -> str:
    """Where a build of `dataset` lives (or would): <data_dir>/<name>/<config>/<version>."""
    name, config, version = parse_dataset_name(dataset)
    return os.path.join(data_dir or default_data_dir(), name, config, version or names.VERSION)


def build_fingerprint(dataset: str, data_dir: str | None = None) -> dict:
    """What identifies a build: {'fingerprint': 12 hex digits, 'build_info': {...}}.

    The fingerprint hashes the dataset name and version with what the build recorded
    (source folder or archive, limit, files and structures per split, skips), so a rebuild
    from other files, or with another limit, gets another fingerprint. Raises DataError
    when the dataset is not built. Reads one small JSON file: no TensorFlow.
    """
    folder = dataset_dir(dataset, data_dir)
    info = read_build_info(folder)
    if not info or not os.path.isfile(os.path.join(folder, "dataset_info.json")):
        raise not_built_error(dataset, data_dir, folder)
    keys = ("dataset", "version", "manual_dir", "archive", "limit", "read_options", "files",
            "structures", "skipped")
    identity = json.dumps({key: info.get(key) for key in keys}, sort_keys=True)
    digest = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:12]
    return {"fingerprint": digest, "build_info": info}


def read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_skips(dataset_dir: str) -> list[tuple[str, str, str]] | None:
    """Rows (file, block, reason) of skipped.csv, or None if there is none."""
    path = os.path.join(dataset_dir, names.SKIPPED_CSV)
    if not os.path.isfile(path):
        return None
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return [tuple(r) for r in rows[1:]]


def _check_build_info(builder, manual_dir: str | None, limit: int | None,
                      read_options: Any) -> None:
    """Refuse to reuse a cif_dir build made from another folder, a build with another
    explicit limit (limit=None reuses any build; training announces a partial one), or
    one read with other reading policies."""
    info = read_build_info(builder.data_dir)
    if not info:
        return
    if read_options is not None and "read_options" in info:
        wanted = dataclasses.asdict(read_options)
        if info["read_options"] != wanted:
            raise errors.DataError(
                f"{builder.data_dir} was read with {info['read_options']}, not {wanted}: "
                "use another --data_dir, or --overwrite")
    if manual_dir and info.get("manual_dir") not in (None, os.path.abspath(manual_dir)):
        raise errors.DataError(
            f"{builder.data_dir} was built from {info.get('manual_dir')}, not {manual_dir}: "
            "use another --data_dir, or --overwrite")
    if limit is not None and limit != info.get("limit"):
        raise errors.DataError(
            f"{builder.data_dir} was built with limit={info.get('limit')}, not {limit}: "
            "use another --data_dir, or --overwrite")


def _check_build_arguments(dataset: str, data_dir: str | None, manual_dir: str | None) -> None:
    _, config, _ = parse_dataset_name(dataset)
    if config == "cif_dir":
        if not manual_dir:
            raise errors.DataError(f"{dataset} needs --manual_dir=DIR, the folder tree of CIF "
                                   f"files")
        if not os.path.isdir(manual_dir):
            raise errors.DataError(f"--manual_dir {manual_dir} is not a directory")
    elif manual_dir:
        raise errors.DataError(f"--manual_dir is only for {names.DATASET_NAME}/cif_dir, not "
                               f"{dataset}")
    if data_dir is not None:
        parent = os.path.dirname(os.path.abspath(data_dir))
        if not os.path.isdir(data_dir) and not os.path.isdir(parent):
            raise errors.DataError(f"--data_dir {data_dir}: its parent folder {parent} does "
                                   f"not exist")


def _beam_options(beam_runner: Any, beam_options: Any) -> Any:
    """PipelineOptions for a Beam build (None when not building with Beam)."""
    if beam_runner is None and beam_options is None:
        return None
    try:
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise errors.DataError("a Beam build needs apache-beam: pip install apache-beam") from None
    # Beam's default would parse (and complain about) sys.argv.
    return PipelineOptions([]) if beam_options is None else beam_options


def build(dataset: str = names.DEFAULT_DATASET, data_dir: str | None = None, *,
          manual_dir: str | None = None, limit: int | None = None,
          num_workers: int | None = None, beam_runner: Any = None, beam_options: Any = None,
          read_options: Any = None, overwrite: bool = False,
          log: Callable[[str], None] = print):
    """Builds `dataset` in data_dir (unless already built) and returns its TFDS builder.

    manual_dir: the CIF folder tree for `cif_dir` (required there, refused otherwise).
    limit: read only the first `limit` CIF files / archive members (tests, smoke runs).
    num_workers: parsing processes (default: the CPUs this process may use).
    beam_runner / beam_options: build as an Apache Beam pipeline (e.g. 'DirectRunner', or
      PipelineOptions for Dataflow/Flink/Spark); needs `pip install apache-beam`.
    read_options: the CIF reader's policies (cif.ReadOptions; default: its defaults).
    Prints the skip summary through `log`. Raises DataError for anything the user can fix.
    """
    _check_build_arguments(dataset, data_dir, manual_dir)
    beam_options = _beam_options(beam_runner, beam_options)
    kwargs = {key: value for key, value in (("limit", limit), ("num_workers", num_workers),
                                            ("read_options", read_options))
              if value is not None}
    builder = get_builder(dataset, data_dir, **kwargs)
    if is_built(builder) and not overwrite:
        _check_build_info(builder, manual_dir, limit, read_options)
        log(f"{dataset} is already built in {builder.data_dir}")
    else:
        _download_and_prepare(builder, dataset, manual_dir, beam_runner, beam_options,
                              overwrite)
        log(f"built {dataset} in {builder.data_dir}")
    log(summarize_build(builder.data_dir))
    return builder


def _download_and_prepare(builder, dataset, manual_dir, beam_runner, beam_options, overwrite):
    import tensorflow_datasets as tfds

    mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
            else tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS)
    download_config = tfds.download.DownloadConfig(
        manual_dir=os.path.abspath(manual_dir) if manual_dir else None,
        beam_runner=beam_runner, beam_options=beam_options, download_mode=mode)
    try:
        builder.download_and_prepare(download_config=download_config)
    except errors.DataError:
        raise
    except PermissionError as e:
        raise errors.DataError(f"cannot write the dataset: {e}") from None
    except AssertionError as e:
        if "No examples were yielded" in str(e):
            raise errors.DataError(f"{dataset}: a split has files but no readable structure "
                                   f"({str(e).splitlines()[0]})") from None
        raise


def summarize_build(dataset_dir: str, top: int = 12) -> str:
    """Examples per split and skips per reason, as printed after `build`."""
    from cryknn import cif

    lines = []
    info = read_build_info(dataset_dir)
    if info.get("limit") is not None:
        lines.append(f"note: a limited build, only the first {info['limit']} CIF files")
    stats = read_json(os.path.join(dataset_dir, names.ELEMENT_STATS_JSON))
    if stats:
        per_split = ", ".join(f"{s} {v['structures']} structures / {v['atoms']} atoms"
                              for s, v in stats["splits"].items())
        lines.append(f"read: {per_split}")
    near = info.get("near_copies")
    if near:
        lines.append(f"near-copies ({near['rule']}): {near['structures_grouped']} structures in "
                     f"{near['groups']} groups; {near['structures_moved']} moved split "
                     f"(splits.csv)")
        copies = near.get("copies_of_default")
        if copies:
            lines.append(f"near-copies of the default build's structures: {copies['structures']}"
                         f" ({copies['of_training_structures']} of training structures; "
                         f"{names.COPIES_OF_DEFAULT_CSV})")
    skips = read_skips(dataset_dir)
    if skips is None:
        lines.append("no skip report")
    else:
        files = len({s[0] for s in skips})
        lines.append(f"skipped: {len(skips)} blocks or files in {files} files"
                     f" (report: {os.path.join(dataset_dir, names.SKIPPED_CSV)})")
        lines.extend(cif.summarize_skips((s[2] for s in skips), top))
    removed = {p: n for p, n in (info.get("removed_atoms") or {}).items() if n}
    if removed:
        lines.append(f"reading policies removed atoms (report: "
                     f"{os.path.join(dataset_dir, names.REMOVED_CSV)}):")
        lines.extend(f"  {n:7d}  {cif.POLICY_REMOVALS.get(p, p)}"
                     for p, n in removed.items())
    return "\n".join(lines)


def ready_builder(dataset: str, data_dir: str | None, build_if_missing: bool, **build_kwargs):
    """The builder of a built dataset, building it first when asked; else DataError."""
    builder = get_builder(dataset, data_dir)
    if is_built(builder):
        return builder
    if build_if_missing:
        return build(dataset, data_dir, **build_kwargs)
    raise not_built_error(dataset, data_dir, builder.data_dir)


def not_built_error(dataset: str, data_dir: str | None, where: str) -> errors.DataError:
    return errors.DataError(
        f"{dataset} is not built in {where}: run python -m cryknn.data build "
        f"--dataset={dataset}" + (f" --data_dir={data_dir}" if data_dir else ""))


def check_built(dataset: str, data_dir: str | None) -> None:
    """Fails fast (before importing TensorFlow) when no version of dataset was ever built."""
    name, config, _ = parse_dataset_name(dataset)
    root = data_dir or default_data_dir()
    if not os.path.isdir(os.path.join(root, name, config)):
        raise not_built_error(dataset, data_dir, root)
