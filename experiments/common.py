"""Shared helpers of the research scripts in experiments/ (distances, k sweep, warm start,
confusions): where the data lives, reading a capped number of structures, element groups,
a covalent-radius table, markdown tables, the best-k criterion and a saved model's test
split.

Everything here is pure Python/numpy at import (no JAX, no TFDS; functions that need them
import them when called) so tests can import it cheaply.
The training experiments take every field of `cryknn.config.Config` as a flag, exactly as
`python -m cryknn.main` does, with the same defaults (`define_run_flags`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cryknn import elements  # noqa: E402

DEFAULT_COD = REPO.parent / "shared" / "data" / "cod"
FIGURES = REPO / "docs" / "figures"
# Tables, workdirs and raw results of the experiments (outside the repository; override with
# $CRYKNN_EXPERIMENTS). docs/results.md quotes what matters from here.
SCRATCH = Path(os.environ.get("CRYKNN_EXPERIMENTS", "/tmp/cryknn_experiments"))

# ----------------------------------------------------------------------------
# Single-bond covalent radii (angstrom) from
#   B. Cordero, V. Gomez, A. E. Platero-Prats, M. Reves, J. Echeverria, E. Cremades,
#   F. Barragan, S. Alvarez, "Covalent radii revisited", Dalton Trans. 2008, 2832-2838,
#   doi:10.1039/B801115J (Table 2).
# C is the sp3 value (sp2 0.73, sp 0.69); Mn, Fe and Co are the low-spin values (high spin
# 1.61, 1.52, 1.50). Only the elements the scripts plot or tabulate are listed; others
# give None (no line is drawn).
COVALENT_RADIUS: dict[str, float] = {
    "H": 0.31, "Li": 1.28, "Be": 0.96, "B": 0.84, "C": 0.76, "N": 0.71, "O": 0.66, "F": 0.57,
    "Na": 1.66, "Mg": 1.41, "Al": 1.21, "Si": 1.11, "P": 1.07, "S": 1.05, "Cl": 1.02,
    "K": 2.03, "Ca": 1.76, "Sc": 1.70, "Ti": 1.60, "V": 1.53, "Cr": 1.39, "Mn": 1.39,
    "Fe": 1.32, "Co": 1.26, "Ni": 1.24, "Cu": 1.32, "Zn": 1.22, "Ga": 1.22, "Ge": 1.20,
    "As": 1.19, "Se": 1.20, "Br": 1.20, "Rb": 2.20, "Sr": 1.95, "Y": 1.90, "Zr": 1.75,
    "Nb": 1.64, "Mo": 1.54, "Ru": 1.46, "Rh": 1.42, "Pd": 1.39, "Ag": 1.45, "Cd": 1.44,
    "In": 1.42, "Sn": 1.39, "Sb": 1.39, "Te": 1.38, "I": 1.39, "Cs": 2.44, "Ba": 2.15,
    "La": 2.07, "Ce": 2.04, "Pr": 2.03, "Nd": 2.01, "Sm": 1.98, "Eu": 1.98, "Gd": 1.96,
    "Tb": 1.94, "Dy": 1.92, "Ho": 1.92, "Er": 1.89, "Tm": 1.90, "Yb": 1.87, "Lu": 1.87,
    "Hf": 1.75, "Ta": 1.70, "W": 1.62, "Re": 1.51, "Os": 1.44, "Ir": 1.41, "Pt": 1.36,
    "Au": 1.36, "Hg": 1.32, "Tl": 1.45, "Pb": 1.46, "Bi": 1.48, "Th": 2.06, "U": 1.96,
}
COVALENT_SOURCE = "Cordero et al., Dalton Trans. 2008, 2832 (doi:10.1039/B801115J)"

# Elements that are not metals (metalloids B, Si, Ge, As, Sb, Te count as non-metals here);
# every other element is grouped as "M" by `group_symbol`.
NON_METALS = frozenset(
    "H He B C N O F Ne Si P S Cl Ar Ge As Se Br Kr Sb Te I Xe At Rn Ts Og".split())
METAL = "M"


def is_metal(symbol: str) -> bool:
    return symbol not in NON_METALS


def group_symbol(symbol: str) -> str:
    """Element symbol, or "M" for any metal."""
    return METAL if is_metal(symbol) else symbol


def covalent_sum(a: str, b: str) -> float | None:
    """r_cov(a) + r_cov(b) in angstrom (None when either is not in the table)."""
    ra, rb = COVALENT_RADIUS.get(a), COVALENT_RADIUS.get(b)
    return None if ra is None or rb is None else ra + rb


METAL_SYMBOLS = tuple(s for s in elements.SYMBOLS if s not in NON_METALS)


def symbols_of(numbers: np.ndarray) -> np.ndarray:
    """(...,) atomic numbers -> (...,) element symbols ('<U2' array)."""
    table = np.asarray([""] + list(elements.SYMBOLS), dtype="<U2")
    return table[np.asarray(numbers)]


def group_symbols(symbols: np.ndarray) -> np.ndarray:
    """Vectorised group_symbol: metals -> "M", others unchanged ('<U2' array)."""
    symbols = np.asarray(symbols, dtype="<U2")
    return np.where(np.isin(symbols, METAL_SYMBOLS), METAL, symbols)


# ----------------------------------------------------------------------------
# Data.


def read_structures(source: str, limit: int | None, cod_dir: str | os.PathLike = DEFAULT_COD
                    ) -> tuple[list, list]:
    """Up to `limit` structures of 'core_mof' (the embedded 2019-ASR archive, first members
    in archive order) or 'cod' (every CIF under cod_dir). Returns (structures, skips).

    Raises FileNotFoundError when source is 'cod' and cod_dir does not exist.
    """
    from cryknn import cif

    if source == "core_mof":
        stream: Iterable = cif.iter_core_mof("2019-ASR")
    elif source == "cod":
        if not Path(cod_dir).is_dir():
            raise FileNotFoundError(f"COD folder {cod_dir} not found")
        stream = cif.iter_structures([cod_dir])
    else:
        raise ValueError(f"unknown source {source!r} (core_mof or cod)")
    kept, skips = [], []
    for item in stream:
        if isinstance(item, cif.Skip):
            skips.append(item)
            continue
        if item.num_atoms == 0:
            continue
        kept.append(item)
        if limit is not None and len(kept) >= limit:
            break
    return kept, skips


def saved_model_test_split(folder: str, data_dir: str | None):
    """(model, table, rows, labels): the saved model in folder (a `scoring.Model`), its
    dataset's test split from the feature cache of the build it was trained on, and the
    rows of the atoms whose element it models with their classes, in table order (the
    atoms a training run evaluates)."""
    from cryknn import features, input_pipeline, saved_model, scoring

    model = scoring.Model(saved_model.load(folder), folder)
    table = features.load_features(model.saved.config.dataset, "test", model.k,
                                   data_dir=data_dir,
                                   fingerprint=model.saved.info["dataset_fingerprint"])
    labels = input_pipeline.label_table(model.saved.atomic_numbers)[table.atomic_number]
    rows = np.flatnonzero(labels >= 0)
    return model, table, rows, labels[rows]


def best_ms(fn: Callable, args: Sequence, repeats: int, rounds: int = 3) -> float:
    """Best mean milliseconds per call of fn(*args) over `rounds` rounds of `repeats`
    calls, after one untimed call (compilation); waits for JAX's results."""
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / repeats * 1e3)
    return best


