"""The ``landscape`` command line: a thin layer over the Python API, one subcommand per stage.

Bad input ends with one line on stderr and exit code 2; no traceback, no partial output.
"""

import argparse
import re
import sys

from . import __version__
from .commands import register_all
from .errors import UsageError


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit code 2), and values such as
    ``-1:1:21`` or ``-1e-3`` are values, not options (argparse only exempts plain negative numbers)."""

    def __init__(self, *args, **kwargs):
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
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineErrorParser)
    subparsers.required = True
    register_all(subparsers)
    return parser


def _quiet_transformers():
    # Our stages show their own progress bars; transformers' per-load bars would bury them.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv=None):
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    try:
        result = args.func(args)
    except UsageError as err:
        print(f"landscape {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"landscape {args.command}: interrupted; finished work is kept, rerun to resume",
              file=sys.stderr)
        return 130
    finally:
        _leave_torchrun()
    return int(result or 0)


def _leave_torchrun():
    # A gloo/NCCL group left open until interpreter exit can abort the process (SIGABRT).
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
