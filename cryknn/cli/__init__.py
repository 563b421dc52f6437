"""The `cryknn` command: `cryknn train | featurize | data | predict | check [flags] [args]`.

`cryknn check` is another name for `cryknn predict`; `cryknn --version` prints the version.

Each subcommand is a module of this package (`python -m cryknn.main`, `cryknn.featurize`,
`cryknn.data` and `cryknn.predict` run the same tools); only the chosen one is imported, so
`cryknn predict` never loads the training or dataset code. `command` is their flag plumbing.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

SUBCOMMANDS = {
    "train": ("cryknn.cli.train", "train and evaluate the element predictor"),
    "featurize": ("cryknn.cli.featurize", "exact periodic k-NN distances of CIF files, as .npz"),
    "data": ("cryknn.cli.data", "build a dataset of structures, or show its element statistics"),
    "predict": ("cryknn.cli.predict", "score the element of every site of structure files"),
    "check": ("cryknn.cli.predict", "the same as predict: flag implausible sites (by default "
              "with the shipped model that checks best)"),
}


def usage() -> str:
    lines = ["usage: cryknn {" + ",".join(SUBCOMMANDS) + "} [flags] [arguments]",
             "       cryknn --version", ""]
    lines += [f"  {name:<10} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "cryknn SUBCOMMAND --help shows the subcommand's flags."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    name = argv[1]
    if name in ("--version", "-V", "version"):
        from cryknn import __version__

        print(f"cryknn {__version__}")
        sys.exit(0)
    if name not in SUBCOMMANDS:
        print(f"error: unknown subcommand {name!r}; choose one of {', '.join(SUBCOMMANDS)}",
              file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(SUBCOMMANDS[name][0])
    module.run([f"cryknn {name}"] + argv[2:])

