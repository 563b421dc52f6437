"""The element table and type-symbol parsing."""

import pytest

from cryknn import elements
from cryknn.errors import UnknownElementError


def test_table_has_118_unique_symbols_in_z_order():
    assert elements.NUM_ELEMENTS == 118
    assert len(elements.SYMBOLS) == 118
    assert len(set(elements.SYMBOLS)) == 118
    for z in range(1, 119):
        assert elements.atomic_number(elements.symbol(z)) == z


@pytest.mark.parametrize("sym, z", [
    ("H", 1), ("He", 2), ("C", 6), ("Fe", 26), ("Tc", 43), ("Ru", 44), ("Te", 52), ("I", 53),
    ("La", 57), ("Lu", 71), ("Hf", 72), ("U", 92), ("Lr", 103), ("Rf", 104), ("Cn", 112),
    ("Og", 118),
])
def test_known_atomic_numbers(sym, z):
    assert elements.atomic_number(sym) == z
    assert elements.symbol(z) == sym


def test_technetium_present_and_tellurium_once():
    assert elements.SYMBOLS.count("Tc") == 1
    assert elements.SYMBOLS.count("Te") == 1


def test_case_insensitive():
    assert elements.atomic_number("CU") == 29
    assert elements.atomic_number("cu") == 29
    assert elements.atomic_number(" Cu ") == 29


@pytest.mark.parametrize("sym", ["D", "T", "d", "t"])
def test_hydrogen_isotopes(sym):
    assert elements.atomic_number(sym) == 1
    with pytest.raises(UnknownElementError, match="isotope"):
        elements.atomic_number(sym, isotopes_as_hydrogen=False)


@pytest.mark.parametrize("z", [0, -1, 119, 200])
def test_symbol_out_of_range(z):
    with pytest.raises(UnknownElementError):
        elements.symbol(z)


@pytest.mark.parametrize("text, z", [
    ("Cu2+", 29), ("O2-", 8), ("O1", 8), ("Ow3", 8), ("Hw1", 1), ("Cl1A", 17), ("C12", 6),
    ("Co1", 27), ("Os", 76), ("Dy3", 66), ("Sn4+", 50), ("Xe", 54), ("Tc1", 43), ("Ti", 22),
    ("D1", 1), ("T2", 1), ("Nb", 41),
])
def test_element_from_type_symbol(text, z):
    assert elements.element_from_type_symbol(text) == z


@pytest.mark.parametrize("text", ["X", "X1", "?", ".", "", "Q12", "Du", "Du1", "DUM1", "Cg1",
                                  "Cnt", "Lp1", "Xx", "12", "Zz"])
def test_unknown_and_dummy_types(text):
    with pytest.raises(UnknownElementError):
        elements.element_from_type_symbol(text)


def test_isotope_types_when_not_accepted():
    with pytest.raises(UnknownElementError, match="isotope"):
        elements.element_from_type_symbol("D1", isotopes_as_hydrogen=False)
    assert elements.element_from_type_symbol("Dy1", isotopes_as_hydrogen=False) == 66
    assert elements.is_hydrogen_isotope("D12")
    assert elements.is_hydrogen_isotope("T")
    assert not elements.is_hydrogen_isotope("Dy1")
    assert not elements.is_hydrogen_isotope("Du")
    assert not elements.is_hydrogen_isotope("H1")


def test_parse_element_list():
    assert elements.parse_element_list("C,N,O") == [6, 7, 8]
    assert elements.parse_element_list(" cu , Zn ") == [29, 30]
    for bad in ["", ",", "C,X", "C,C", "D"]:
        with pytest.raises(UnknownElementError):
            elements.parse_element_list(bad)
