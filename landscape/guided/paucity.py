"""What a data-paucity sweep found: its summary per regularizer and fraction, figure and table.

``summarize_runs`` reports each regularizer's mean and inter-quartile range of the task metric
(the paper's Figure 4) and its paired difference against ``dropout`` over the same restarts
(``guided.stats``); ``plot_paucity`` draws it, ``format_summary`` prints it.  The runs come from
``guided.sweep.data_paucity``.
"""

import math
from pathlib import Path

import numpy as np

from ..files import atomic_output
from ..outputs import figure_metadata
from .stats import fewest_pairs, paired_comparison, smallest_p

BASELINE = "dropout"
ALPHA = 0.05  # a cell is significant when p < ALPHA and the bootstrap interval excludes 0


# ---------------------------------------------------------------------------- summary and statistics

def _empty_comparison():
    return {"diff_vs_dropout": None, "ci_low": None, "ci_high": None, "p_value": None, "pairs": None,
            "min_p": None, "significant": None}


def is_significant(diff_row) -> bool:
    """Whether a summary row's difference against dropout is significant.

    Args:
        diff_row: a row of ``summarize_runs``.

    Returns:
        True when p < 0.05 and the 95% bootstrap interval excludes 0; False for rows without a
        comparison.
    """
    p, low, high = diff_row.get("p_value"), diff_row.get("ci_low"), diff_row.get("ci_high")
    if p is None or low is None or high is None or not all(math.isfinite(float(v)) for v in (p, low, high)):
        return False
    return float(p) < ALPHA and (float(low) > 0 or float(high) < 0)


def summarize_runs(rows, metrics, baseline=BASELINE, bootstrap_seed=0):
    """Summarize a sweep's runs per (regularizer, fraction) and metric.

    Each summary row has runs, mean, quartiles, min, max, and the paired comparison with
    ``baseline`` (dropout) over the same restart seeds at that fraction.

    diff_vs_dropout: mean over seeds of (regularizer - dropout); ci_low / ci_high: its percentile
    bootstrap 95% interval (``bootstrap_seed``, 10000 resamples); p_value: two-sided Wilcoxon
    signed-rank; pairs: the seeds both have; min_p: the smallest p those pairs allow
    (``stats.smallest_p``: 2 / 2^pairs; a cell with min_p >= 0.05 could not have been significant
    whatever the runs gave); significant: ``is_significant``.  All empty (None) for the baseline
    itself and when the baseline has no run at that fraction.  With fewer than 2 pairs the interval,
    p-value and min_p are NaN.
    """
    out = []
    regs = list(dict.fromkeys(r["regularizer"] for r in rows))
    fractions = sorted({float(r["fraction"]) for r in rows}, reverse=True)
    for reg in regs:
        for fraction in fractions:
            group = [r for r in rows if r["regularizer"] == reg and float(r["fraction"]) == fraction]
            if not group:
                continue
            base = {int(r["seed"]): r for r in rows
                    if r["regularizer"] == baseline and float(r["fraction"]) == fraction}
            for metric in metrics:
                values = np.array([r[metric] for r in group], dtype=np.float64)
                row = {"regularizer": reg, "fraction": fraction, "n_train": group[0]["n_train"], "metric": metric,
                       "runs": len(values), "mean": float(values.mean()),
                       "q25": float(np.percentile(values, 25)), "q75": float(np.percentile(values, 75)),
                       "min": float(values.min()), "max": float(values.max()), **_empty_comparison()}
                if reg != baseline and base:
                    paired = sorted((int(r["seed"]), r[metric]) for r in group if int(r["seed"]) in base)
                    result = paired_comparison([v for _, v in paired], [base[s][metric] for s, _ in paired],
                                               seed=bootstrap_seed)
                    row.update(diff_vs_dropout=result.diff, ci_low=result.ci_low, ci_high=result.ci_high,
                               p_value=result.p_value, pairs=result.n, min_p=smallest_p(result.n))
                    row["significant"] = is_significant(row)
                out.append(row)
    return out


