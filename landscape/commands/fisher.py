"""fisher, stability, profile."""

from .common import not_built


def register(subparsers):
    not_built(subparsers, "fisher", "diagonal empirical Fisher of a model on a corpus", 3)
    not_built(subparsers, "stability", "Fisher stability over nested corpus fractions", 3)
    not_built(subparsers, "profile", "parameter-wise and site-wise Fisher figures and CSV", 3)
