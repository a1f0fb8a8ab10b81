"""Sharpness of a loss surface around the origin (the unperturbed model), as numbers.

Definitions (docs/figures.md has the full text):

- ``loss_origin``: L(0), by linear (1D) or bilinear (2D) interpolation of the grid.
- ``rise``: mean of L over the points at distance ``radius`` from the origin, minus L(0).
  1D: the two points ±r; 2D: 360 equally spaced points on the circle of radius r.  Values are
  interpolated from the grid; a point whose interpolation touches a NaN (not computed) cell is
  skipped, and the rise is NaN when fewer than half of the circle's points remain (1D needs both).
- ``curvature``: the mean second directional derivative at the origin, from a least-squares
  quadratic fit to the computed grid points within ``fit_radius`` of the origin.  1D: L''(0);
  2D: (∂²L/∂x² + ∂²L/∂y²) / 2 = Laplacian / 2, the average of d²L/ds² over all directions.
  2D also gives the Hessian's eigenvalues ``hess_min`` and ``hess_max``.
- Defaults: ``radius`` = half of the largest symmetric half-width around 0 that the grid covers
  (0.5 on [-1, 1]); ``fit_radius`` = two grid steps (the largest step of x and y).

Quantities are in the surface's units (nats for cross-entropy) and in the direction's step units.
"""

import math

import numpy as np

from .. import checks
from ..files import write_csv as write_rows
from .file import Surface, read_surface

CIRCLE_POINTS = 360
MIN_CIRCLE_COVERAGE = 0.5
COLUMNS = ("label", "file", "dims", "field", "radius", "fit_radius", "loss_origin", "rise", "curvature",
           "hess_min", "hess_max", "circle_coverage", "computed_fraction", "min_value")


def default_radius(surface):
    """Half of the largest symmetric half-width around the origin that the grid covers (0 if none)."""
    half_widths = [min(-surface.x[0], surface.x[-1])]
    if surface.y is not None:
        half_widths.append(min(-surface.y[0], surface.y[-1]))
    return max(0.0, min(half_widths) / 2.0)


def default_fit_radius(surface):
    """Two grid steps (the largest median step over the axes): 5 points in 1D, 13 in a square 2D grid."""
    steps = [np.median(np.diff(surface.x))]
    if surface.y is not None:
        steps.append(np.median(np.diff(surface.y)))
    return 2.0 * float(max(steps)) * (1 + 1e-9)


def summarize(surface, radius=None, fit_radius=None, label=None, field="train_loss"):
    """Sharpness numbers of one surface (a path or a ``Surface``) as a dict with keys ``COLUMNS``.

    Numbers that cannot be computed (origin outside the grid, too many NaN points) are NaN, never
    an error.

    Args:
        surface: a surface file path or a ``Surface``.
        radius: the radius of the rise, in the direction's coefficient units (None: ``default_radius``).
        fit_radius: the radius of the curvature fit, same units (None: ``default_fit_radius``).
        label: the row's label (None: the file name without its suffix).
        field: the surface field to read when ``surface`` is a path.

    Returns:
        {column: value} with keys ``COLUMNS``.
    """
    if not isinstance(surface, Surface):
        surface = read_surface(surface, field)
    radius = default_radius(surface) if radius is None else float(radius)
    fit_radius = default_fit_radius(surface) if fit_radius is None else float(fit_radius)
    radius = checks.non_negative_float(radius, "radius")  # NaN too: it would compare as no point at all
    fit_radius = checks.positive_float(fit_radius, "fit radius")
    finite = surface.z[np.isfinite(surface.z)]
    row = dict(label=label if label is not None else surface.path.stem, file=str(surface.path),
               dims=surface.dims, field=surface.field, radius=radius, fit_radius=fit_radius,
               computed_fraction=surface.computed_fraction,
               min_value=float(finite.min()) if finite.size else math.nan)
    if surface.dims == 1:
        row.update(_summary_1d(surface, radius, fit_radius))
    else:
        row.update(_summary_2d(surface, radius, fit_radius))
    return row


