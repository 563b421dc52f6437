"""Structure families and the train/validation/test split rule.

A family groups structures that must never be split apart (polymorphs and re-determinations
of one CSD entry, the structures of one paper's supporting information), so that the test
split holds families never seen in training. The split of a family is a stable hash of its
name: it never depends on the run, the machine, or the other structures in a dataset.

Pure Python; imports nothing from cryknn.
"""

from __future__ import annotations

import hashlib
import os
import re

SPLITS = ("train", "validation", "test")
# Per-mille buckets of the family hash: [0, 800) train, [800, 900) validation, [900, 1000) test.
SPLIT_BOUNDS = (("train", 800), ("validation", 900), ("test", 1000))

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
