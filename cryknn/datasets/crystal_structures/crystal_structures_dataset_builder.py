"""TFDS builder `crystal_structures`: crystals read from CIF files, one example per structure.

Configs:
  core_mof_2019_asr (default)  CoRE MOF 2019-ASR (12,020 CIFs) from the installed core-mof
                               package, read straight from its tar.xz: no download.
  core_mof_2014                CoRE MOF 2014 (4,764 CIFs), same package.
  cif_dir                      every `*.cif` under manual_dir, recursively (a CSD export, a
                               COD mirror, your own folder).

Splits: train / validation / test, 80/10/10 by near-copy group, so that neither a family
(`cryknn.families`: one CSD entry, one paper) nor a crystal filed under several names
(`cryknn.nearcopies`: same composition, same AMD fingerprint) crosses splits. The build reads
every CIF once, in a first pass that fingerprints each structure and joins near-copies; the
parsed structures wait in a local spill file until each split's generator takes its own. A
split that would hold no file at all (tiny folders) is left out.

Beside the dataset files (`<data_dir>/crystal_structures/<config>/<version>/`) the build
writes skipped.csv (file, block, reason), element_stats.json (per split: structures, atoms,
atoms and structures per element), build_info.json (what it was built from, counts, time,
the near-copy grouping), splits.csv (structure_id, family, group, split, family_split) and
fingerprints.npz (composition and AMD of every structure). A cif_dir build built beside the
default CoRE MOF build also writes copies_of_default.csv: its structures that are near-copies
of a default structure, with that structure's split, so a held-out claim can exclude them.

Builder kwargs, `tfds.builder(name, data_dir=..., limit=N, num_workers=W)`, each with an
environment fallback (the kwarg wins):
  limit        $CRYKNN_DATA_LIMIT    read only the first N CIF files / archive members (tests,
                                     smoke runs; recorded in build_info.json)
  num_workers  $CRYKNN_DATA_WORKERS  parsing processes (default: the usable CPUs; 0 or 1
                                     parse in the building process)

Apache Beam: when DownloadConfig has a beam_runner or beam_options, each split is a Beam
PTransform (`beam.Create(tasks) | Reshuffle | FlatMap(parse)`) so that a million-CIF export
builds on Dataflow, Flink or Spark; the skip report and element statistics are computed in
the same pipeline and written to the same files. Workers need cryknn installed. The
near-copy pass still reads every file once on the launching machine (it needs all
fingerprints at once), then hands the workers the groups.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import pickle
import shutil
import tempfile
import time
from typing import Any, Iterator, Sequence

from absl import logging
from etils import epath
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cryknn import cif
from cryknn import errors
from cryknn import families
from cryknn import nearcopies
from cryknn import util
from cryknn.datasets import crystal_structures as names
from cryknn.datasets.crystal_structures import parsing

_DESCRIPTION = """\
Crystal structures as periodic point sets: the lattice (rows are the cell vectors a, b, c
in angstrom), fractional coordinates of every atom of the unit cell (symmetry expanded),
atomic numbers, site labels and occupancies, with the structure id `<file stem>:<block>`,
its family (CSD refcode stem or the documented rule of cryknn.families.family_of) and source.
Split train/validation/test 80/10/10 by family hash, so no family crosses splits.

