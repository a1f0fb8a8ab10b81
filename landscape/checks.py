"""The domains of numeric settings, in one home.

Counts, fractions, probabilities, finite numbers, MIN:MAX:NUM ranges and comma-separated lists of
numbers.

The stages call these functions on the values a Python user passes (``positive_int(batch_size,
"batch_size")``), and the command line's parsers use the same domains as argparse types
(``cli/options.py``), so an option and the API argument behind it refuse the same values with the
same words.  Standard library only: the parsers need these, and ``landscape --help`` must not pay
for torch or numpy.
"""

import math
import operator
from typing import List, Optional, Sequence, Tuple

from .errors import UsageError

SEED_MAX = 2**32 - 1  # seeds are unsigned 32-bit integers, as numpy's generators take them
SEQ_LEN_MAX = 2**20  # tokens per sample; the model's own position table is checked when it is loaded
GRID_NUM_MAX = 100_000  # points along one axis of a surface grid (a 2D grid is also capped in total)
EIGENPAIRS_MAX = 1000  # top Hessian eigenpairs: Lanczos holds about 2k + 10 vectors of the model's size
LANCZOS_STEPS_MAX = 10_000  # steps of one Lanczos run, each a vector of the model's size
BINS_MAX = 1_000_000  # histogram bins of a spectral density (the report holds them all)
THREADS_MAX = 4096  # CPU threads for torch (a billion made libgomp run out of memory)
# |MIN| and |MAX| of a grid axis.  Coordinates multiply direction values, which filter
# normalization makes the size of the weights (< 1e3 in the models seen): 1e6 keeps every product
# far inside float32 (and bfloat16's) range, where 1e39 overflowed even the Python float -> float32
# conversion; a wider view of a loss than a million times the weights' own scale shows nothing.
# ``surface.evaluate`` also checks the products with the actual direction values (float16 models).
COORD_MAX = 1e6
# Counts whose every unit costs at least one pass over the model, so a huge value never ends:
TRACE_PROBES_MAX = 100_000  # Hutchinson probes: the standard error falls as 1/sqrt(N); one product each
SPECTRUM_RUNS_MAX = 1000  # SLQ runs: each up to LANCZOS_STEPS_MAX products; the report keeps their nodes
HVP_BUDGET_MAX = 1_000_000  # Hessian-vector products of the top eigenpairs' Lanczos (max_iter)
RESTARTS_MAX = 1000  # fine-tuning runs per regularizer and fraction (one seed each)
EPOCHS_MAX = 10_000  # fine-tuning epochs
# Memory sizes in MB (a chunk of the Fisher's sums, the Hessian's cache): 1 TiB is beyond any one
# tensor or machine; 1e308 MB overflowed to inf bytes and crashed the conversion to an integer.
MEGABYTES_MAX = 2**20
LORA_RANK_MAX = 65_536  # a LoRA rank: wider than any layer of today's models, where more adapts nothing
# Contour levels of a figure: drawing time grows linearly, about 0.02 s a level on a 51 x 51 grid
# (500 levels: 12 s on a busy 2-core machine), so 50 million never finish; colours that close cannot be told apart.
CONTOUR_LEVELS_MAX = 500


class Domain:
    """A set of allowed values: integers or finite floats between optional bounds.

    Args:
        kind: "int" or "float"; a float is always finite (NaN and ±inf are never in a domain).
        low, high: bounds, None for none.
        low_open, high_open: whether the bound itself is excluded.
    """

    def __init__(self, kind: str, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False):
        self.kind, self.low, self.high = kind, low, high
        self.low_open, self.high_open = low_open, high_open

    def __repr__(self):
        return f"Domain({self.describe()})"

    def describe(self) -> str:
        """In words, for messages: 'an integer >= 1', 'a finite number in (0, 1]'."""
        low, high = _show(self.low), _show(self.high)
        if self.low is not None and self.high is not None:  # bounds on both sides: finite goes without saying
            what = "an integer" if self.kind == "int" else "a number"
            return f"{what} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        what = "an integer" if self.kind == "int" else "a finite number"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '<='} {high}"
        return what

    def convert(self, value):
        """``value`` (a number or its text) as an int or float, or None when it is not one."""
        if isinstance(value, bool):
            return None
        try:
            if self.kind == "int":
                return int(value.strip(), 10) if isinstance(value, str) else operator.index(value)
            return float(value)
        except (TypeError, ValueError, OverflowError):
            return None

    def __contains__(self, value) -> bool:
        number = self.convert(value)
        if number is None or (self.kind == "float" and not math.isfinite(number)):
            return False
        if self.low is not None and (number <= self.low if self.low_open else number < self.low):
            return False
        return self.high is None or (number < self.high if self.high_open else number <= self.high)

    def problem(self, value) -> Optional[str]:
        """Why ``value`` is not in the domain ('must be ..., got ...'), or None when it is."""
        if value in self:
            return None
        return f"must be {self.describe()}, got {_quote(value)}"

    def check(self, value, name: str):
        """``value`` converted to the domain's kind.

        Raises:
            UsageError: naming ``name`` when the value is outside the domain.
        """
        problem = self.problem(value)
        if problem:
            raise UsageError(f"{name} {problem}")
        return self.convert(value)


