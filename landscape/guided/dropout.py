"""Gaussian dropout (Wang & Manning 2013) as a module, below the regularizers that install it.

Multiplicative noise ``x * (1 + sigma * eps)``, ``eps ~ N(0, 1)``, ``sigma = sqrt(p / (1 - p))`` (a
standard deviation, not a variance), only in training mode.  ``guided.regularizers`` installs it
on a model's dropout sites; ``guided.lora_sites`` puts it in LoRA's ``lora_dropout`` slots.
"""

import math

import torch
from torch import nn

from ..errors import UsageError


def gaussian_sigma(p):
    """Standard deviation of Gaussian dropout's multiplicative noise for dropout probability p."""
    if not (0.0 <= p < 1.0):
        raise UsageError(f"Gaussian dropout probability must be in [0, 1), got {p}")
    return math.sqrt(p / (1.0 - p))


def gaussian_noise(x, p, training=True):
    """Gaussian dropout: ``x * (1 + sigma * N(0, 1))``, sigma = sqrt(p / (1 - p)), when training.

    Returns ``x`` itself otherwise; the result has x's shape.

    Same mean as x and the variance of Bernoulli dropout with rescaling (x^2 * p / (1 - p)).
    """
    if not training or p == 0.0:
        return x
    return x * (1.0 + gaussian_sigma(p) * torch.randn_like(x))


class GaussianDropout(nn.Module):
    """Drop-in replacement for ``nn.Dropout(p)`` with multiplicative Gaussian noise, off in eval.

    Keeps the attribute ``p`` so that attention code reading ``dropout.p`` still finds it.
    """

    def __init__(self, p=0.1):
        super().__init__()
        gaussian_sigma(p)  # validates p
        self.p = float(p)

    def forward(self, x):
        """``gaussian_noise`` of ``x`` (any shape) in training, ``x`` in eval mode."""
        return gaussian_noise(x, self.p, self.training)

    def extra_repr(self):
        """The probability in the module's printed form."""
        return f"p={self.p}"
