"""What every cryknn command-line tool shares: flag parsing, help, errors, exit status.

A tool is a module with `define_flags()` and `main(argv) -> int`; `run_tool` runs it:
  - `-h` / `--help` print the usage line (with positional arguments) and the tool's flags,
    and exit 0;
  - a bad flag, or a `cryknn.errors.UserError` raised by main, prints one line
    `error: <message>` on stderr and exits 2;
  - Ctrl-C prints `interrupted` and exits 130;
  - start-up chatter (absl INFO, XLA's TPU probe) stays off stderr unless --verbosity asks.

`define_dataclass_flags` turns a config dataclass into flags (one per field, with the
field's type, default and help), so a configuration is defined in exactly one place.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import textwrap
import typing
from typing import Any, Callable, Sequence

from absl import app, flags, logging

from cryknn import errors
from cryknn import util

FLAGS = flags.FLAGS
HELP_WIDTH = 100  # --help lines are wrapped to this many columns
HELP_ARGS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")


def run_tool(main: Callable[[list[str]], int | None], *, usage: str, module: str,
             define_flags: Callable[[], None] | None = None,
             argv: Sequence[str] | None = None) -> None:
    """Defines the tool's flags, parses argv, runs main and exits with its status.

    usage: the help text; '{prog}' in it becomes how the tool was called
    (`cryknn <subcommand>`, or `python -m <module>`).
    """
    argv = list(sys.argv if argv is None else argv)
    prog = f"python -m {module}" if argv[0].endswith(".py") else argv[0]
    usage = usage.replace("{prog}", prog)
    # Quiet by default: absl would show INFO records, and JAX logs its TPU probe there.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if hasattr(signal, "SIGPIPE"):  # `cryknn ... | head` ends quietly, as Unix tools do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if define_flags is not None:
        define_flags()

    def parse(args: list[str]) -> list[str]:
        if any(a in HELP_ARGS for a in args[1:args.index("--") if "--" in args else None]):
            print(help_text(usage))
            sys.exit(0)
        try:
            return FLAGS(args)
        except flags.Error as e:
            print(f"error: {util.one_line(e)}", file=sys.stderr)
            sys.exit(2)

    app.run(lambda args: _call(main, args), argv=argv, flags_parser=parse)


def _call(main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        return int(main(argv) or 0)
    except errors.UserError as e:
        print(f"error: {util.one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a read-only --data_dir: the system's words suffice
        print(f"error: {util.one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def help_text(usage: str) -> str:
    """The usage line(s) and every flag the tool defined (absl's own flags left out)."""
    lines = [usage.strip(), "", "flags:"]
    for module, module_flags in sorted(FLAGS.flags_by_module_dict().items()):
        if module.startswith("absl."):
            continue
        for flag in sorted(module_flags, key=lambda f: f.name):
            default = "" if flag.default is None else f" (default: {flag.default_as_str})"
            lines += textwrap.wrap(f"--{flag.name}: {flag.help}{default}", HELP_WIDTH,
                                   initial_indent="  ", subsequent_indent="      ",
                                   break_on_hyphens=False)
    return "\n".join(lines)




def check_output(out: str, inputs: Sequence[str], flag: str = "--out") -> None:
    """ConfigError (one line) unless `out` may be written: absent or a regular file (not a
    symbolic link, device, FIFO or folder), not one of the inputs, and not a CIF inside an
    input folder (it would be read back next time)."""
    try:
        util.check_output_path(out)
    except util.UnsafeOutputError as e:
        raise errors.ConfigError(f"cannot write {flag}={out}: {e}") from None
    real = os.path.realpath(out)
    for path in inputs:
        given = os.path.realpath(path)
        if given == real or (os.path.exists(out) and os.path.exists(path)
                             and not os.path.isdir(path) and os.path.samefile(out, path)):
            raise errors.ConfigError(f"{flag}={out} is one of the input files: refusing to "
                                     f"overwrite it")
        if (os.path.isdir(path) and real.startswith(given.rstrip(os.sep) + os.sep)
                and real.lower().endswith(".cif")):
            raise errors.ConfigError(f"{flag}={out} is a CIF inside the input folder {path}: "
                                     f"refusing to write there")


# ----------------------------------------------------------------------------
# Flags generated from a configuration dataclass.


def _flag_kind(annotation: Any) -> type:
    """bool, int, float or str for a field annotation (optional types allowed)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    kind = args[0] if args else annotation
    if kind not in (bool, int, float, str):
        raise TypeError(f"no flag type for {annotation!r}")
    return kind


_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}


def define_dataclass_flags(cls: type, defaults: Any = None, skip: Sequence[str] = ()) -> None:
    """One flag per field of dataclass `cls`: same name, type and default (or the value
    in `defaults`, an instance), help from the field's metadata['help']."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        default = getattr(defaults, field.name) if defaults is not None else field.default
        _DEFINE[_flag_kind(hints[field.name])](field.name, default,
                                               field.metadata.get("help", field.name))


def dataclass_from_flags(cls: type, skip: Sequence[str] = (), **overrides: Any) -> Any:
    """An instance of `cls` whose fields are the parsed flag values (plus overrides)."""
    values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(cls)
              if f.name not in skip and f.name not in overrides}
    return cls(**values, **overrides)
