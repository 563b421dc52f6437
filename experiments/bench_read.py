"""CIF reading throughput: cryknn (gemmi) vs ASE vs pymatgen, side by side in one run.

Inputs are the shared COD files and the first --core_mof_limit members of a CoRE MOF
archive. Every file is loaded into memory first, so all readers parse the same bytes and
the timings exclude disk reads and xz decompression; cryknn's streaming reader straight
out of the archive (decompression included) is timed as an extra row. Each reader
counts the structures it returns and their atoms (sites of its unit cells: ASE and
pymatgen keep partially occupied sites that cryknn's default "majority" policy
resolves, so atom counts differ on disordered files).

    python experiments/bench_read.py [--cod_dir=DIR] [--core_mof_limit=1000]
        [--readers=cryknn,ase,pymatgen] [--timeout_s=30] [--budget_s=120] [--json=FILE]

ASE's reader needs seconds per CoRE MOF file (pure-Python symmetry handling), so each
peer stops after --budget_s per dataset; its rate and the "cryknn x" ratio (time ratio
on the very same files) use the files it got through.

ASE and pymatgen are benchmark-only dependencies, imported lazily; a reader that is not
installed is reported and left out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import signal
import sys
import tarfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryknn import cif, errors

DEFAULT_COD = Path(__file__).resolve().parents[2] / "shared" / "data" / "cod"


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise _Timeout in the block after seconds (main thread, Unix); no-op elsewhere."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- readers: (name, bytes) -> (structures, atoms) -------------------------------------

def read_cryknn(name: str, data: bytes) -> tuple[int, int]:
    found, _ = cif.read_cif_text(data, name)
    return len(found), sum(s.num_atoms for s in found)


def make_ase_reader():
    import ase.io  # benchmark-only dependency

    def read_ase(name: str, data: bytes) -> tuple[int, int]:
        images = ase.io.read(io.BytesIO(data), format="cif", index=":")
        return len(images), sum(len(atoms) for atoms in images)
    return read_ase


def make_pymatgen_reader():
    from pymatgen.io.cif import CifParser  # benchmark-only dependency

    def read_pymatgen(name: str, data: bytes) -> tuple[int, int]:
        text = data.decode("utf-8", errors="replace")
        found = CifParser.from_str(text).parse_structures(primitive=False, on_error="ignore")
        return len(found), sum(len(s) for s in found)
    return read_pymatgen


READERS = {"cryknn": lambda: read_cryknn, "ase": make_ase_reader,
           "pymatgen": make_pymatgen_reader}


# --- inputs ---------------------------------------------------------------------------

def load_cod(folder: Path) -> list[tuple[str, bytes]]:
    return [(p.stem, p.read_bytes()) for p in cif.iter_cif_paths([folder])]


def load_core_mof(version: str, limit: int) -> list[tuple[str, bytes]]:
    out = []
    with tarfile.open(cif.core_mof_archive(version), mode="r|xz") as tar:
        for member in tar:
            if len(out) >= limit:
                break
            if member.isfile() and member.name.lower().endswith(".cif"):
                out.append((Path(member.name).stem, tar.extractfile(member).read()))
    return out


def run_reader(reader, files, timeout_s: float, budget_s: float) -> dict:
    """Reads files in order until done or budget_s has passed (0: no budget).

    Returns a summary; "per_file" holds (seconds, structures, atoms) of each file read,
    for comparing readers on the same files.
    """
    for name, data in files[:3]:  # warm-up (imports, caches), not timed
        with contextlib.suppress(Exception), _time_limit(timeout_s):
            reader(name, data)
    per_file, failed, timed_out = [], 0, 0
    total = 0.0
    for name, data in files:
        if budget_s and total > budget_s:
            break
        start, cpu_start = time.perf_counter(), time.process_time()
        n = a = 0
        try:
            with _time_limit(timeout_s):
                n, a = reader(name, data)
        except _Timeout:
            timed_out += 1
        except Exception:  # noqa: BLE001 - a reader failing on a file is counted
            failed += 1
        seconds = time.perf_counter() - start
        total += seconds
        per_file.append((seconds, time.process_time() - cpu_start, n, a))
    return summarize(per_file, failed, timed_out)


def summarize(per_file, failed: int = 0, timed_out: int = 0) -> dict:
    """Totals over per_file rows (wall s, cpu s, structures, atoms); rates per CPU second
    (one thread each, so shared machines disturb them less than wall time)."""
    seconds = sum(row[0] for row in per_file)
    cpu_seconds = sum(row[1] for row in per_file)
    found = sum(row[2] for row in per_file)
    atoms = sum(row[3] for row in per_file)
    return {"files": len(per_file), "structures": found, "atoms": atoms,
            "failed_files": failed, "timed_out_files": timed_out, "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "structures_per_s": found / cpu_seconds if cpu_seconds else 0.0,
            "atoms_per_s": atoms / cpu_seconds if cpu_seconds else 0.0,
            "per_file": per_file}


def run_cryknn_streaming(version: str, limit: int) -> dict:
    found = atoms = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for item in cif.iter_core_mof(version, limit=limit):
        if isinstance(item, cif.Structure):
            found += 1
            atoms += item.num_atoms
    row = (time.perf_counter() - start, time.process_time() - cpu_start, found, atoms)
    result = summarize([row])
    result["files"] = limit
    del result["per_file"]
    return result


def add_speedups(by_reader: dict) -> None:
    """cryknn_speedup: that reader's CPU time / cryknn's on the same files (prefix)."""
    base = by_reader.get("cryknn", {}).get("per_file")
    for name, r in by_reader.items():
        if base is None or name.startswith("cryknn") or "per_file" not in r:
            continue
        k = len(r["per_file"])
        cryknn_cpu = sum(row[1] for row in base[:k])
        r["cryknn_speedup"] = r["cpu_seconds"] / cryknn_cpu if cryknn_cpu else None
        r["cryknn_on_same_files"] = {
            key: value for key, value in summarize(base[:k]).items() if key != "per_file"}


def print_table(results: dict) -> None:
    header = (f"{'dataset':<18} {'reader':<21} {'files':>6} {'structs':>8} {'atoms':>9} "
              f"{'failed':>6} {'wall s':>8} {'cpu s':>8} {'structs/s':>10} {'atoms/s':>10} "
              f"{'cryknn x':>9}")
    print(header)
    print("-" * len(header))
    for dataset, by_reader in results.items():
        for reader, r in by_reader.items():
            speedup = r.get("cryknn_speedup")
            ratio = f"{speedup:.1f}" if speedup else ""
            failed = r["failed_files"] + r["timed_out_files"]
            print(f"{dataset:<18} {reader:<21} {r['files']:>6} {r['structures']:>8} "
                  f"{r['atoms']:>9} {failed:>6} {r['seconds']:>8.2f} {r['cpu_seconds']:>8.2f} "
                  f"{r['structures_per_s']:>10.1f} {r['atoms_per_s']:>10.0f} {ratio:>9}")
    print("files: files read (a reader stops after --budget_s of wall time); failed: files it "
          "raised on or timed out;\nstructs/s, atoms/s: per CPU second of the reading process; "
          "cryknn x: that reader's CPU time / cryknn's on the same files.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cod_dir", type=Path, default=DEFAULT_COD,
                        help="folder of CIFs (default: ../shared/data/cod; skipped if absent)")
    parser.add_argument("--core_mof_version", default="2019-ASR",
                        choices=cif.CORE_MOF_VERSIONS)
    parser.add_argument("--core_mof_limit", type=int, default=1000,
                        help="number of CoRE MOF members to read (0: skip CoRE MOF)")
    parser.add_argument("--readers", default="cryknn,ase,pymatgen",
                        help="comma-separated subset of cryknn,ase,pymatgen")
    parser.add_argument("--timeout_s", type=float, default=30.0,
                        help="per-file time limit for each reader (0: none)")
    parser.add_argument("--budget_s", type=float, default=120.0,
                        help="stop a reader on a dataset after this many seconds; its rate "
                             "and the ratio use the files it read (0: no budget)")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    args = parser.parse_args(argv)

    names = [r.strip() for r in args.readers.split(",") if r.strip()]
    unknown = [r for r in names if r not in READERS]
    if unknown:
        print(f"error: unknown reader(s) {', '.join(unknown)}; choose from "
              f"{', '.join(READERS)}", file=sys.stderr)
        return 2
    readers = {}
    for name in names:
        try:
            readers[name] = READERS[name]()
        except ImportError as err:
            print(f"note: {name} is not installed ({err}); left out")

    datasets = {}
    if args.cod_dir and args.cod_dir.is_dir():
        datasets["cod"] = load_cod(args.cod_dir)
    else:
        print(f"note: {args.cod_dir} is absent; COD left out")
    if args.core_mof_limit > 0:
        try:
            datasets[f"core_mof_{args.core_mof_version}"] = load_core_mof(
                args.core_mof_version, args.core_mof_limit)
        except errors.DataNotFoundError as err:
            print(f"note: {err}; CoRE MOF left out")
    if not datasets:
        print("error: no input data", file=sys.stderr)
        return 1

    logging.disable(logging.WARNING)
    results: dict[str, dict] = {}
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for dataset, files in datasets.items():
            results[dataset] = {}
            for name, reader in readers.items():
                budget = 0.0 if name == "cryknn" else args.budget_s
                results[dataset][name] = run_reader(reader, files, args.timeout_s, budget)
                r = results[dataset][name]
                print(f"{dataset}: {name} read {r['structures']} structures from "
                      f"{r['files']} of {len(files)} files in {r['seconds']:.2f} s",
                      file=sys.stdout, flush=True)
            if dataset.startswith("core_mof") and "cryknn" in readers:
                results[dataset]["cryknn (from .tar.xz)"] = run_cryknn_streaming(
                    args.core_mof_version, len(files))
            add_speedups(results[dataset])
    print()
    print_table(results)
    if args.json:
        for by_reader in results.values():
            for r in by_reader.values():
                r.pop("per_file", None)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
