"""Writing plotly figures as HTML pages: offline, titled by what they show, filling the window."""

import html
import re

from ..files import atomic_output
from ..outputs import stamp_html

# The figure's div takes the whole window (plotly's default_height="100vh"); the page must then
# have no margin and no scroll bar, or the plot is cut at the bottom or leaves a white band.
_PAGE_STYLE = "<style>html, body { height: 100%; margin: 0; overflow: hidden; }</style>"


def write_html(fig, out, title=None, claim=None):
    """Write ``fig`` to ``out`` as a self-contained page that fills the browser window.

    plotly.js is embedded (works offline, no CDN), MathJax is not loaded (user text is shown as
    written).  The layout's fixed width and height are dropped for autosize and plotly's
    responsive mode, so the figure follows the window; the page's ``<title>`` (the browser tab) is
    ``title``, by default the figure's own title with its subtitle in parentheses.

    Args:
        fig: a ``plotly.graph_objects.Figure``.
        out: path of the .html file, written atomically.
        title: the page title; None: the figure's title text.
        claim: the page's ``outputs.Claim``, whose stamp it carries (None: ``outputs.stamp_html``'s).
    """
    fig.update_layout(autosize=True, width=None, height=None)
    page_title = title if title is not None else re.sub(r"<br><sub>(.*?)</sub>", r" (\1)", fig.layout.title.text or "")
    text = fig.to_html(include_plotlyjs=True, full_html=True, include_mathjax=False,
                       config={"responsive": True, "displaylogo": False},
                       default_width="100%", default_height="100vh")
    head = f"<head><title>{html.escape(page_title.replace('<br>', ' '))}</title>{_PAGE_STYLE}"
    text = text.replace("<head>", head, 1)
    with atomic_output(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
        stamp_html(tmp, out, claim)  # whose output it is: a later run replaces only its own file
