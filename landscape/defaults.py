"""Defaults that the library and the command line's ``--help`` share.

Standard library only: the parsers read these to show defaults, and ``landscape --help`` must not
pay for torch, transformers or h5py.  The stages import them from here, so each has one home.
"""

from dataclasses import dataclass

# Fisher stability (paper Table 1): nested fractions of the reference sample, and the top-k% sets compared.
STABILITY_FRACTIONS = (0.33, 0.1, 0.05, 0.01, 0.001)
STABILITY_TOP = (5.0, 1.0, 0.5, 0.25)

# Fine-tuning settings that depend on the model when not given: the embedded model's own, or the paper's.
# The embedded model is a 4-layer, hidden-128 BERT trained from scratch on a small corpus: at the
# paper's lr 2e-5 its randomly initialised head barely moves in a few hundred steps, so it gets a
# from-scratch-sized learning rate, larger batches, short sequences (movie snippets average ~19 words)
# and a capped training set so a full data-paucity sweep fits in minutes on two CPU cores.
FINETUNE_EMBEDDED = {"lr": 5e-4, "batch_size": 32, "seq_len": 64, "max_train": 1000, "max_test": 1000}
FINETUNE_PAPER = {"lr": 2e-5, "batch_size": 8, "seq_len": 128, "max_train": None, "max_test": None}
# With --lora: LoRA's usual range is 1e-4 to 1e-3 (its B matrices start at zero; few weights train).
FINETUNE_LORA_LR = 5e-4


@dataclass
class DemoSettings:
    """Sizes of the demo's samples and grids, chosen to finish in minutes on 2 CPU cores."""

    fisher_samples: int = 2048  # packed sequences for the Fisher and the stability reference
    stability_fractions: tuple = STABILITY_FRACTIONS
    eval_samples: int = 32  # fixed evaluation sample of every surface
    grid_2d: str = "-1:1:21"
    grid_1d: str = "-1:1:41"
    seq_len: int = 128
    batch_size: int = 16
    seed: int = 0
    points_per_pass: int = 1
