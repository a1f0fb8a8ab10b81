"""Figures of surface files: interactive HTML (plotly) and static PNG/PDF (matplotlib).

``plot`` and ``compare`` (module ``figures``) are the stage's entry points; ``surfaces``,
``spectrum`` and ``trajectory`` draw.
"""

from .figures import HESSIAN_COLUMNS, compare, plot

__all__ = ["HESSIAN_COLUMNS", "compare", "plot"]