def summarize_all(surfaces, labels, radius=None, fit_radius=None):
    """Summaries of several surfaces at a common radius and fit radius so that they compare.

    The defaults are the smallest default radius and the largest default fit radius of the set.

    Args:
        surfaces: surface file paths or ``Surface`` objects.
        labels: one label per surface.
        radius: a common radius (None: the default above).
        fit_radius: a common fit radius (None: the default above).

    Returns:
        A list of ``summarize`` rows, one per surface.
    """
    if radius is None:
        radius = min(default_radius(s) for s in surfaces)
    if fit_radius is None:
        fit_radius = max(default_fit_radius(s) for s in surfaces)
    return [summarize(s, radius, fit_radius, label) for s, label in zip(surfaces, labels)]


# --------------------------------------------------------------------------------------------
# 1D
# --------------------------------------------------------------------------------------------

def _interp_1d(x, z, points):
    """Linear interpolation of z(x) at ``points``; NaN outside the grid or next to a NaN value."""
    points = np.atleast_1d(np.asarray(points, dtype=np.float64))
    out = np.full(points.shape, np.nan)
    inside = (points >= x[0]) & (points <= x[-1])
    right = np.clip(np.searchsorted(x, points, side="right"), 1, len(x) - 1)
    left = right - 1
    t = (points - x[left]) / (x[right] - x[left])
    values = (1 - t) * z[left] + t * z[right]
    # An exact hit on a grid point must not depend on a NaN neighbour.
    values = np.where(t == 0, z[left], np.where(t == 1, z[right], values))
    out[inside] = values[inside]
    return out


def _summary_1d(surface, radius, fit_radius):
    x, z = surface.x, surface.z
    origin = float(_interp_1d(x, z, 0.0)[0])
    ends = _interp_1d(x, z, [-radius, radius])
    rise = float(ends.mean() - origin) if np.all(np.isfinite(ends)) else math.nan
    coverage = float(np.isfinite(ends).mean())
    near = (np.abs(x) <= fit_radius) & np.isfinite(z)
    curvature = math.nan
    if near.sum() >= 3:
        # L ≈ a + b x + c x²  →  L''(0) = 2c
        design = np.stack([np.ones(near.sum()), x[near], x[near] ** 2], axis=1)
        coef = np.linalg.lstsq(design, z[near], rcond=None)[0]
        curvature = float(2 * coef[2])
    return dict(loss_origin=origin, rise=rise, curvature=curvature, hess_min=math.nan, hess_max=math.nan,
                circle_coverage=coverage)


# --------------------------------------------------------------------------------------------
# 2D
# --------------------------------------------------------------------------------------------

def bilinear(surface, px, py):
    """Bilinear interpolation of a 2D surface at points (px, py).

    Args:
        surface: a 2D ``Surface``.
        px: x coordinates, an array of any shape.
        py: y coordinates, an array of the same shape.

    Returns:
        A float64 array of that shape: NaN outside the grid or where one of the cell corners with a
        non-zero weight is NaN.
    """
    x, y, z = surface.x, surface.y, surface.z
    px, py = np.broadcast_arrays(np.asarray(px, dtype=np.float64), np.asarray(py, dtype=np.float64))
    inside = (px >= x[0]) & (px <= x[-1]) & (py >= y[0]) & (py <= y[-1])
    ix = np.clip(np.searchsorted(x, px, side="right") - 1, 0, len(x) - 2)
    iy = np.clip(np.searchsorted(y, py, side="right") - 1, 0, len(y) - 2)
    # Points far outside the grid (a radius of 1e308) overflow here; they become NaN below anyway.
    with np.errstate(over="ignore", invalid="ignore"):
        tx = (px - x[ix]) / (x[ix + 1] - x[ix])
        ty = (py - y[iy]) / (y[iy + 1] - y[iy])
        total = np.zeros(px.shape)
        for dy, wy in ((0, 1 - ty), (1, ty)):
            for dx, wx in ((0, 1 - tx), (1, tx)):
                weight = wx * wy
                corner = z[iy + dy, ix + dx]
                # A zero-weight NaN corner must not spoil the value (0 * NaN = NaN).
                total = total + np.where(weight == 0, 0.0, weight * corner)
    return np.where(inside, total, np.nan)


