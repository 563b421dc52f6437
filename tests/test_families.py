"""The family and split rules (pure functions, no TensorFlow)."""

from __future__ import annotations

import collections
import csv

import numpy as np
import pytest

from cryknn import families
from cryknn import cif

FAMILY_CASES = [
    # CSD refcodes: the six leading capitals, whatever follows
    ("ABAVIJ", "ABAVIJ"),
    ("ABAVIJ:ABAVIJ", "ABAVIJ"),
    ("ABAVIJ01:data", "ABAVIJ"),
    ("ABAVIJ_clean:ABAVIJ_clean", "ABAVIJ"),
    ("ABAVIJ01_charged:x", "ABAVIJ"),
    ("ABAVIJ_clean_h", "ABAVIJ"),
    ("ABAVIJ_ion_b", "ABAVIJ"),
    ("ABAVIJ_freeONLY", "ABAVIJ"),
    ("ABAVIJ-1", "ABAVIJ"),
    # deposition numbers (COD, CCDC)
    ("4300123:4300123", "4300123"),
    ("1000002-test-hall:1000002", "1000002"),
    ("1000002-test-hm", "1000002"),
    ("1100656_molecule_0_INV", "1100656"),
    ("1499489-acs.cgd.6b01265_1499490_clean:x", "1499489"),
    ("00993", "00993"),
    # refcode embedded in a DOI-like CoRE name
    ("acs.cgd.5b01554_VAGNUP1452791_clean", "VAGNUP"),
    # one paper's supporting information is one family
    ("ic501898x_si_004_clean", "ic501898x"),
    ("ic501898x_si_005_clean:blk", "ic501898x"),
    ("acscombsci.5b00188_8372_clean", "acscombsci.5b00188"),
    ("c5cc09432a_c5cc09432a2_clean", "c5cc09432a"),
    ("j.ica.2016.05.051_4_clean", "j.ica.2016.05.051"),
    ("S2052520616005515_bm5080sup1_clean", "S2052520616005515"),
    # anything else: the stem without CoRE suffixes
    ("006_ethylnitramine:ethylnitramine", "006_ethylnitramine"),
    ("10.1021-acs.organomet.5b00864", "10.1021-acs.organomet.5b00864"),
    ("mof_001", "mof_001"),
    ("UiO66_clean", "UiO66"),
    ("ABAVIJK", "ABAVIJK"),  # seven letters: not a refcode
    ("abavij01", "abavij01"),  # refcodes are capitals
]


@pytest.mark.parametrize("structure_id,family", FAMILY_CASES)
def test_family_of(structure_id, family):
    assert families.family_of(structure_id) == family


def test_family_of_rejects_empty_stem():
    with pytest.raises(ValueError):
        families.family_of(":block")


def test_family_ignores_block():
    """The builder picks a file's split from its stem, before reading its blocks."""
    for stem, _ in FAMILY_CASES:
        stem = stem.split(":")[0]
        assert families.family_of(stem) == families.family_of(f"{stem}:any_block")


def test_split_of_is_stable():
    # Golden values: a changed split rule would silently reshuffle every built dataset.
    golden = {"ABAVIJ": "validation", "4300123": "train", "ic501898x": "train",
              "UYICIQ": "test", "QZRTAA": "validation", "QZRTAB": "train"}
    assert {f: families.split_of(f) for f in golden} == golden
    assert all(families.split_of(f) == _bucket_split(f) for f in ("", "x", "ABAVIJ", "Ü"))


def _bucket_split(family):
    import hashlib

    bucket = int(hashlib.sha256(family.encode()).hexdigest()[:16], 16) % 1000
    return "train" if bucket < 800 else "validation" if bucket < 900 else "test"


def test_split_fractions_80_10_10():
    counts = collections.Counter(families.split_of(f"FAM{i:05d}") for i in range(20000))
    assert abs(counts["train"] / 20000 - 0.8) < 0.015
    assert abs(counts["validation"] / 20000 - 0.1) < 0.01
    assert abs(counts["test"] / 20000 - 0.1) < 0.01


def _assert_no_family_crosses_splits(ids):
    split_of_family = {}
    for sid in ids:
        family = families.family_of(sid)
        split = families.split_of_id(sid)
        assert split_of_family.setdefault(family, split) == split, (sid, family)
    return split_of_family


def test_no_family_crosses_splits_synthetic():
    rng = np.random.default_rng(0)
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    ids = []
    for _ in range(300):
        ref = "".join(rng.choice(letters, 6))
        for suffix in ("", "01", "02", "_clean", "01_clean", "_charged", "_clean_h", "_SL"):
            ids.append(f"{ref}{suffix}:{ref}{suffix}")
        dep = str(rng.integers(1_000_000, 9_999_999))
        ids += [f"{dep}:{dep}", f"{dep}-variant:{dep}", f"{dep}_molecule_1:b"]
        paper = f"ic{rng.integers(100000, 999999)}x"
        ids += [f"{paper}_si_00{i}_clean:b" for i in range(1, 4)]
    split_of_family = _assert_no_family_crosses_splits(ids)
    assert set(split_of_family.values()) == set(families.SPLITS)
    assert len(split_of_family) == 900


def _core_mof_names(version="2019-ASR"):
    csv_path = cif.core_mof_archive(version).parent / f"{version}.csv"
    with open(csv_path, newline="") as f:
        return [row[0] for row in csv.reader(f)][1:]


def test_no_family_crosses_splits_core_mof_names():
    """All 12,020 CoRE MOF 2019-ASR names: refcode variants share a family and a split."""
    names = _core_mof_names()
    assert len(names) > 12000
    split_of_family = _assert_no_family_crosses_splits(f"{n}:{n}" for n in names)
    variants = collections.defaultdict(set)
    for n in names:
        variants[families.family_of(n)].add(n)
    assert any(len(v) > 1 for f, v in variants.items() if len(f) == 6 and f.isupper())
    per_split = collections.Counter(families.split_of_id(n) for n in names)
    assert 0.77 < per_split["train"] / len(names) < 0.83
    assert 0.08 < per_split["validation"] / len(names) < 0.12
    assert 0.08 < per_split["test"] / len(names) < 0.12
    assert len(split_of_family) > 10000
