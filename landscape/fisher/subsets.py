"""Subsets of a model's parameters: the elements a direction moves and a Hessian acts on.

A subset spec is 'all', 'top:K', 'bottom:K' or 'random:K' (K percent of the perturbable elements
by Fisher score, ``masks.fisher_mask``; random: a seeded draw of the same count), or 'adapter'
(the parameters of a PEFT adapter model's adapter, by name, ``adapters.adapter_mask``).  The
perturbable elements are set by ``ignore``: 'biasbn' keeps the tensors with more than one
dimension (no biases, no LayerNorm), 'none' every trainable element.

This module is the one place that turns a spec, optional Fisher scores and a model into a mask
(``subset_mask``) and the one place that refuses a spec the scores do not allow
(``check_subset``): random directions (``surface.directions``) and the Hessian's coordinates
(``curvature``) both take their subsets from here.
"""

from typing import Dict, List, Optional

import torch

from ..adapters import ADAPTER_SUBSET, adapter_mask, check_adapter_subset
from ..errors import MissingSetting, UsageError
from .file import check_fisher_matches
from .masks import ScoreSource, fisher_mask, parse_mask_spec

IGNORES = ("biasbn", "none")


def perturbable_names(model: torch.nn.Module, ignore: str = "biasbn") -> List[str]:
    """Names of the parameters a direction with this ``ignore`` setting can move."""
    return [name for name, p in model.named_parameters() if ignore == "none" or p.dim() > 1]


def check_subset(subset: str, fisher=None, ignore: str = "biasbn") -> None:
    """Refuse a subset that cannot be made from what is given, before anything is loaded.

    Args:
        subset: 'top:K' | 'bottom:K' | 'random:K' | 'all' | 'adapter'.
        fisher: the Fisher scores (a dict or a file's path) given with it, or None.
        ignore: 'biasbn' | 'none'.

    Raises:
        UsageError: an unknown ``ignore``, a malformed spec, Fisher scores with the adapter subset
            (it selects by name), or a Fisher subset without Fisher scores.
    """
    if ignore not in IGNORES:
        raise UsageError(f"unknown ignore '{ignore}'; use one of {', '.join(IGNORES)}")
    if subset == ADAPTER_SUBSET:
        check_adapter_subset(fisher)
        return
    parse_mask_spec(subset)
    if fisher is None and subset != "all":
        raise MissingSetting(f"subset '{subset}' needs Fisher scores (a Fisher file)", "fisher")


def subset_mask(model: torch.nn.Module, fisher=None, subset: str = "all", *, seed: int = 0,
                ignore: str = "biasbn", granularity: str = "global",
                progress: bool = False) -> Optional[Dict[str, torch.Tensor]]:
    """The mask of a subset of ``model``'s perturbable elements.

    Args:
        model: the model.
        fisher: Fisher scores, {param name: tensor shaped like the param}, a Fisher file's path
            (read one tensor at a time) or a ``masks.ScoreSource``; None for 'all' and 'adapter'.
        subset: 'top:K' | 'bottom:K' | 'random:K' | 'all' | 'adapter' (see the module docstring).
        seed: seeds a random subset.
        ignore: 'biasbn' | 'none': which elements are perturbable.
        granularity: 'global' | 'tensor' (see ``masks.fisher_mask``).
        progress: a progress bar (stderr) over the scores read.

    Returns:
        {param name: bool CPU tensor shaped like the param} for every parameter of the scores (or
        of the model, for 'adapter'), or None for 'all' without Fisher scores: every perturbable
        element, for the caller to take as it does without a mask.

    Raises:
        UsageError: what ``check_subset`` refuses, Fisher scores of another model (names or
            shapes), or the adapter subset of a model without an adapter.
    """
    check_subset(subset, fisher, ignore)
    names = perturbable_names(model, ignore)
    if subset == ADAPTER_SUBSET:  # the low-rank subspace where fine-tuning moved: by name, no Fisher
        return adapter_mask(model, names)
    if fisher is None:
        return None
    scores = fisher if isinstance(fisher, ScoreSource) else ScoreSource(fisher)
    check_fisher_matches(scores.shaped(), model)
    return fisher_mask(scores, subset, seed=seed, granularity=granularity, names=names, progress=progress)
