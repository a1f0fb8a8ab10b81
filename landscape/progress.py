"""Progress on stderr, one policy for every stage (docs/outputs.md, "Progress").

On a terminal (or in a notebook) a stage shows tqdm's bar.  Anywhere else, stderr is a log file
or a pipe, where a bar's carriage-return updates pile up into hundreds of overwritten lines: there
a bar is a plain line at most every ``LOG_INTERVAL`` seconds, and one when it ends.  A bar that
ends sooner than that writes nothing there unless it is kept (``leave``), as it clears itself on a
terminal; one that an error ends writes no last line.  So a quick command's log holds what it
wrote, and a refusal stays one line.  ``quiet()``
(the commands' ``--quiet``) turns every bar off for the process, the model-load bar included.
"""

import sys
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional

# A log line per bar at most this often: a long Fisher or surface run leaves a handful of lines an
# hour, enough to see it is alive and how far it got.
LOG_INTERVAL = 30.0

_quiet = False


@contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Within the block, no progress of any stage is shown (``enabled=False``: no change)."""
    global _quiet
    before, _quiet = _quiet, _quiet or enabled
    try:
        yield
    finally:
        _quiet = before


def is_quiet() -> bool:
    """Whether ``quiet()`` is in force."""
    return _quiet


def on_terminal() -> bool:
    """Whether stderr is a terminal (or a notebook, where tqdm draws a widget, not characters)."""
    if "ipykernel" in sys.modules:
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def bar(iterable: Optional[Iterable] = None, *, total: Optional[float] = None, desc: str = "",
        unit: str = "it", enabled: bool = True, initial: float = 0, unit_scale: bool = False,
        leave: bool = False) -> Any:
    """A progress bar under the policy above: tqdm on a terminal, log lines elsewhere, nothing when quiet.

    Args:
        iterable: what to iterate over while counting, or None to count by ``update``.
        total: the count at the end (None: unknown).
        desc: the bar's label (the stage).
        unit: what is counted (samples, points, ...).
        unit_scale: show large counts with SI prefixes (k, M).
        enabled: False shows nothing (a stage's ``progress=False``).
        initial: the count already done (a resumed stage).
        leave: keep the bar when it ends: tqdm's on a terminal; in a log, its last line even when
            it ended within the first interval.

    Returns:
        an object with tqdm's ``update``, ``set_postfix_str``, ``close`` and iteration, usable as a context.
    """
    from tqdm.auto import tqdm

    if not enabled or _quiet:
        return tqdm(iterable, total=total, disable=True)
    if on_terminal():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale,
                    leave=leave, dynamic_ncols=True)
    return LogLines(iterable, total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale,
                    leave=leave)


class LogLines:
    """Progress as whole lines on stderr: at most one per ``interval`` seconds, and one at the end."""

    def __init__(self, iterable: Optional[Iterable] = None, *, total: Optional[float] = None, desc: str = "",
                 unit: str = "it", initial: float = 0, unit_scale: bool = False,
                 leave: bool = True, interval: float = LOG_INTERVAL, file: Any = None) -> None:
        self.iterable, self.total, self.desc, self.unit, self.unit_scale = iterable, total, desc, unit, unit_scale
        self.n, self.initial, self.interval, self.postfix = initial, initial, interval, ""
        self.file, self.leave, self.lines = file, leave, 0
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self) -> "LogLines":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._end(failed=exc_type is not None)

    def update(self, n: float = 1) -> None:
        """Count ``n`` more; write a line when ``interval`` seconds passed since the last one."""
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            self._line()

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        """Text after the count on the next line (what tqdm shows after its bar)."""
        self.postfix = text

    def refresh(self) -> None:
        """Nothing: a line comes only on the interval, so that a log stays short."""

    def close(self) -> None:
        """Write the last line, once, where it belongs (the conditions below).

        Only if anything was counted, no error is on its way out, and the bar is kept (``leave``)
        or already wrote a line.

        A refusal (or Ctrl-C) says in its own one line why the work stopped: a progress line before
        it would make a refusal two lines in a log.
        """
        self._end(failed=sys.exc_info()[0] is not None)  # called from a `finally` while an error propagates

    def _end(self, failed: bool) -> None:
        if not self.closed and not failed and self.n > self.initial and (self.leave or self.lines):
            self._line()
        self.closed = True

    def _line(self) -> None:
        from tqdm import tqdm

        now = time.monotonic()
        self.last, self.lines = now, self.lines + 1
        meter = tqdm.format_meter(self.n, self.total, now - self.start, prefix=self.desc, unit=self.unit,
                                  unit_scale=self.unit_scale, postfix=self.postfix or None, initial=self.initial,
                                  ncols=0)
        stream = self.file if self.file is not None else sys.stderr
        stream.write(meter.replace("\r", "") + "\n")
        stream.flush()
