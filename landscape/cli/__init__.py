"""The ``landscape`` command line: a thin layer over the Python API, one subcommand per stage.

Bad input ends with one line on stderr and exit code 2; no traceback, no partial output.  With
``--debug`` (before or after COMMAND) or ``LANDSCAPE_DEBUG=1`` in the environment, the full traceback
of a refusal, with the error it came from, is printed before that line; the exit code stays 2.
"""

import argparse
import os
import re
import sys

from .. import __version__
from ..errors import (
    MissingSetting,
    NewHeadRefused,
    OutputBusy,
    OutputRefused,
    OutputUnwritable,
    SamePath,
    SettingsMismatch,
    SettingsRefused,
    UsageError,
)
from .commands import register_all


class _DefaultsFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, added here so that no help string repeats a value
    the parser already holds.  A default of None or False (the option left out) has no value to show:
    its help says what leaving it out means."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or "%(default)" in text or _no_default(action.default):
            return text
        return f"{text} (default: %(default)s)"


def _no_default(value):
    # By identity: a default of 0 or 0.0 is a value to show, though it equals False.
    return value is None or value is False or value is argparse.SUPPRESS


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit code 2), values such as ``-1:1:21`` or
    ``-1e-3`` are values, not options (argparse only exempts plain negative numbers), and every
    option's help shows its default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\d[\d.eE+:-]*$|^-\.\d[\d.eE+:-]*$")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    parser = _OneLineErrorParser(
        prog="landscape",
        description="Fisher information, loss landscapes and guided dropout for pretrained LMs.",
    )
    parser.add_argument("--version", action="version", version=f"landscape {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineErrorParser,
                                       help="a pipeline stage; `landscape COMMAND --help` lists its options")
    subparsers.required = True
    register_all(subparsers)
    for command in subparsers.choices.values():
        # After COMMAND too.  SUPPRESS: a sub-parser's own default would overwrite `landscape --debug COMMAND`.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


_DEBUG_HELP = ("a refusal prints its full traceback (with the error it came from) before its one line; the exit "
               "code stays 2 (also LANDSCAPE_DEBUG=1)")


def _message(err: UsageError, args) -> str:
    """The library's message, plus what to do on the command line where that is a flag."""
    if isinstance(err, OutputRefused):
        return f"{err.reason}; choose another {_flag_of(args, err.path)} or pass --overwrite"
    if isinstance(err, OutputUnwritable) and not str(err.what).startswith("-"):  # a library name: the flag's
        return f"{_flag_of(args, err.path, _OUTPUT_FLAGS.get(err.what, '--out'))} '{err.path}'{err.detail}"
    if isinstance(err, OutputBusy):
        return f"{err.reason}; wait for it to finish or choose another {_flag_of(args, err.path)}"
    if isinstance(err, SettingsMismatch) and hasattr(args, "overwrite"):
        return f"{err}; rerun with --overwrite to replace it, or choose another --out"
    if isinstance(err, SamePath):
        (a, b), (path_a, path_b) = (_setting_flag(args, name) for name in err.names), err.paths
        return f"{a} '{path_a}' and {b} '{path_b}' are the same file; give each its own"
    if isinstance(err, MissingSetting):
        return f"{err}: give {_setting_flag(args, err.needed)}"
    if isinstance(err, SettingsRefused):
        return err.worded(lambda name: _setting_flag(args, name))
    if isinstance(err, NewHeadRefused) and hasattr(args, "allow_new_head"):
        return f"{err} (--allow-new-head)"
    return str(err)


# A stage's output parameters whose flag is not --out (a default path derived from --out is named so).
_OUTPUT_FLAGS = {"runs_out": "--runs-out", "plot": "--plot", "csv": "--csv", "vectors": "--vectors"}


# A stage's path settings whose option is not --NAME: positionals (by their name in the usage line)
# and the library's names for them.
_SETTING_FLAGS = {("plot", "path"): "surface", ("compare", "paths"): "surfaces", ("export", "path"): "--vtk",
                  ("schedule", "fisher"): "fisher", ("profile", "fisher"): "fisher",
                  ("directions", "checkpoints"): "--trajectory", ("directions", "granularity"): "--mask-granularity",
                  ("directions", "orthogonal"): "--orthogonalize"}


def _setting_flag(args, name: str) -> str:
    """The option of the command line that gives the library setting ``name``."""
    return _SETTING_FLAGS.get((args.command, name), f"--{name.replace('_', '-')}")


def _flag_of(args, path, default="--out") -> str:
    """The option that named ``path`` (--out, --csv, --vectors, ...), else ``default``."""
    for name, value in vars(args).items():
        if isinstance(value, str) and value and str(path) in (value, value.rstrip("/")):
            return f"--{name.replace('_', '-')}"
    return default


def _debugging(args=None) -> bool:
    """Whether refusals print their traceback: ``--debug``, or LANDSCAPE_DEBUG set (to anything but 0)."""
    return bool(getattr(args, "debug", False)) or os.environ.get("LANDSCAPE_DEBUG", "0").strip() not in ("", "0")


def _refused(err: UsageError, args) -> int:
    """Print the refusal's one line (after its traceback when debugging); the exit code, 2."""
    if _debugging(args):
        import traceback

        # A refusal raised `from None` hides the error it replaced; debugging is when it is wanted.
        err.__suppress_context__ = False
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    print(f"landscape {args.command}: error: {_message(err, args)}", file=sys.stderr)
    return 2


def main(argv=None):
    from ..outputs import release_all

    args = build_parser().parse_args(argv)
    if getattr(args, "torch_free", False):  # `where`: answers at once, no torch or transformers
        try:
            return int(args.func(args) or 0)
        except UsageError as err:
            return _refused(err, args)
    from ..runtime import end_torchrun_process, leave_torchrun, quiet_transformers

    quiet_transformers()
    try:
        code = _run(args)
    finally:
        release_all()  # the locks of this command's outputs
        in_group = leave_torchrun()
    if in_group:
        end_torchrun_process(code)
    return code


def _run(args) -> int:
    """The subcommand's exit code: 0, 2 for a library error (one line), 130 for Ctrl-C."""
    from ..progress import quiet
    from ..runtime import apply_threads, barrier

    try:
        with quiet(bool(getattr(args, "quiet", False))):  # --quiet: no progress of any stage, model loads included
            # A stage whose settings hold the threads (``ModelSpec.threads``) applies them itself, as the demo does.
            if getattr(args, "threads", None) is not None and not getattr(args, "applies_threads", False):
                apply_threads(args.threads)
            result = args.func(args)
            barrier()  # ranks leave together, once rank 0 has written the output
    except UsageError as err:
        return _refused(err, args)
    except KeyboardInterrupt:
        print(f"landscape {args.command}: interrupted; finished work is kept, rerun to resume",
              file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