def _show(bound) -> str:
    return "" if bound is None else f"{bound:g}" if isinstance(bound, float) else str(bound)


def _quote(value) -> str:
    return f"'{value}'" if isinstance(value, str) else repr(value)


POSITIVE_INT = Domain("int", 1)
NON_NEGATIVE_INT = Domain("int", 0)
SEED = Domain("int", 0, SEED_MAX)
SEQ_LEN = Domain("int", 8, SEQ_LEN_MAX)
CONTOUR_LEVELS = Domain("int", 2, CONTOUR_LEVELS_MAX)
FRACTION = Domain("float", 0.0, 1.0, low_open=True)
PROBABILITY = Domain("float", 0.0, 1.0)
BELOW_ONE = Domain("float", 0.0, 1.0, high_open=True)
OPEN_UNIT = Domain("float", 0.0, 1.0, low_open=True, high_open=True)
PERCENT = Domain("float", 0.0, 100.0, low_open=True)
FINITE = Domain("float")
POSITIVE = Domain("float", 0.0, low_open=True)
NON_NEGATIVE = Domain("float", 0.0)
TRACE_PROBES = Domain("int", 0, TRACE_PROBES_MAX)
SPECTRUM_RUNS = Domain("int", 0, SPECTRUM_RUNS_MAX)
HVP_BUDGET = Domain("int", 1, HVP_BUDGET_MAX)
RESTARTS = Domain("int", 1, RESTARTS_MAX)
EPOCHS = Domain("int", 1, EPOCHS_MAX)
CHUNK_MB = Domain("float", 0.0, MEGABYTES_MAX, low_open=True)
CACHE_MB = Domain("float", 0.0, MEGABYTES_MAX)
LORA_RANK = Domain("int", 1, LORA_RANK_MAX)


def int_in(low: int, high: Optional[int] = None) -> Domain:
    """Integers in [low, high] (no upper bound when high is None)."""
    return Domain("int", low, high)


def positive_int(value, name: str) -> int:
    """``value`` as an int >= 1; UsageError naming ``name`` otherwise."""
    return POSITIVE_INT.check(value, name)


def non_negative_int(value, name: str) -> int:
    """``value`` as an int >= 0; UsageError naming ``name`` otherwise."""
    return NON_NEGATIVE_INT.check(value, name)


def seed(value, name: str = "seed") -> int:
    """``value`` as a seed, an int in [0, 2**32 - 1]; UsageError naming ``name`` otherwise."""
    return SEED.check(value, name)


def fraction(value, name: str) -> float:
    """``value`` as a float in (0, 1]; UsageError naming ``name`` otherwise (NaN included)."""
    return FRACTION.check(value, name)


def probability(value, name: str) -> float:
    """``value`` as a float in [0, 1]; UsageError naming ``name`` otherwise."""
    return PROBABILITY.check(value, name)


def finite_float(value, name: str) -> float:
    """``value`` as a finite float; UsageError naming ``name`` for NaN, ±inf or a non-number."""
    return FINITE.check(value, name)


def positive_float(value, name: str) -> float:
    """``value`` as a finite float > 0; UsageError naming ``name`` otherwise."""
    return POSITIVE.check(value, name)


def non_negative_float(value, name: str) -> float:
    """``value`` as a finite float >= 0; UsageError naming ``name`` otherwise."""
    return NON_NEGATIVE.check(value, name)


