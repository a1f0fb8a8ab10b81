"""demo."""

from .common import not_built


def register(subparsers):
    not_built(subparsers, "demo", "the whole pipeline on the embedded model and corpus", 5)
