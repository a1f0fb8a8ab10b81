"""``landscape.schedule``: guided dropout schedules, kept importable where DESIGN.md promises it.

The code lives in ``landscape.guided.schedule``; this module re-exports its public names,
``callback`` (``landscape.guided.callback``) and ``run_schedule`` (the stage,
``landscape.guided.schedule_stage``).
"""

from .guided.callback import callback  # noqa: F401
from .guided.schedule import *  # noqa: F401,F403
from .guided.schedule import __all__  # noqa: F401
from .guided.schedule_stage import run_schedule  # noqa: F401
