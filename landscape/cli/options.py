"""argparse types over the shared domains of ``landscape.checks``.

A value outside its option's domain is refused while the command line is parsed, before anything
is loaded, as argparse's one line ``landscape CMD: error: argument --lr: must be a finite number
> 0, got 'nan'`` and exit code 2.  Each type carries its domain (``.domain``) and its form
(``.form``: number, list or range), so tests can read from the parsers which values every numeric
option must refuse.  Standard library only, like the parsers.
"""

import argparse

from .. import checks, settings
from ..checks import Domain
from ..errors import UsageError


class Number:
    """argparse ``type=``: the text as a number of ``domain`` (an int or a float)."""

    form = "number"

    def __init__(self, domain: Domain):
        self.domain = domain
        self.__name__ = domain.describe()  # argparse names a type by it in some messages

    def __call__(self, text):
        problem = self.domain.problem(text)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return self.domain.convert(text)

    def __repr__(self):
        return f"Number({self.domain.describe()})"


class NumberList:
    """argparse ``type=``: comma-separated numbers, each in ``domain``; the value stays the text (the
    stage parses it with ``checks.number_list``)."""

    form = "list"

    def __init__(self, domain: Domain):
        self.domain = domain
        self.__name__ = f"list of {domain.describe()}"

    def __call__(self, text):
        _, problem = checks.list_problem(text, self.domain)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return text


class Range:
    """argparse ``type=``: 'MIN:MAX:NUM' with finite bounds, MIN < MAX and NUM in [2, num_max]; the
    value stays the text (the stage parses it with ``checks.grid_range``)."""

    form = "range"

    def __init__(self, num_max: int = checks.GRID_NUM_MAX):
        self.num_max = num_max
        self.domain = Domain("int", 2, num_max)  # of NUM
        self.__name__ = "MIN:MAX:NUM"

    def __call__(self, text):
        _, problem = checks.range_problem(text, self.num_max)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return text


POSITIVE_INT = Number(checks.POSITIVE_INT)
NON_NEGATIVE_INT = Number(checks.NON_NEGATIVE_INT)
SEED = Number(checks.SEED)
SEQ_LEN = Number(checks.SEQ_LEN)
FRACTION = Number(checks.FRACTION)
SHARE = Number(checks.PROBABILITY)  # a share of something, 0 and 1 included
BELOW_ONE = Number(checks.BELOW_ONE)  # a probability that must leave something: [0, 1)
OPEN_UNIT = Number(checks.OPEN_UNIT)
FINITE = Number(checks.FINITE)
POSITIVE = Number(checks.POSITIVE)
NON_NEGATIVE = Number(checks.NON_NEGATIVE)
RANGE = Range()
FRACTIONS = NumberList(checks.FRACTION)
PERCENTS = NumberList(checks.PERCENT)
CONTOUR_LEVELS = Number(checks.CONTOUR_LEVELS)
EIGENPAIRS = Number(checks.int_in(0, checks.EIGENPAIRS_MAX))
LANCZOS_STEPS = Number(checks.int_in(1, checks.LANCZOS_STEPS_MAX))
BINS = Number(checks.int_in(1, checks.BINS_MAX))


class Threads:
    """argparse ``type=`` of ``--threads``: 'auto' or a count (``settings.THREADS``, the stages' own check)."""

    # Read by the option tests like a number's: every value outside is refused (besides 'auto').
    form, domain, __name__ = "number", checks.int_in(0, checks.THREADS_MAX), "threads"

    def __call__(self, text):
        try:
            return settings.THREADS.check(text, "threads")
        except UsageError as err:
            raise argparse.ArgumentTypeError(str(err)[len("threads "):]) from None


THREADS = Threads()

TRACE_PROBES = Number(checks.TRACE_PROBES)
SPECTRUM_RUNS = Number(checks.SPECTRUM_RUNS)
HVP_BUDGET = Number(checks.HVP_BUDGET)
RESTARTS = Number(checks.RESTARTS)
EPOCHS = Number(checks.EPOCHS)
CHUNK_MB = Number(checks.CHUNK_MB)
CACHE_MB = Number(checks.CACHE_MB)