def _summary_2d(surface, radius, fit_radius):
    origin = float(bilinear(surface, 0.0, 0.0))
    angles = np.linspace(0.0, 2 * np.pi, CIRCLE_POINTS, endpoint=False)
    ring = bilinear(surface, radius * np.cos(angles), radius * np.sin(angles))
    valid = np.isfinite(ring)
    coverage = float(valid.mean())
    rise = float(ring[valid].mean() - origin) if coverage >= MIN_CIRCLE_COVERAGE else math.nan
    curvature, hess_min, hess_max = _quadratic_fit_2d(surface, fit_radius)
    return dict(loss_origin=origin, rise=rise, curvature=curvature, hess_min=hess_min, hess_max=hess_max,
                circle_coverage=coverage)


def _quadratic_fit_2d(surface, fit_radius):
    """(mean curvature, Hessian min eigenvalue, max eigenvalue) of a quadratic fit near the origin."""
    X, Y = np.meshgrid(surface.x, surface.y)
    near = (np.hypot(X, Y) <= fit_radius) & np.isfinite(surface.z)
    if near.sum() < 6:
        return math.nan, math.nan, math.nan
    xs, ys = X[near], Y[near]
    # L ≈ a + b x + c y + d x² + e xy + f y²  →  Hessian [[2d, e], [e, 2f]]
    design = np.stack([np.ones_like(xs), xs, ys, xs ** 2, xs * ys, ys ** 2], axis=1)
    coef, _, rank, _ = np.linalg.lstsq(design, surface.z[near], rcond=None)
    if rank < 6:  # e.g. all points on one line: the quadratic is not determined
        return math.nan, math.nan, math.nan
    hessian = np.array([[2 * coef[3], coef[4]], [coef[4], 2 * coef[5]]])
    eigenvalues = np.linalg.eigvalsh(hessian)
    return float(np.trace(hessian) / 2), float(eigenvalues[0]), float(eigenvalues[1])


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def format_table(rows):
    """A fixed-width text table of the main numbers, one line per surface."""
    header = f"{'label':<24} {'dims':>4} {'radius':>8} {'L(0)':>10} {'rise':>10} {'curvature':>10} " \
             f"{'hess_min':>10} {'hess_max':>10} {'computed':>9}"
    lines = [header]
    for row in rows:
        lines.append(f"{str(row['label'])[:24]:<24} {row['dims']:>4} {row['radius']:>8.4g} "
                     f"{row['loss_origin']:>10.4g} {row['rise']:>10.4g} {row['curvature']:>10.4g} "
                     f"{row['hess_min']:>10.4g} {row['hess_max']:>10.4g} {row['computed_fraction']:>9.0%}")
    return "\n".join(lines)


def short_note(row):
    """A few words for a legend or a panel title: rise at r and curvature."""
    return f"rise@{row['radius']:.2g}={row['rise']:.3g}, curv={row['curvature']:.3g}"


def write_csv(rows, path, columns=COLUMNS):
    """Write summaries as CSV; NaN is written as an empty cell.

    Args:
        rows: dicts with (at least) the keys ``columns``.
        path: the CSV file.
        columns: the columns, in order (default ``COLUMNS``).

    Returns:
        The path, as a ``Path``.
    """
    return write_rows([{k: _cell(row[k]) for k in columns} for row in rows], path, columns)


def _cell(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value
