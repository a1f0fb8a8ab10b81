"""finetune."""

from .common import not_built


def register(subparsers):
    not_built(subparsers, "finetune", "fine-tune with guided dropout against baselines", 6)
