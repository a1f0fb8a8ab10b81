"""plot, compare."""

from .common import not_built


def register(subparsers):
    not_built(subparsers, "plot", "render a surface file", 5)
    not_built(subparsers, "compare", "compare several surface files, with sharpness numbers", 5)
