"""Words on figures: user text drawn as written, and titles that say what a surface shows."""

from pathlib import Path

from ..datahome import EMBEDDED_MODEL_DIR


def literal(text):
    r"""``text`` as matplotlib must be given it to draw it verbatim, never as mathtext.

    Matplotlib parses a string with an even number of unescaped ``$`` as mathtext, so a title, a
    label or a file name such as ``$\\x$`` fails to draw (ValueError) or draws as something else.
    Every ``$`` becomes ``\\$``, which matplotlib draws as ``$`` (a ``\\`` before it stays a ``\\``).

    Args:
        text: any text from the user or from file names; None stays None.

    Returns:
        The escaped string (or None).
    """
    return None if text is None else str(text).replace("$", r"\$")


def model_name(source):
    """How a model is named in titles: 'embedded model', a folder's name, or the hub id."""
    source = str(source or "")
    if not source:
        return ""
    path = Path(source)
    if path.is_absolute():
        try:
            if path.resolve() == EMBEDDED_MODEL_DIR:
                return "embedded model"
        except OSError:
            pass
        return path.name
    return source


def surface_title(surface):
    """A title saying what one surface shows: its field, model, direction file and parameter subset.

    Args:
        surface: a ``landscape.surface.file.Surface``; its ``settings`` are the file's attributes.

    Returns:
        e.g. 'train loss · embedded model · directions all_2d.h5 (subset all, norm filter)'; a file
        without settings (one written by other code) is named by its file name.
    """
    settings = surface.settings or {}
    field = surface.field.replace("_", " ")
    model = model_name(settings.get("model"))
    dir_file = Path(str(settings.get("dir_file") or "")).name
    details = [f"{label} {settings[key]}" for key, label in (("dir_subset", "subset"), ("dir_norm", "norm"))
               if settings.get(key) not in (None, "")]
    if not model and not dir_file:
        return f"{field} · {surface.path.name}"
    directions = f"directions {dir_file}" + (f" ({', '.join(details)})" if details else "") if dir_file else ""
    return " · ".join(part for part in (field, model, directions) if part)


def common_model(surfaces):
    """The model name all ``surfaces`` share, or '' when they differ or do not say."""
    names = {model_name((s.settings or {}).get("model")) for s in surfaces}
    return names.pop() if len(names) == 1 else ""
