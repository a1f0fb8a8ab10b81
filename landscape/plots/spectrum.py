"""The Hessian's spectral density from a ``landscape hessian`` report: PNG/PDF (matplotlib) or HTML (plotly).

The density is the report's stochastic-Lanczos-quadrature histogram (probability per unit
eigenvalue, integrating to 1), drawn as a step curve over the bin edges; the top eigenvalues, when
the report has them, are dashed vertical lines.  ``log`` draws the density on a log axis (empty
bins are left out), which shows the few large outliers next to the bulk near zero.
"""

from pathlib import Path

import numpy as np

from ..errors import UsageError
from .surfaces import output_format
from .text import literal


def read_spectrum(path):
    """(edges, density, eigenvalues, report) of a Hessian report; UsageError if it has no spectrum."""
    from ..curvature.report import load_report

    report = load_report(path)
    spectrum = report.get("spectrum")
    if not spectrum:
        raise UsageError(f"'{path}' has no spectral density; compute one with `landscape hessian --spectrum RUNS`")
    edges = np.asarray(spectrum["edges"], dtype=float)
    density = np.asarray(spectrum["density"], dtype=float)
    if edges.ndim != 1 or density.shape != (len(edges) - 1,):
        raise UsageError(f"'{path}' has a damaged spectrum ({len(edges)} edges, {density.size} bins)")
    return edges, density, list(report.get("eigenvalues") or []), report


def _subtitle(report):
    settings, prov = report.get("settings", {}), report.get("provenance", {})
    parts = [f"subset {settings.get('subset', 'all')}", f"{prov.get('n_coordinates', 0):,} coordinates"]
    spectrum = report["spectrum"]
    parts.append(f"{spectrum.get('runs')} runs x {spectrum.get('steps')} steps")
    if report.get("trace"):
        parts.append(f"trace {report['trace']['mean']:.4g} ± {report['trace']['stderr']:.2g}")
    return ", ".join(parts)


def plot_spectrum(path, out, log=False, title=None, claim=None):
    """Draw the spectral density of the Hessian report ``path`` to ``out``.

    Args:
        path: the Hessian report (.json) with a spectrum.
        out: the figure to write (.png, .pdf or .html).
        log: a log density axis (empty bins become gaps).
        title: the figure's title (None: one naming the report).
        claim: the figure's ``outputs.Claim``, whose stamp it carries (None: ``outputs.figure_metadata``'s).

    Returns:
        The output path, as a ``Path``.

    Raises:
        UsageError: an unknown output format, or a report without a spectrum.
    """
    from .draw import save

    fmt = output_format(out)
    fig = spectrum_figure(path, fmt == "html", log=log, title=title)
    save(fig, out, fmt, claim)
    return Path(out)


def spectrum_figure(path, interactive, log=False, title=None):
    """The figure ``plot_spectrum`` writes, not written: plotly's when ``interactive``, else matplotlib's.

    Raises:
        UsageError: a report without a spectrum.
    """
    edges, density, eigenvalues, report = read_spectrum(path)
    title = title or f"Hessian spectral density: {Path(path).name}"
    subtitle = _subtitle(report)
    ylabel = "density (per unit eigenvalue)"
    draw = _plotly if interactive else _matplotlib
    return draw(edges, density, eigenvalues, log, title, subtitle, ylabel)


def _step(edges, density, log):
    """x, y of a step curve over the bins; on a log axis empty bins become gaps (NaN)."""
    x = np.repeat(edges, 2)[1:-1]
    y = np.repeat(density, 2).astype(float)
    if log:
        y = np.where(y > 0, y, np.nan)
    return x, y


def _matplotlib(edges, density, eigenvalues, log, title, subtitle, ylabel):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.6))
    ax = fig.subplots()
    x, y = _step(edges, density, log)
    ax.plot(x, y, color="tab:blue", linewidth=1.2, label="spectral density (SLQ)")
    if not log:
        ax.fill_between(x, 0, y, color="tab:blue", alpha=0.25)
    for i, value in enumerate(eigenvalues):
        ax.axvline(value, color="tab:red", linestyle="--", linewidth=0.8, label="top eigenvalues" if i == 0 else None)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("eigenvalue (nats/token per unit²)")
    ax.set_ylabel(ylabel)
    ax.set_title(literal(f"{title}\n{subtitle}"), fontsize=10)
    if eigenvalues:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _plotly(edges, density, eigenvalues, log, title, subtitle, ylabel):
    import plotly.graph_objects as go

    x, y = _step(edges, density, log)
    fig = go.Figure(go.Scatter(x=x, y=y, mode="lines", name="density", fill=None if log else "tozeroy",
                               connectgaps=False))
    for value in eigenvalues:
        fig.add_vline(x=value, line_dash="dash", line_color="red")
    fig.update_layout(title=f"{title}<br><sub>{subtitle}</sub>", xaxis_title="eigenvalue (nats/token per unit²)",
                      yaxis_title=ylabel, yaxis_type="log" if log else "linear")
    return fig
