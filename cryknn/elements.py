"""The periodic table: 118 element symbols indexed by atomic number Z = 1..118.

The original research code listed Te twice and had no Tc; this table is checked by
tests (118 unique symbols, Z order) and is the one place symbols are defined.
"""

from __future__ import annotations

import re

from cryknn import errors

# Index i holds the symbol of Z = i + 1.
SYMBOLS: tuple[str, ...] = (
    "H", "He",
    "Li", "Be", "B", "C", "N", "O", "F", "Ne",
    "Na", "Mg", "Al", "Si", "P", "S", "Cl", "Ar",
    "K", "Ca", "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn",
    "Ga", "Ge", "As", "Se", "Br", "Kr",
    "Rb", "Sr", "Y", "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd",
    "In", "Sn", "Sb", "Te", "I", "Xe",
    "Cs", "Ba",
    "La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu",
    "Hf", "Ta", "W", "Re", "Os", "Ir", "Pt", "Au", "Hg",
    "Tl", "Pb", "Bi", "Po", "At", "Rn",
    "Fr", "Ra",
    "Ac", "Th", "Pa", "U", "Np", "Pu", "Am", "Cm", "Bk", "Cf", "Es", "Fm", "Md", "No", "Lr",
    "Rf", "Db", "Sg", "Bh", "Hs", "Mt", "Ds", "Rg", "Cn",
    "Nh", "Fl", "Mc", "Lv", "Ts", "Og",
)
NUM_ELEMENTS = len(SYMBOLS)  # 118

_Z_BY_SYMBOL = {s.lower(): z for z, s in enumerate(SYMBOLS, start=1)}
HYDROGEN_ISOTOPES = ("D", "T")


# Element pairs next to each other in Z whose electron densities X-ray diffraction barely
# tells apart: the classic mis-assignment of a crystal structure's sites.
ADJACENT_Z_PAIRS = (("C", "N"), ("N", "O"), ("O", "F"), ("P", "S"), ("S", "Cl"), ("Mn", "Fe"),
                    ("Fe", "Co"), ("Co", "Ni"), ("Ni", "Cu"), ("Cu", "Zn"), ("Ag", "Cd"),
                    ("Cd", "In"))


def symbol(z: int) -> str:
    """Element symbol of atomic number z (1..118)."""
    if not 1 <= int(z) <= NUM_ELEMENTS:
        raise errors.UnknownElementError(f"atomic number {z} is outside 1..{NUM_ELEMENTS}")
    return SYMBOLS[int(z) - 1]


def atomic_number(sym: str, *, isotopes_as_hydrogen: bool = True) -> int:
    """Atomic number of an element symbol, case-insensitive ('CU' == 'Cu').

    Deuterium 'D' and tritium 'T' map to hydrogen (Z=1) unless
    isotopes_as_hydrogen is False, in which case they raise UnknownElementError.
    """
    key = sym.strip()
    if key in HYDROGEN_ISOTOPES or key.upper() in HYDROGEN_ISOTOPES:
        if isotopes_as_hydrogen:
            return 1
        raise errors.UnknownElementError(f"hydrogen isotope {sym!r} (isotopes_as_hydrogen is off)")
    z = _Z_BY_SYMBOL.get(key.lower())
    if z is None:
        raise errors.UnknownElementError(f"unknown element symbol {sym!r}")
    return z


_LEADING_LETTERS = re.compile(r"^([A-Za-z]+)")

# Type symbols / labels that name no atom: dummy atoms, ring centroids, lone pairs,
# SHELX Q peaks and unknowns (compared case-insensitively with the leading letters).
# Without this list 'Du1' would fall back to 'D' (deuterium) and 'Cg1' to carbon.
DUMMY_SYMBOLS = ("du", "dum", "dummy", "cg", "cnt", "cent", "lp", "q", "x", "xx")


# IUPAC's temporary names of elements 100-219 (Unq, Uuo, Ubn): three letters spelling
# digits (n 0, u 1, b 2, t 3, q 4, p 5, h 6, s 7, o 8, e 9). Without this 'Uuo' would fall
# back on 'U' (uranium).
_PLACEHOLDER = re.compile(r"^(u[nubtqphsoe]{2}|b[nu][nubtqphsoe])$", re.IGNORECASE)


def _element_letters(type_symbol: str) -> str:
    """The element symbol a CIF type symbol or site label starts with.

    'Cu2+' -> 'Cu', 'O1' -> 'O', 'Ow3' -> 'O', 'Cl1A' -> 'Cl', 'D12' -> 'D'.
    The two leading letters win when they name an element, else the first letter.
    """
    match = _LEADING_LETTERS.match(type_symbol.strip())
    if not match:
        raise errors.UnknownElementError(f"no element symbol in {type_symbol!r}")
    letters = match.group(1)
    if _PLACEHOLDER.match(letters):
        raise errors.UnknownElementError(
            f"{type_symbol!r} is a systematic placeholder name (like Uuo for element 118, "
            f"now Og), not one of the 118 element symbols")
    if letters.lower() in DUMMY_SYMBOLS:
        raise errors.UnknownElementError(f"{type_symbol!r} is a dummy or unknown atom type")
    for candidate in dict.fromkeys((letters[:2], letters[:1])):
        if candidate.lower() in _Z_BY_SYMBOL or candidate.upper() in HYDROGEN_ISOTOPES:
            return candidate
    raise errors.UnknownElementError(f"unknown element symbol {type_symbol!r}")


def element_from_type_symbol(type_symbol: str, *, isotopes_as_hydrogen: bool = True) -> int:
    """Atomic number from a CIF _atom_type_symbol / site label such as 'Cu2+', 'O1', 'Fe3'.

    Tries the two leading letters, then one ('Co1' is Co, 'Cl' is Cl, 'C12' is C,
    'Os' is Os, 'Ow1' is O). Raises UnknownElementError for X, ?, Q, Du, Cg and the
    like (see DUMMY_SYMBOLS), and for D / T when isotopes_as_hydrogen is False.
    """
    return atomic_number(_element_letters(type_symbol), isotopes_as_hydrogen=isotopes_as_hydrogen)


def is_hydrogen_isotope(type_symbol: str) -> bool:
    """True for type symbols / labels naming deuterium or tritium ('D', 'D1', 'T2')."""
    try:
        return _element_letters(type_symbol).upper() in HYDROGEN_ISOTOPES
    except errors.UnknownElementError:
        return False


def parse_element_list(text: str) -> list[int]:
    """'C,N,O' -> [6, 7, 8]; raises UnknownElementError naming the bad symbol."""
    symbols = [s.strip() for s in text.split(",") if s.strip()]
    if not symbols:
        raise errors.UnknownElementError("empty element list")
    out = []
    for s in symbols:
        z = atomic_number(s, isotopes_as_hydrogen=False)
        if z in out:
            raise errors.UnknownElementError(f"element {s!r} listed twice")
        out.append(z)
    return out