def optional(check, value, name: str):
    """None stays None (the setting left out); anything else goes through ``check(value, name)``."""
    return None if value is None else check(value, name)


def dropout_bounds(p_upper, p_lower) -> Tuple[float, float]:
    """(p_upper, p_lower) of a dropout schedule: each in [0, 1), and ``p_lower`` not above ``p_upper``.

    The one check of a schedule's bounds: ``settings.ScheduleSettings`` and every function that makes
    a schedule's probabilities (``guided.schedule.linear_probabilities``...) go through it, so
    reversed bounds never give the most informative sites the most dropout.

    Raises:
        UsageError: naming the bound out of its domain, or both when they are reversed.
    """
    upper, lower = BELOW_ONE.check(p_upper, "p_upper"), BELOW_ONE.check(p_lower, "p_lower")
    if lower > upper:
        raise UsageError(f"p_lower ({lower:g}) must not exceed p_upper ({upper:g})")
    return upper, lower


# ----------------------------------------------------------------------------- composite values
def range_problem(text, num_max: int = GRID_NUM_MAX) -> Tuple[Optional[Tuple[float, float, int]], Optional[str]]:
    """((MIN, MAX, NUM), None) for a valid 'MIN:MAX:NUM', or (None, why not)."""
    parts = str(text).split(":")
    if len(parts) != 3:
        return None, f"must be MIN:MAX:NUM (e.g. -1:1:21), got '{text}'"
    low, high, num = FINITE.convert(parts[0]), FINITE.convert(parts[1]), Domain("int").convert(parts[2])
    if low is None or high is None or num is None:
        return None, f"must be MIN:MAX:NUM with numbers (e.g. -1:1:21), got '{text}'"
    if not (math.isfinite(low) and math.isfinite(high) and math.isfinite(high - low)):
        return None, f"must have finite MIN and MAX and a finite MAX - MIN, got '{text}'"
    if max(abs(low), abs(high)) > COORD_MAX:
        return None, f"must have MIN and MAX in [-{COORD_MAX:g}, {COORD_MAX:g}], got '{text}'"
    if low >= high:
        return None, f"must have MIN smaller than MAX, got '{text}'"
    if not 2 <= num <= num_max:
        return None, f"must have NUM in [2, {num_max}], got '{text}'"
    return (low, high, num), None


def grid_range(text, name: str, num_max: int = GRID_NUM_MAX) -> Tuple[float, float, int]:
    """'MIN:MAX:NUM' -> (MIN, MAX, NUM): bounds in [-COORD_MAX, COORD_MAX], MIN < MAX, 2 <= NUM <= num_max.

    Raises:
        UsageError: naming ``name`` otherwise.
    """
    parsed, problem = range_problem(text, num_max)
    if problem:
        raise UsageError(f"{name} {problem}")
    return parsed


def coordinates(values, name: str) -> List[float]:
    """Grid coordinates given as numbers: each finite and in [-COORD_MAX, COORD_MAX].

    Raises:
        UsageError: naming ``name`` and the first value outside.
    """
    values = [float(v) for v in values]
    bad = next((v for v in values if not (math.isfinite(v) and abs(v) <= COORD_MAX)), None)
    if bad is not None:
        raise UsageError(f"{name} must hold finite coordinates in [-{COORD_MAX:g}, {COORD_MAX:g}], got {bad!r}")
    return values


def list_problem(text, domain: Domain) -> Tuple[Optional[List], Optional[str]]:
    """(numbers, None) for 'a,b,c' with every item in ``domain`` and at least one, or (None, why not)."""
    items = [item.strip() for item in str(text).split(",") if item.strip()]  # '0.5,' is one item
    if not items:
        return None, f"must be comma-separated numbers, each {domain.describe()}, got '{text}'"
    for item in items:
        if item not in domain:
            return None, f"must be comma-separated numbers, each {domain.describe()}, got '{item}' in '{text}'"
    numbers = [domain.convert(item) for item in items]
    repeat = first_repeat(numbers)
    if repeat is not None:  # '1,1.0' would run or count the same value twice: twin runs, doubled pairs
        return None, f"must not repeat a value, got {_show(repeat)} twice in '{text}'"
    return numbers, None


