"""Where the embedded default model and corpus live.

They sit in the repository's ``data/`` folder (the package is installed in editable mode);
``LANDSCAPE_DATA`` points elsewhere, for example at a copy next to a wheel install.
"""

import os
from pathlib import Path

DATA_DIR = Path(os.environ.get("LANDSCAPE_DATA", Path(__file__).resolve().parent.parent / "data"))
DEFAULT_MODEL_DIR = DATA_DIR / "model"
DEFAULT_CORPUS = DATA_DIR / "corpus" / "train.jsonl"
HELDOUT_CORPUS = DATA_DIR / "corpus" / "heldout.jsonl"
SENTIMENT_DATASET = DATA_DIR / "sentiment" / "movie_snippets.tsv"