def load_json(path: str | os.PathLike) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: str | os.PathLike, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------
# Tables.


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, (int, np.integer)):
        return f"{int(x)}"
    return f"{float(x):.{digits}f}"


def markdown_table(rows: Sequence[dict], columns: Sequence[str],
                   headers: Sequence[str] | None = None, digits: int = 3) -> str:
    """A GitHub markdown table of rows (dicts) restricted to columns."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(
            fmt(row.get(c), digits) if not isinstance(row.get(c), str) else row[c]
            for c in columns) + " |")
    return "\n".join(lines)


def write_csv(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str]) -> None:
    import csv

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({c: row.get(c) for c in columns})


# ----------------------------------------------------------------------------
# Summary statistics over seeds and the best-k criterion.


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def best_k_one_sd(per_k: dict[int, Sequence[float]]) -> dict:
    """The one-standard-error-style rule on seeds: the smallest k whose mean score is within
    one standard deviation (over seeds) of the best mean score.

    per_k: k -> scores over seeds (e.g. test balanced accuracy). Returns
    {'best_k', 'best_mean', 'best_std', 'threshold', 'chosen_k', 'chosen_mean'}.
    """
    if not per_k:
        raise ValueError("no runs to choose from")
    stats = {k: mean_std(v) for k, v in per_k.items()}
    best_k = max(stats, key=lambda k: (stats[k][0], -k))
    best_mean, best_std = stats[best_k]
    threshold = best_mean - best_std
    chosen = min(k for k, (m, _) in stats.items() if m >= threshold)
    return {"best_k": best_k, "best_mean": best_mean, "best_std": best_std,
            "threshold": threshold, "chosen_k": chosen, "chosen_mean": stats[chosen][0]}


def define_run_flags() -> None:
    """The run flags of `python -m cryknn.main` (every Config field, same defaults), plus
    --name (the output folder and figure) and --seeds (comma-separated)."""
    from absl import flags

    from cryknn import config
    from cryknn.cli import command

    command.define_dataclass_flags(config.Config)
    flags.DEFINE_string("name", "core_mof", "Names the output folder and figures.")
    flags.DEFINE_string("seeds", "0,1,2", "Random seeds, comma-separated (one run each).")


def run_config(**overrides):
    """The Config of the run flags, with fields replaced by overrides."""
    from cryknn import config
    from cryknn.cli import command

    return dataclasses.replace(command.dataclass_from_flags(config.Config), **overrides)


def parse_ints(text: str) -> list[int]:
    """'1,2,5' -> [1, 2, 5]."""
    return [int(x) for x in text.split(",") if x.strip()]


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


# Profiles of compiled steps (experiments/profile_model.py).

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}")


def op_sources(hlo_text: str) -> dict[str, str]:
    """{HLO instruction name: 'forward|backward module/path'} from compiled HLO text, e.g.
    'backward GraphModel/layer0/norm' (the first three op_name components under the
    jit, without jvp/transpose wrappers)."""
    out = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        name = match and re.search(r'op_name="([^"]*)"', match.group(2))
        if not name:
            continue
        path = name.group(1)
        direction = "backward" if "transpose(" in path else "forward"
        path = re.sub(r"^jit\([^)]*\)/", "", path)
        path = re.sub(r"(transpose|jvp|vmap)\(|\)", "", path)
        out[match.group(1)] = f"{direction} {'/'.join([p for p in path.split('/') if p][:3])}"
    return out


def group_times(events: list[dict], sources: dict[str, str], steps: int) -> dict[str, float]:
    """Milliseconds per step of each source group, from Perfetto 'X' events named after
    HLO instructions (events of other names are not ops of the step and are left out)."""
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in sources:
            totals[sources[event["name"]]] += event.get("dur", 0) / 1000 / steps
    return dict(totals.most_common())