def first_repeat(values: Sequence) -> Optional[object]:
    """The first value of ``values`` that an earlier one equals, or None when they are distinct.

    List settings whose items name runs, rows or series (fractions, percentages, regularizers,
    labels) refuse a repeat: it would train or count the same thing twice under one name.
    """
    seen = []
    for value in values:
        if value in seen:
            return value
        seen.append(value)
    return None


def number_list(text, name: str, domain: Domain) -> List:
    """'a,b,c' -> [a, b, c], each in ``domain``, at least one.

    Raises:
        UsageError: naming ``name`` and the first bad item otherwise.
    """
    numbers, problem = list_problem(text, domain)
    if problem:
        raise UsageError(f"{name} {problem}")
    return numbers


class ListDomain:
    """Comma-separated numbers (or a sequence of numbers), each in ``item``, at least one.

    ``check`` gives them as a tuple, so a settings object holding them stays hashable and frozen.
    """

    form = "list"

    def __init__(self, item: Domain):
        self.item = item

    def describe(self) -> str:
        """In words, for messages."""
        return f"comma-separated numbers, each {self.item.describe()}"

    def check(self, value, name: str) -> tuple:
        """``value`` ('a,b,c' or a sequence) as a tuple of numbers; UsageError naming ``name`` otherwise."""
        if isinstance(value, str):
            return tuple(number_list(value, name, self.item))
        try:
            items = list(value)
        except TypeError:
            raise UsageError(f"{name} must be {self.describe()}, got {_quote(value)}") from None
        if not items:
            raise UsageError(f"{name} must be {self.describe()}, got none")
        numbers = tuple(self.item.check(item, name) for item in items)
        repeat = first_repeat(numbers)
        if repeat is not None:  # as for a list given as text (``list_problem``)
            raise UsageError(f"{name} must not repeat a value, got {_show(repeat)} twice")
        return numbers


class WordList:
    """Comma-separated names (or a sequence of them), each one of ``choices``, at least one, none twice.

    ``check`` gives them as a tuple.  Refusals name the item (``what``), as a list of runs is read:
    "unknown regularizer 'x'; use any of ...", "regularizer 'x' is listed twice".
    """

    form = "words"

    def __init__(self, what: str, choices: Sequence[str]):
        self.what, self.choices = what, tuple(choices)

    def describe(self) -> str:
        """In words, for messages."""
        return f"comma-separated names, each one of {', '.join(self.choices)}"

    def check(self, value, name: str) -> tuple:
        """``value`` ('a,b' or a sequence of names) as a tuple of names; UsageError otherwise."""
        if isinstance(value, str):
            items = [item.strip() for item in value.split(",") if item.strip()]
        elif isinstance(value, (list, tuple)):
            items = [str(item).strip() for item in value]
        else:
            raise UsageError(f"{name} must be {self.describe()}, got {_quote(value)}")
        unknown = [item for item in items if item not in self.choices]
        if unknown or not items:
            raise UsageError(f"unknown {self.what} '{(unknown or [''])[0]}'; use any of {', '.join(self.choices)}")
        repeat = first_repeat(items)
        if repeat is not None:  # its runs would be trained twice and counted twice
            raise UsageError(f"{self.what} '{repeat}' is listed twice; list each {self.what} once")
        return tuple(items)


class AxisDomain:
    """The coefficients along one axis of a grid: 'MIN:MAX:NUM', or the coefficients themselves.

    ``check`` keeps a range's text (the stage expands it, and files record it as given) and turns
    a sequence into a tuple of finite floats.
    """

    form = "range"

    def __init__(self, num_max: int = GRID_NUM_MAX):
        self.num_max = num_max

    def describe(self) -> str:
        """In words, for messages."""
        return "MIN:MAX:NUM, or a sequence of finite coefficients"

    def check(self, value, name: str):
        """``value`` checked: a valid range's text, or a tuple of at least 2 finite floats."""
        if isinstance(value, str):
            grid_range(value, name, self.num_max)
            return value
        try:
            items = coordinates(value, name)
        except (TypeError, ValueError):
            raise UsageError(f"{name} must be {self.describe()}, got {_quote(value)}") from None
        if not 2 <= len(items) <= self.num_max:
            raise UsageError(f"{name} must hold between 2 and {self.num_max} coefficients, got {len(items)}")
        return tuple(items)


AXIS = AxisDomain()