core_mof_2019_asr / core_mof_2014: the CoRE MOF database (Computation-Ready, Experimental
Metal-Organic Frameworks; 2019 "all solvent removed" set, about 12k frameworks derived from
the Cambridge Structural Database, and the 2014 set), as shipped by the core-mof Python
package (https://github.com/coudertlab/CoRE-MOF), licensed CC-BY-4.0. Please cite:
Y. G. Chung et al., J. Chem. Eng. Data 64, 5985-5998 (2019), doi:10.1021/acs.jced.9b00835
(CoRE MOF 2019) and Y. G. Chung et al., Chem. Mater. 26, 6185-6192 (2014),
doi:10.1021/cm502594j (CoRE MOF 2014).

cif_dir: every *.cif under the manual_dir folder tree; license and citation are those of the
files you provide.
"""

_CITATION = """\
@article{chung2019coremof,
  title = {Advances, Updates, and Analytics for the Computation-Ready, Experimental
           Metal-Organic Framework Database: {CoRE MOF} 2019},
  author = {Chung, Yongchul G. and Haldoupis, Emmanuel and Bucior, Benjamin J. and
            Haranczyk, Maciej and Lee, Seulchan and Zhang, Hongda and Vogiatzis,
            Konstantinos D. and Milisavljevic, Marija and Ling, Sanliang and Camp, Jeffrey S.
            and Slater, Ben and Siepmann, J. Ilja and Sholl, David S. and Snurr, Randall Q.},
  journal = {Journal of Chemical \\& Engineering Data},
  volume = {64},
  number = {12},
  pages = {5985--5998},
  year = {2019},
  doi = {10.1021/acs.jced.9b00835},
}
@article{chung2014coremof,
  title = {Computation-Ready, Experimental Metal-Organic Frameworks: A Tool To Enable
           High-Throughput Screening of Nanoporous Crystals},
  author = {Chung, Yongchul G. and Camp, Jeffrey and Haranczyk, Maciej and Sikora,
            Benjamin J. and Bury, Wojciech and Krungleviciute, Vaiva and Yildirim, Taner and
            Farha, Omar K. and Sholl, David S. and Snurr, Randall Q.},
  journal = {Chemistry of Materials},
  volume = {26},
  number = {21},
  pages = {6185--6192},
  year = {2014},
  doi = {10.1021/cm502594j},
}
"""

_MANUAL = """\
For the cif_dir config, pass the folder tree of CIF files as manual_dir:
  python -m cryknn.data build --dataset=crystal_structures/cif_dir --manual_dir=DIR
or tfds.download.DownloadConfig(manual_dir=DIR). Every *.cif under DIR is read.
"""

_BUILD_TMP = "_cryknn_build"
_FINGERPRINT_CHUNK = 2048  # structures fingerprinted at a time in the first pass
_BYTES = tfds.features.Encoding.BYTES


@dataclasses.dataclass(eq=False)
class CrystalStructuresConfig(tfds.core.BuilderConfig):
    """archive: core-mof archive version ('2019-ASR', '2014'); None reads manual_dir."""

    archive: str | None = None


class Builder(tfds.core.GeneratorBasedBuilder):
    """One example per crystal structure; splits by near-copy group of families."""

    VERSION = tfds.core.Version(names.VERSION)
    RELEASE_NOTES = {
        "1.0.0": "First release: family splits, skip report, element statistics.",
        "1.1.0": "Near-copy groups join families (splits.csv); site_index per atom.",
    }
    BUILDER_CONFIGS = [
        CrystalStructuresConfig(
            name="core_mof_2019_asr", archive="2019-ASR",
            description="CoRE MOF 2019-ASR from the core-mof package (CC-BY-4.0)."),
        CrystalStructuresConfig(
            name="core_mof_2014", archive="2014",
            description="CoRE MOF 2014 from the core-mof package (CC-BY-4.0)."),
        CrystalStructuresConfig(
            name="cif_dir", archive=None,
            description="Every *.cif under manual_dir (recursive)."),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "core_mof_2019_asr"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL

    def __init__(self, *, limit: int | None = None, num_workers: int | None = None,
                 read_options: cif.ReadOptions | None = None, **kwargs):
        super().__init__(**kwargs)
        self._read_options = read_options or cif.ReadOptions()
        if limit is None and os.environ.get(names.ENV_LIMIT):
            limit = int(os.environ[names.ENV_LIMIT])
        if limit is not None and limit < 1:
            raise errors.DataError(f"limit must be at least 1, got {limit}")
        self._limit = limit
        self._num_workers = parsing.default_workers() if num_workers is None else num_workers
        self._beam = False
        self._root = None  # cif_dir: the manual_dir
        self._candidates = {}  # split -> number of files
        self._parser = None
        self._spill_dir = None  # local build: the parsed structures of the first pass
        self._splits: nearcopies.SplitTable | None = None
        self._fingerprints: nearcopies.Fingerprints | None = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(doc="<file stem>:<CIF data block>"),
                "family": tfds.features.Text(doc="structure family (cryknn.families.family_of)"),
                "source": tfds.features.Text(doc="file path, or archive!member"),
                # Raw-bytes encoding: float64 stays float64 (tf.train.Example's float
                # lists are float32) and serialising is one copy instead of a list.
                "lattice": tfds.features.Tensor(shape=(3, 3), dtype=np.float64,
                                                encoding=_BYTES,
                                                doc="rows are the cell vectors, angstrom"),
                "frac": tfds.features.Tensor(shape=(None, 3), dtype=np.float64,
                                             encoding=_BYTES,
                                             doc="fractional coordinates in [0, 1)"),
                "numbers": tfds.features.Tensor(shape=(None,), dtype=np.int32,
                                                encoding=_BYTES, doc="atomic numbers"),
                "labels": tfds.features.Tensor(shape=(None,), dtype=tf.string,
                                               doc="CIF site label of each atom"),
                "occupancies": tfds.features.Tensor(shape=(None,), dtype=np.float32,
                                                    encoding=_BYTES, doc="site occupancies"),
                "site_index": tfds.features.Tensor(
                    shape=(None,), dtype=np.int32, encoding=_BYTES,
                    doc="row of the CIF atom-site loop each atom stands for (symmetry copies "
                        "share it)"),
                "num_atoms": tfds.features.Scalar(dtype=np.int32, doc="N"),
            }),
            homepage="https://github.com/coudertlab/CoRE-MOF",
            citation=_CITATION,
            license="CC-BY-4.0 (core_mof configs); cif_dir: that of your files",
        )

    # --- Generation ---------------------------------------------------------------------

    @property
    def _tmp(self) -> str:
        return os.path.join(os.fspath(self.data_dir), _BUILD_TMP)

    def _download_and_prepare(self, dl_manager, download_config):
        self._beam = bool(download_config.beam_runner or download_config.beam_options)
        if self.builder_config.archive is None:
            given = download_config.manual_dir
            if given and os.path.isdir(given):
                self._root = os.fspath(given)  # an empty folder is reported as "no *.cif"
            else:
                try:
                    self._root = os.fspath(dl_manager.manual_dir)
                except AssertionError:
                    where = given or "<data_dir>/downloads/manual"
                    raise errors.DataError(
                        f"{self.name}/cif_dir needs manual_dir: a folder tree of CIF files "
                        f"({where} does not exist or is empty)") from None
        epath.Path(self._tmp).mkdir(parents=True, exist_ok=True)
        start = time.time()
        if not self._beam and self._num_workers > 1:
            self._parser = parsing.Parser(self._num_workers, options=self._read_options)
        try:
            super()._download_and_prepare(dl_manager, download_config)
        finally:
            if self._parser is not None:
                self._parser.close()
                self._parser = None
            if self._spill_dir is not None:
                shutil.rmtree(self._spill_dir, ignore_errors=True)
                self._spill_dir = None
        self._finish(time.time() - start)

    def _split_generators(self, dl_manager):
        del dl_manager
        counts = self._first_pass()
        if not any(counts.values()):
            raise errors.DataError(
                f"no *.cif files in {self._root or self.builder_config.archive}")
        self._candidates = counts
        for split, n in counts.items():
            if not n:
                logging.warning("%s/%s: no file falls in split %r (too few families); the "
                                "split is left out", self.name, self.builder_config.name, split)
        return {split: self._generate_examples(split=split)
                for split in families.SPLITS if counts[split]}

    def _first_pass(self) -> dict[str, int]:
        """Parses every file once: fingerprints each structure, joins near-copies into
        groups (`self._splits`), and (local builds) spills the parsed results for the
        generators. Returns the number of files per split."""
        from tqdm import tqdm

        self._spill_dir = None if self._beam else tempfile.mkdtemp(prefix="cryknn_build_")
        spill = None if self._beam else open(os.path.join(self._spill_dir, "parsed.pkl"), "wb")
        parser = self._parser or parsing.Parser(0, options=self._read_options)
        stems, pending, parts = [], [], []
        try:
            with tqdm(desc="Reading CIFs", unit=" files", mininterval=1.0) as bar:
                for source, results in parser.parse(self._tasks()):
                    bar.update(1)
                    stems.append(parsing.stem_of_source(source))
                    pending.extend(r for r in results
                                   if isinstance(r, cif.Structure))
                    if len(pending) >= _FINGERPRINT_CHUNK:  # memory bounded by the chunk
                        parts.append(nearcopies.fingerprints(pending))
                        pending = []
                    if spill is not None:
                        pickle.dump((source, results), spill, pickle.HIGHEST_PROTOCOL)
        finally:
            if spill is not None:
                spill.close()
        self._fingerprints = nearcopies.Fingerprints.concatenate(
            parts + [nearcopies.fingerprints(pending)])
        self._splits = nearcopies.split_table(self._fingerprints,
                                              log=lambda m: logging.info("%s", m))
        counts = dict.fromkeys(families.SPLITS, 0)
        for stem in stems:
            counts[self._splits.split_of_stem(stem)] += 1
        return counts

    def _tasks(self) -> Iterator[parsing.ParseTask]:
        """Parsing tasks in a stable order: the folder's files or the archive's members."""
        if self.builder_config.archive is None:
            return parsing.file_tasks(self._root, self._limit)
        return parsing.core_mof_tasks(self.builder_config.archive, self._limit)

    def _spilled(self, split: str) -> Iterator[tuple[str, list]]:
        """(source, results) of the first pass's files that fall in `split`."""
        with open(os.path.join(self._spill_dir, "parsed.pkl"), "rb") as f:
            while True:
                try:
                    source, results = pickle.load(f)
                except EOFError:
                    return
                if self._splits.split_of_stem(parsing.stem_of_source(source)) == split:
                    yield source, results

    def _generate_examples(self, split: str):
        """A generator of (key, example), or a Beam PTransform when building with Beam."""
        if self._beam:
            return self._beam_examples(split)
        return self._local_examples(split)

    def _local_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        from tqdm import tqdm

        counter = parsing.ElementCounter()
        with epath.Path(self._tmp, f"skipped-{split}.csv").open("w") as skip_file, \
                epath.Path(self._tmp, f"removed-{split}.csv").open("w") as removed_file, \
                tqdm(total=self._candidates.get(split), desc=f"Reading {split} CIFs",
                     unit=" files", mininterval=1.0) as bar:
            skips, removed = csv.writer(skip_file), csv.writer(removed_file)
            for key, results in self._spilled(split):
                bar.update(1)
                for i, result in enumerate(results):
                    if isinstance(result, cif.Skip):
                        skips.writerow(parsing.skip_row(result))
                    else:
                        removed.writerows(parsing.removal_rows(result))
                        counter.add(result.numbers)
                        yield f"{key}#{i}", parsing.structure_example(result)
        parsing.write_stats_json(counter, os.path.join(self._tmp, f"stats-{split}.json"))

    def _beam_examples(self, split: str):
        beam = tfds.core.lazy_imports.apache_beam
        group_of = self._splits.group_of
        if self.builder_config.archive is None:
            tasks = list(util.chunked(parsing.in_split(self._tasks(), split, group_of), 64))
        else:  # workers stream the archive themselves, each parsing every n-th member
            shards = max(1, min(16, self._num_workers))
            tasks = [[parsing.ArchiveShard(self.builder_config.archive, split, i, shards,
                                           self._limit, group_of)] for i in range(shards)]
        return _beam_parse(beam, tasks, split, self._tmp, self._read_options)

    def _finish(self, seconds: float) -> None:
        """Merges the per-split skip and removal reports and statistics into the dataset
        folder, and writes build_info.json."""
        out = epath.Path(self.data_dir)
        tmp = epath.Path(self._tmp)
        skips = _merge_csv(tmp, "skipped", self._candidates, out / names.SKIPPED_CSV,
                           names.SKIP_FIELDS)
        removed = _merge_csv(tmp, "removed", self._candidates, out / names.REMOVED_CSV,
                             names.REMOVED_FIELDS)
        removed_atoms = dict.fromkeys(cif.POLICY_REMOVALS, 0)
        for row in removed:
            removed_atoms[row[2]] += int(row[3])
        splits = {split: json.loads((tmp / f"stats-{split}.json").read_text())
                  for split in self._candidates if (tmp / f"stats-{split}.json").exists()}
        name = f"{self.name}/{self.builder_config.name}"
        _write_json(out / names.ELEMENT_STATS_JSON,
                    {"dataset": name, "version": str(self.version), "splits": splits})
        _write_json(out / names.BUILD_INFO_JSON, {
            "dataset": name,
            "version": str(self.version),
            "manual_dir": os.path.abspath(self._root) if self._root else None,
            "archive": self.builder_config.archive,
            "limit": self._limit,
            "read_options": dataclasses.asdict(self._read_options),
            "files": self._candidates,
            "structures": {s: v["structures"] for s, v in splits.items()},
            "skipped": len(skips),
            "removed_atoms": removed_atoms,
            "near_copies": self._write_near_copies(out),
            "beam": self._beam,
            "num_workers": None if self._beam else self._num_workers,
            "seconds": round(seconds, 1),
        })
        tmp.rmtree(missing_ok=True)


    def _write_near_copies(self, out: epath.Path) -> dict:
        """splits.csv and fingerprints.npz in the dataset folder; for cif_dir, the near-copies
        of the default build's structures. Returns build_info's 'near_copies' entry."""
        self._splits.write_csv(os.fspath(out / nearcopies.SPLITS_CSV))
        self._fingerprints.save(os.fspath(out / nearcopies.FINGERPRINTS_NPZ))
        summary = self._splits.summary()
        if self.builder_config.archive is None:
            summary["copies_of_default"] = self._write_copies_of_default(out)
        return summary

    def _write_copies_of_default(self, out: epath.Path) -> dict | None:
        """copies_of_default.csv (structure_id, default_structure_id, default_split), from
        the default build in the same data_dir; None when that is not built there."""
        default = os.path.join(os.path.dirname(os.path.dirname(os.fspath(out))),
                               names.CONFIG_NAMES[0], str(self.version))
        fingerprints = os.path.join(default, nearcopies.FINGERPRINTS_NPZ)
        splits_csv = os.path.join(default, nearcopies.SPLITS_CSV)
        if not (os.path.isfile(fingerprints) and os.path.isfile(splits_csv)):
            logging.warning("no default build beside this one (%s): copies_of_default.csv "
                            "not written", default)
            return None
        splits = {r["structure_id"]: r["split"]
                  for r in nearcopies.read_splits_csv(splits_csv)}
        rows = nearcopies.copies_of(self._fingerprints,
                                    nearcopies.Fingerprints.load(fingerprints), splits)
        buf = io.StringIO()
        csv.writer(buf).writerows([list(names.COPIES_FIELDS)] + [list(r) for r in rows])
        (out / names.COPIES_OF_DEFAULT_CSV).write_text(buf.getvalue(), encoding="utf-8")
        return {"default_build": default,
                "structures": len({r[0] for r in rows}),
                "of_training_structures": len({r[0] for r in rows if r[2] == "train"})}


def _merge_csv(tmp: epath.Path, prefix: str, splits, path: epath.Path,
               header: Sequence[str]) -> list[list[str]]:
    """The rows of every split's <prefix>-<split>*.csv part, written as one CSV at path."""
    rows = []
    for split in splits:
        for part in sorted(tmp.glob(f"{prefix}-{split}*")):
            rows += [r for r in csv.reader(io.StringIO(part.read_text(encoding="utf-8"))) if r]
    buf = io.StringIO()
    csv.writer(buf).writerows([list(header)] + rows)
    path.write_text(buf.getvalue(), encoding="utf-8")
    return rows


def _write_json(path: epath.Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1))


def _beam_parse(beam, tasks, split, tmp, options):
    """The Beam PTransform of one split: tasks -> (key, example), plus the skip and removal
    CSVs and the element statistics."""

    class BeamParse(beam.PTransform):

        def expand(self, pbegin):
            parsed = (
                pbegin
                | "Tasks" >> beam.Create(tasks)
                | "Spread" >> beam.Reshuffle()
                | "Parse" >> beam.FlatMap(parsing.beam_parse, options=options).with_outputs(
                    "skips", "removed", main="examples"))
            for tag, prefix in (("skips", "skipped"), ("removed", "removed")):
                _ = (parsed[tag]
                     | f"{tag}Lines" >> beam.Map(parsing.csv_line)
                     | f"Write{tag}" >> beam.io.WriteToText(
                         os.path.join(tmp, f"{prefix}-{split}"), file_name_suffix=".csv"))
            _ = (parsed.examples
                 | "Count" >> beam.Map(parsing.counter_of_example)
                 | "Sum" >> beam.CombineGlobally(parsing.ElementCounter.merged)
                 | "WriteStats" >> beam.Map(parsing.write_stats_json,
                                            path=os.path.join(tmp, f"stats-{split}.json")))
            return parsed.examples

    return BeamParse()
