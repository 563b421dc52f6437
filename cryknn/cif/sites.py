"""The atom-site loop of a data block: coordinates, labels, elements, occupancies."""

from __future__ import annotations

import numpy as np

from cryknn import elements
from cryknn import errors
from cryknn.cif import values
from cryknn.cif.options import ReadOptions
from cryknn.cif.structure import MAX_FRACTIONAL
from cryknn.cif.values import BlockSkip

SITE_TAGS = ("fract_x", "?fract_y", "?fract_z", "?label", "?type_symbol", "?occupancy",
             "?disorder_group", "?disorder_assembly", "?calc_flag")
X, Y, Z, LABEL, TYPE, OCC, GROUP, ASSEMBLY, CALC = range(len(SITE_TAGS))

_element_cache: dict[tuple[str, bool], int | str] = {}


def _element(symbol: str, isotopes_as_hydrogen: bool) -> int | str:
    """Atomic number, or the skip reason for this type symbol (memoised)."""
    key = (symbol, isotopes_as_hydrogen)
    found = _element_cache.get(key)
    if found is None:
        try:
            found = elements.element_from_type_symbol(symbol, isotopes_as_hydrogen=True)
            if found == 1 and not isotopes_as_hydrogen and elements.is_hydrogen_isotope(symbol):
                found = f"hydrogen isotope {symbol!r} (isotopes_as_hydrogen=False)"
        except errors.UnknownElementError as e:
            found = f"unknown element type {symbol!r}"
            if "placeholder" in str(e):
                found += " (a placeholder name, not one of the 118 element symbols)"
        if len(_element_cache) < 100_000:
            _element_cache[key] = found
    return found


def site_table(block):
    table = block.find("_atom_site_", list(SITE_TAGS))
    if len(table) == 0:
        if block.find_values("_atom_site_Cartn_x"):
            raise BlockSkip("atom sites have Cartesian coordinates only (no _atom_site_fract_x)")
        if block.find_values("_atom_site_label") or block.find_values("_atom_site_type_symbol"):
            raise BlockSkip("atom sites have no fractional coordinates (_atom_site_fract_x)")
        raise BlockSkip("no atom sites")
    for col, tag in ((Y, "fract_y"), (Z, "fract_z")):
        if not table.has_column(col):
            raise BlockSkip(f"atom sites lack _atom_site_{tag}")
    return table


def site_names(table) -> tuple[list[str], list[str]]:
    """(labels, element symbols) of the site rows; each falls back on the other."""
    labels = values.unquote(table.column(LABEL)) if table.has_column(LABEL) else None
    types = values.unquote(table.column(TYPE)) if table.has_column(TYPE) else None
    if types is None and labels is None:
        raise BlockSkip("atom sites have neither _atom_site_type_symbol nor _atom_site_label")
    return (labels if labels is not None else types), (types if types is not None else labels)


def atomic_numbers(table, labels: list[str], symbols: list[str],
                   options: ReadOptions) -> np.ndarray:
    """(S,) int32 element of each site row; dummy atoms and unknown types skip the block."""
    if table.has_column(CALC):
        flags = [f.lower() for f in table.column(CALC)]
        if "dum" in flags:
            site = labels[flags.index("dum")]
            raise BlockSkip(f"dummy atom at site {site!r} (_atom_site_calc_flag dum)")
    unique, inverse = np.unique(np.array(symbols, dtype=str), return_inverse=True)
    z_unique = np.empty(len(unique), dtype=np.int32)
    for k, sym in enumerate(unique.tolist()):
        z = _element(sym, options.isotopes_as_hydrogen)
        if isinstance(z, str):
            site = labels[int(np.flatnonzero(inverse.reshape(-1) == k)[0])]
            raise BlockSkip(f"{z} at site {site!r}")
        z_unique[k] = z
    return z_unique[inverse.reshape(-1)]


def occupancies(table, labels: list[str]) -> np.ndarray:
    """(S,) float64 occupancy of each site row (missing or null: 1)."""
    if not table.has_column(OCC):
        return np.ones(len(labels), dtype=np.float64)
    occ = values.floats(list(table.column(OCC)))
    occ[~np.isfinite(occ)] = 1.0
    if (occ < 0).any():
        k = int(np.flatnonzero(occ < 0)[0])
        raise BlockSkip(f"negative occupancy {occ[k]:g} at site {labels[k]!r}")
    return occ




def label_guesses(labels: list[str]) -> tuple[str, ...]:
    """Without _atom_site_type_symbol every element is guessed from its site label
    (`elements.element_from_type_symbol`): the note saying so, or a skip for a label whose
    one-letter element is followed by a lowercase letter. A two-letter symbol has its
    second letter in lowercase, so 'WatII' or 'Ow1' name something else (water) and would
    otherwise read as W or O; 'NaI', 'MgT', 'OW1' and 'HN1' read as Na, Mg, O and H."""
    guesses = {}
    for label in dict.fromkeys(labels):
        text = label.strip()
        try:
            symbol = elements.symbol(elements.element_from_type_symbol(text))
        except errors.UnknownElementError:
            continue  # dummy atoms and unknown types: the element check skips with a reason
        if len(symbol) == 1 and text[1:2].islower():
            raise BlockSkip(f"no _atom_site_type_symbol, and site label {label!r} does not "
                            f"name its element ({text[:2]!r} is no element symbol; read as "
                            f"{symbol} it could be wrong)")
        guesses[label] = symbol
    shown = ", ".join(f"{label}->{e}" for label, e in list(guesses.items())[:6])
    more = f", ... ({len(guesses)} labels)" if len(guesses) > 6 else ""
    return (f"elements guessed from site labels (no _atom_site_type_symbol): {shown}{more}",)



def check_fractional(frac: np.ndarray, labels: list[str]) -> None:
    far = np.abs(frac).max(axis=1) > MAX_FRACTIONAL
    if far.any():
        k = int(np.flatnonzero(far)[0])
        raise BlockSkip(f"fractional coordinate {np.abs(frac[k]).max():g} at site "
                        f"{labels[k]!r} beyond +-{MAX_FRACTIONAL:g} (no position in the cell "
                        f"survives); {int(far.sum())} such site(s)")

