"""Where the embedded defaults live.

* The embedded model ships inside the package (``landscape/data/model``), so a wheel works from
  any folder.
* The embedded corpus and sentiment set are third-party text, never shipped: they are extracted
  on first use into the *data home*, ``LANDSCAPE_DATA`` or ``~/.cache/landscape``
  (``data.embedded_text.embedded_text`` extracts them; this module only says where).
"""

import os
from pathlib import Path

from .errors import OutputUnwritable, UsageError
from .files import check_folder_path

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "data" / "model"


def data_home() -> Path:
    """The folder that holds extracted texts and built checkpoints (read at call time).

    Raises:
        UsageError: it is a file or lies inside one (``LANDSCAPE_DATA`` naming a file), refused
            here so that every use says so in one line, before any work.
    """
    home = Path(os.environ.get("LANDSCAPE_DATA") or Path.home() / ".cache" / "landscape").expanduser()
    try:
        return check_folder_path(home, "the data home")
    except OutputUnwritable as err:  # no command's flag: the message names the variable that moves it
        raise UsageError(f"{err.what} '{home}'{err.detail.split('; ')[0]}; set LANDSCAPE_DATA to a folder") from None


def checkpoints_dir() -> Path:
    """Where ``data/build_checkpoints.py`` builds real checkpoints by default: ``<data home>/checkpoints``."""
    return data_home() / "checkpoints"


def checkpoint_builder() -> "Path | None":
    """``data/build_checkpoints.py`` of the clone this package runs from; None where there is none (a wheel)."""
    script = Path(__file__).resolve().parent.parent / "data" / "build_checkpoints.py"
    return script if script.is_file() else None


def how_to_build_checkpoints() -> str:
    """How to build the real checkpoints from here: the script's command, or, without it, where to get it."""
    script = checkpoint_builder()
    if script is not None:
        return f"python {script}"
    return ("the script data/build_checkpoints.py, which an installed wheel does not carry: run it from a clone "
            "of the landscape repository (pip install -e '.[checkpoints]'), with the same LANDSCAPE_DATA; or "
            "give any Hugging Face model folder to --model")


def built_checkpoints() -> dict:
    """{name: folder} of the checkpoints built under ``checkpoints_dir()`` (folders with a config.json)."""
    folder = checkpoints_dir()
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.iterdir()) if (p / "config.json").is_file()}

