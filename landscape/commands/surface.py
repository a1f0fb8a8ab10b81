"""directions, surface."""

from .common import not_built


def register(subparsers):
    not_built(subparsers, "directions", "filter-normalized, Fisher-masked random directions", 4)
    not_built(subparsers, "surface", "loss grid along directions (resumable HDF5)", 4)
