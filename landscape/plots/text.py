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


def value_label(field, log=False):
    """The axis label of a surface field's values, with its unit: 'train loss (nats)', 'test acc (fraction)'.

    The loss is a mean cross-entropy (natural log), so its unit is the nat; an accuracy is a fraction
    of the scored tokens (or sequences).  ``log``: the values are shown as log10.
    """
    name = str(field).replace("_", " ")
    unit = "nats" if str(field).endswith("loss") else "fraction" if str(field).endswith("acc") else ""
    label = f"{name} ({unit})" if unit else name
    return f"log10 {label}" if log else label


def sample_note(settings, field="train_loss"):
    """What a surface was evaluated on, from its file's recorded attributes, or '' when it does not say.

    Args:
        settings: the surface file's attributes (``Surface.settings``).
        field: the field drawn; ``test_*`` fields were evaluated on the held-out sample (``eval_*``).

    Returns:
        e.g. '2,048 samples × 128 tokens, 151,204 scored, from embedded default'.
    """
    settings = settings or {}
    prefix = "eval_" if str(field).startswith("test") else ""
    samples = settings.get(f"{prefix}n_samples")
    if samples in (None, ""):
        return ""
    note = f"{int(samples):,} samples"
    if settings.get("seq_len") not in (None, ""):
        note += f" × {int(settings['seq_len']):,} tokens"
    if settings.get(f"{prefix}n_target_tokens") not in (None, ""):
        note += f", {int(settings[f'{prefix}n_target_tokens']):,} scored"
    corpus = settings.get("eval_corpus" if prefix else "corpus")
    return note + (f", from {corpus}" if corpus not in (None, "") else "")


def common_sample(surfaces):
    """The sample note all ``surfaces`` share, or their distinct notes joined by ' / ' ('' when none says)."""
    notes = []
    for surface in surfaces:
        note = sample_note(surface.settings, surface.field)
        if note and note not in notes:
            notes.append(note)
    return " / ".join(notes)


def minimum_note(x, y, value):
    """Where a surface's smallest value is, as drawn next to its marker: 'min 6.2846 at (0.25, -0.5)'."""
    where = f"{x:.3g}" if y is None else f"({x:.3g}, {y:.3g})"
    return f"min {value:.5g} at {where}"