def plot_paucity(summary, metric, path, title="", claim=None):
    """Figure-4-style plot: metric mean vs training fraction per regularizer, IQR shaded.

    A cell that differs significantly from dropout (``is_significant``) gets a large star on its
    point.

    Args:
        summary: rows of ``summarize_runs``.
        metric: the metric to plot.
        path: the figure file to write (its suffix gives the format; png by default).
        title: the figure's title.
        claim: the figure's ``outputs.Claim``, whose stamp it carries (None: ``outputs.figure_metadata``'s).

    Returns:
        The path, as a ``Path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plots.text import literal

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    marked = False
    for reg in dict.fromkeys(r["regularizer"] for r in summary):
        rows = sorted((r for r in summary if r["regularizer"] == reg and r["metric"] == metric),
                      key=lambda r: r["fraction"])
        x = [100 * r["fraction"] for r in rows]
        (line,) = ax.plot(x, [r["mean"] for r in rows], marker="o", label=literal(reg))
        ax.fill_between(x, [r["q25"] for r in rows], [r["q75"] for r in rows], alpha=0.15, color=line.get_color())
        stars = [(100 * r["fraction"], r["mean"]) for r in rows if is_significant(r)]
        if stars:
            marked = True
            ax.plot(*zip(*stars), linestyle="none", marker="*", markersize=16, color=line.get_color(),
                    markeredgecolor="black", markeredgewidth=0.6, zorder=5)
    if marked:
        ax.plot([], [], linestyle="none", marker="*", markersize=12, color="grey", markeredgecolor="black",
                label=f"vs {BASELINE}: p<{ALPHA:g}, CI excl. 0")
    ax.set_xlabel("training data used (%)")
    ax.set_ylabel(f"test {metric} (mean, IQR shaded)")
    ax.set_title(literal(title))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fmt = Path(path).suffix.lstrip(".") or "png"
        fig.savefig(tmp, format=fmt, dpi=120, metadata=figure_metadata(path, fmt, claim))
    plt.close(fig)
    return Path(path)


def _fmt(value, spec):
    return "nan" if value is None or not math.isfinite(float(value)) else format(float(value), spec)


def format_summary(summary, metric):
    """Text tables of one metric.

    Regularizer x fraction, 'mean [q25, q75]' (with '*' where the difference from dropout is
    significant), then the paired differences from dropout.

    Args:
        summary: rows of ``summarize_runs``.
        metric: the metric to tabulate.

    Returns:
        The tables as one string.
    """
    rows = [r for r in summary if r["metric"] == metric]
    fractions = sorted({r["fraction"] for r in rows}, reverse=True)
    regs = list(dict.fromkeys(r["regularizer"] for r in rows))
    width = max([len(r) for r in regs] + [len(metric), 10]) + 1
    cell = {(r["regularizer"], r["fraction"]): r for r in rows}
    lines = [f"{metric:<{width}}" + "".join(f"{f'{100 * f:g}%':>26}" for f in fractions)]
    for reg in regs:
        cells = []
        for f in fractions:
            r = cell.get((reg, f))
            text = "-" if r is None else (f"{r['mean']:.4f} [{r['q25']:.3f}, {r['q75']:.3f}]"
                                          + ("*" if is_significant(r) else " "))
            cells.append(text)
        lines.append(f"{reg:<{width}}" + "".join(f"{c:>26}" for c in cells))
    compared = [reg for reg in regs if any(cell.get((reg, f), {}).get("diff_vs_dropout") is not None
                                           for f in fractions)]
    if compared:
        lines.append(f"\n{metric} minus {BASELINE}, paired over restart seeds: mean [bootstrap 95% CI] "
                     f"Wilcoxon p (* = p < {ALPHA:g} and CI excludes 0)")
        lines.append(f"{'':<{width}}" + "".join(f"{f'{100 * f:g}%':>36}" for f in fractions))
        for reg in compared:
            cells = []
            for f in fractions:
                r = cell.get((reg, f))
                if r is None or r["diff_vs_dropout"] is None:
                    cells.append("-")
                    continue
                cells.append(f"{_fmt(r['diff_vs_dropout'], '+.4f')} [{_fmt(r['ci_low'], '+.3f')}, "
                             f"{_fmt(r['ci_high'], '+.3f')}] p={_fmt(r['p_value'], '.3f')}"
                             + ("*" if is_significant(r) else " "))
            lines.append(f"{reg:<{width}}" + "".join(f"{c:>36}" for c in cells))
        lines.extend(_reach_note([r["pairs"] for r in rows if r.get("pairs") is not None]))
    return "\n".join(lines)


def reach_words(pairs) -> str:
    """What ``pairs`` paired restarts allow: e.g. '6 pairs: smallest p 0.0312, can reach p < 0.05'."""
    if pairs < 2:
        return f"{pairs} pair: no paired test"
    floor = smallest_p(pairs)
    verdict = "can reach" if floor < ALPHA else "cannot reach"
    return f"{pairs} pairs: smallest p {floor:.3g}, {verdict} p < {ALPHA:g}"


def _reach_note(pairs):
    """The summary's line on the smallest p the restarts allow, and whether it can reach ALPHA."""
    counts = sorted(set(pairs), reverse=True)
    if not counts:
        return []
    line = "smallest possible Wilcoxon p (exact, 2/2^n) with " + "; ".join(reach_words(n) for n in counts)
    if min(counts) < fewest_pairs(ALPHA):
        line += f" (use at least {fewest_pairs(ALPHA)} restarts for p < {ALPHA:g} to be possible)"
    return [line]
