"""schedule."""

from .common import not_built


def register(subparsers):
    not_built(subparsers, "schedule", "guided dropout schedule from a Fisher file", 6)
