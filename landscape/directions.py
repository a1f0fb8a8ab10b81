"""``landscape.directions``: directions, kept importable where DESIGN.md promises it.

The code lives in ``landscape.surface.directions``; this module re-exports its public names, and
``make`` (``landscape.direction_kinds``): a direction file of any kind in one call.
"""

from .direction_kinds import KINDS, make  # noqa: F401
from .surface.directions import *  # noqa: F401,F403
from .surface.directions import __all__ as _names

__all__ = [*_names, "KINDS", "make"]
