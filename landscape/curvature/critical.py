"""The line search of critical sharpness: the smallest step at which a loss rises back above its origin.

Critical sharpness (Kalra et al., arXiv 2601.16979) is λ_c = 2/η_c, where η_c is the smallest step
η > 0 along an update direction d at which L(θ + η·d) > L(θ).  For the quadratic model along
d = −g it is exactly gᵀHg/gᵀg: L(θ − ηg) = L − η·gᵀg + η²/2·gᵀHg is back at L at η = 2gᵀg/gᵀHg.

``critical_step`` finds η_c from values of the loss along the line only (one forward pass each),
given as a callable, so it serves any loss; ``landscape.critical`` walks the model's loss with the
surfaces' evaluator.  The search keeps a bracket: ``lower``, the largest step tried below
``upper`` where the loss is below the origin's, and ``upper``, the smallest step tried where it
is (a non-finite loss counts as above).  It moves out (or in) from ``start`` until the bracket
closes, guided by the quadratic through the origin that fits the steps it has (with the slope at
the origin when it is known), then narrows the bracket until upper/lower ≤ (1 + tol)/(1 − tol),
which puts η_c = (lower + upper)/2 within ``tol`` of both ends: the loss at η_c·(1 − tol) is not
above the origin's and the loss at η_c·(1 + tol) is.  Where the loss crosses the origin's level
more than once, the crossing found is the first among the steps tried, not necessarily the first
of the whole line.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from ..errors import UsageError

MAX_PASSES = 10  # loss evaluations of one search, the origin's included (the budget)
REACH = 64.0  # the most one step moves out (or in) before the bracket closes


@dataclass
class LineSearch:
    """What ``critical_step`` found.

    Attributes:
        critical_lr: η_c = (lower + upper)/2, in units of the direction as given.
        lower: the largest step tried below ``upper`` whose loss is below the origin's.
        upper: the smallest step tried whose loss is above the origin's (steps whose loss equals the
            origin's, usually below the weights' precision, bound neither side).
        loss_at_origin: L(θ).
        forward_passes: loss evaluations made (the origin's included when it was evaluated here).
        converged: upper/lower reached (1 + tol)/(1 − tol); when False the budget ran out first and
            ``reached`` says how close it came.
        reached: (upper − lower)/(upper + lower): the relative half-width of the bracket, which the
            tolerance bounds when ``converged``.
        steps: every (η, L(θ + η·d)) evaluated, in order.
    """

    critical_lr: float
    lower: float
    upper: float
    loss_at_origin: float
    forward_passes: int
    converged: bool
    reached: float
    steps: List[Tuple[float, float]] = field(default_factory=list)

    @property
    def critical_sharpness(self) -> float:
        """λ_c = 2/η_c."""
        return 2.0 / self.critical_lr


def critical_step(loss_at: Callable[[float], float], *, start: float, tolerance: float = 0.05,
                  loss_at_origin: Optional[float] = None, slope: Optional[float] = None,
                  max_passes: int = MAX_PASSES) -> LineSearch:
    """η_c, the smallest step along a line at which the loss rises above its value at the origin.

    Args:
        loss_at: η -> L(θ + η·d), one forward pass per call.
        start: the first step to try (> 0), e.g. a first-order guess.
        tolerance: the relative tolerance of η_c, in (0, 1).
        loss_at_origin: L(θ) when already known (then not evaluated, and not counted).
        slope: dL/dη at the origin when known (e.g. −gᵀg along −g): refused unless negative, and
            used to guide the first steps.
        max_passes: at most this many calls of ``loss_at``.

    Returns:
        A ``LineSearch``.

    Raises:
        UsageError: the direction is not a descent direction (a slope ≥ 0, or the loss above the
            origin's at every step tried, down to start/64^k), or the loss did not rise back at any
            step tried.
    """
    if not (start > 0 and math.isfinite(start)):
        raise UsageError(f"the first step must be a positive number, got {start!r}")
    if not 0 < tolerance < 1:
        raise UsageError(f"the tolerance must lie in (0, 1), got {tolerance!r}")
    if slope is not None and not slope < 0:
        raise UsageError(f"the loss does not fall along the direction (its slope at the origin is {slope:.6g}): "
                         "not a descent direction")
    passes = 0
    if loss_at_origin is None:
        loss_at_origin, passes = float(loss_at(0.0)), 1
    if not math.isfinite(loss_at_origin):
        raise UsageError(f"the loss at the origin is {loss_at_origin}: there is no level to rise back to")
    ratio = (1 + tolerance) / (1 - tolerance)
    steps: List[Tuple[float, float]] = []
    eta, widths = start, []
    while passes < max_passes:
        steps.append((eta, float(loss_at(eta))))
        passes += 1
        lower, upper = _bracket(steps, loss_at_origin)
        if lower is not None and upper is not None:
            if upper <= lower * ratio:
                break
            widths.append(upper - lower)
        eta = _next_step(steps, lower, upper, loss_at_origin, slope, tolerance, widths)
    lower, upper = _bracket(steps, loss_at_origin)
    if lower is None and upper is not None:
        smallest = min(steps)
        raise UsageError(f"the loss rises at once along the direction (at the smallest step tried, {smallest[0]:.4g}, "
                         f"it is {smallest[1]:.10g} against {loss_at_origin:.10g} at the origin): not a descent "
                         "direction of this loss")
    if lower is None:
        raise UsageError(f"the loss did not change at any step tried (from {min(steps)[0]:.4g} to {max(steps)[0]:.4g}):"
                         " the steps are below the weights' precision, or the direction is zero")
    if upper is None:
        raise UsageError(f"the loss did not rise back to its origin's level at any step tried (up to {lower:.4g} "
                         f"in {passes} forward passes): the critical sharpness is below {2 / lower:.4g}")
    return LineSearch(critical_lr=(lower + upper) / 2, lower=lower, upper=upper, loss_at_origin=loss_at_origin,
                      forward_passes=passes, converged=upper <= lower * ratio,
                      reached=(upper - lower) / (upper + lower), steps=steps)


def _rose(loss: float, origin: float) -> bool:
    return not math.isfinite(loss) or loss > origin  # a diverged loss (inf, NaN) has risen


def _bracket(steps, origin) -> Tuple[Optional[float], Optional[float]]:
    """(lower, upper): the smallest step that rose, and the largest below it where the loss fell (None: none).

    A step whose loss equals the origin's exactly bounds neither side: there the step is usually
    below the weights' precision (θ + η·d rounds back to θ), which says nothing about the line.
    """
    risen = [eta for eta, loss in steps if _rose(loss, origin)]
    upper = min(risen) if risen else None
    below = [eta for eta, loss in steps if loss < origin and (upper is None or eta < upper)]
    return (max(below) if below else None), upper


def _quadratic_root(steps, lower, upper, origin, slope) -> Optional[float]:
    """The positive root of f(η) = aη + bη² (f = L − L(θ)) fitted to the bracket, or None.

    Local beats global: through both ends of the bracket; with one side only, through its two
    steps nearest the other side; with one step, through it with a = slope when the slope is known.
    """
    values = dict(steps)
    known = [eta for eta in (lower, upper) if eta is not None and math.isfinite(values[eta])]
    if len(known) == 1:  # one side only: the two steps on it nearest the other, else that step and the slope
        side = sorted(eta for eta, loss in steps if math.isfinite(loss) and _rose(loss, origin) == (lower is None))
        known = (side[:2] if lower is None else side[-2:]) if len(side) > 1 else known
    if len(known) == 2:
        (x1, f1), (x2, f2) = ((x, values[x] - origin) for x in known)
        det = x1 * x2 * x2 - x2 * x1 * x1
        if det == 0:
            return None
        a = (f1 * x2 * x2 - f2 * x1 * x1) / det
        b = (x1 * f2 - x2 * f1) / det
    elif len(known) == 1 and slope is not None:
        x1 = known[0]
        a, b = slope, (values[x1] - origin - slope * x1) / (x1 * x1)
    else:
        return None
    if not (a < 0 < b):
        return None
    root = -a / b
    return root if math.isfinite(root) and root > 0 else None


def _next_step(steps, lower, upper, origin, slope, tolerance, widths) -> float:
    """The next step to try: out, in, or inside the bracket (two probes around the model's root)."""
    root = _quadratic_root(steps, lower, upper, origin, slope)
    if upper is None:  # no rise yet: out, beyond every step tried
        base = max(eta for eta, _ in steps)
        return min(max(root if root is not None else 8 * base, 2 * base), REACH * base)
    if lower is None:  # no fall yet: in, below every step tried
        base = min(eta for eta, _ in steps)
        return max(min(root if root is not None else base / 8, base / 2), base / REACH)
    # The middle of a wide bracket is its geometric one: the root's scale is what is unknown there.
    middle = (lower + upper) / 2 if upper < 4 * lower else math.sqrt(lower * upper)
    stalled = len(widths) >= 3 and widths[-1] > widths[-3] / 2  # the model's probes are not closing in
    if root is None or stalled:
        return middle
    # A side already within the tolerance of the root needs no probe: one on the other side closes the bracket.
    if lower >= root * (1 - tolerance):
        probe = max(root, lower) * (1 + tolerance / 2)
    elif upper <= root * (1 + tolerance):
        probe = min(root, upper) * (1 - tolerance / 2)
    else:
        probe = root * (1 - tolerance / 2)
    return probe if lower < probe < upper else middle
