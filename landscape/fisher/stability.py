"""How stable is the Fisher estimate under sub-sampling (paper Table 1)?

The Fisher is estimated from nested sub-samples of one reference sample, in one pass over the
reference (``fisher.nested_fisher``): the sub-sample of fraction f is the first max(1, round(f·N))
of the N reference samples.  Samples come in a seeded document order (``corpus.subsample_documents``),
so a prefix is a seeded random document-level sub-sample, and smaller ones are nested in larger ones.

Each estimate is compared with the reference (all N samples) on every parameter element:
- ``top{k}_overlap``: share of the reference's top-k% elements that are also in the estimate's top-k%;
- ``top{k}_jaccard``: |A ∩ B| / |A ∪ B| of the two top-k% sets;
- ``spearman``: Spearman rank correlation (average ranks for ties) over all elements (a seeded
  uniform subset of ``SPEARMAN_MAX_ELEMENTS`` elements on larger models);
- ``rel_l1``: Σ|F/ΣF − F_ref/ΣF_ref|, the L1 distance of the normalized Fishers (0 = same, 2 = disjoint).
"""

import math

import numpy as np
import torch

from .. import checks
from ..defaults import STABILITY_FRACTIONS as DEFAULT_FRACTIONS
from ..defaults import STABILITY_TOP as DEFAULT_TOP
from ..errors import UsageError
from ..files import write_csv as write_rows
from .run import nested_fisher

SPEARMAN_MAX_ELEMENTS = 10_000_000


def parse_numbers(text, what, low, high):
    """'0.33,0.1' -> [0.33, 0.1], each in (low, high]; UsageError otherwise."""
    return checks.number_list(text, what, checks.Domain("float", low, high, low_open=True))


def flatten(fisher, names=None):
    """All elements of a Fisher dict as one float64 vector, in ``names`` order (default: sorted)."""
    names = names if names is not None else sorted(fisher)
    return torch.cat([fisher[n].detach().reshape(-1).to("cpu", torch.float64) for n in names])


def _top_mask(vector, percent):
    count = max(1, math.ceil(percent / 100.0 * vector.numel()))
    mask = torch.zeros(vector.numel(), dtype=torch.bool)
    mask[torch.topk(vector, count, sorted=False).indices] = True
    return mask, count


def spearman(a, b, max_elements=SPEARMAN_MAX_ELEMENTS, seed=0):
    """Spearman rank correlation of two equal-length vectors (average ranks for ties).

    Args:
        a: the first vector, any 1-D array-like.
        b: the second, of the same length.
        max_elements: longer vectors are compared on this many seeded random positions.
        seed: seeds those positions.

    Returns:
        The correlation in [-1, 1], a float; NaN when either vector is constant.
    """
    from scipy.stats import rankdata

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size > max_elements:
        keep = np.random.default_rng(seed).choice(a.size, max_elements, replace=False)
        a, b = a[keep], b[keep]
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def compare(fisher, reference, top=DEFAULT_TOP):
    """Agreement of one Fisher estimate with the reference (metrics: see the module docstring).

    Args:
        fisher: {param name: tensor}, the estimate.
        reference: {param name: tensor}, the reference, over the same parameters.
        top: percentages of the top-Fisher overlap and Jaccard metrics.

    Returns:
        {metric: value}: topK_overlap, topK_jaccard per K, spearman, rel_l1.

    Raises:
        UsageError: the two are over different parameters.
    """
    names = sorted(reference)
    if set(fisher) != set(reference):
        raise UsageError("the two Fisher estimates are over different parameters")
    est, ref = flatten(fisher, names), flatten(reference, names)
    row = {}
    for percent in top:
        mask_est, count = _top_mask(est, percent)
        mask_ref, _ = _top_mask(ref, percent)
        both = int((mask_est & mask_ref).sum())
        row[f"top{percent:g}_overlap"] = both / count
        row[f"top{percent:g}_jaccard"] = both / (2 * count - both)
    row["spearman"] = spearman(est.numpy(), ref.numpy())
    total_est, total_ref = est.sum(), ref.sum()
    row["rel_l1"] = float((est / total_est - ref / total_ref).abs().sum()) if total_est > 0 and total_ref > 0 \
        else float("nan")
    return row


def stability(model, batches, fractions=DEFAULT_FRACTIONS, top=DEFAULT_TOP, kind=None, progress=False,
              max_chunk_mb=None):
    """Table-1 rows: the reference (all samples of ``batches``) and one row per fraction.

    Each row: fraction, samples, then the metrics of ``compare``.  One pass over the data.

    Args:
        model: the model (a transformers LM or classifier).
        batches: list of batch dicts of (B, T) tensors with ``labels``; each row is a sample.
        fractions: sub-sample fractions in (0, 1]; fraction f uses the first max(1, round(f·N))
            of the N samples.
        top: percentages of the top-Fisher overlap metrics.
        kind: the objective (``models.LoadedModel.kind``); required.
        progress: a tqdm bar over batches.
        max_chunk_mb: memory for per-sample gradients at a time, in MB (``fisher.nested_fisher``).

    Returns:
        A list of dicts, the reference (fraction 1.0) first.
    """
    return stability_and_reference(model, batches, fractions, top, kind, progress, max_chunk_mb)[0]


def stability_and_reference(model, batches, fractions=DEFAULT_FRACTIONS, top=DEFAULT_TOP, kind=None,
                            progress=False, max_chunk_mb=None, **checkpointing):
    """``stability`` rows and the reference Fisher they compare with, from the same single pass.

    So a caller that also needs the Fisher does not compute it twice.  Arguments as for
    ``stability``; ``checkpointing``: ``checkpoint``, ``checkpoint_every``, ``fingerprint`` and
    ``model_fingerprint`` of ``fisher.nested_fisher`` (an interrupted pass resumes).

    Returns:
        (rows, reference Fisher {param name: tensor shaped like the param}).
    """
    total = sum(int(b["labels"].shape[0]) for b in batches)
    sizes = [total] + [max(1, round(f * total)) for f in fractions]
    estimates = nested_fisher(model, batches, sizes, kind=kind, progress=progress, max_chunk_mb=max_chunk_mb,
                              **checkpointing)
    reference = estimates[0]
    rows = []
    for fraction, size, estimate in zip([1.0] + list(fractions), sizes, estimates):
        rows.append({"fraction": fraction, "samples": size, **compare(estimate, reference, top)})
    return rows, reference


def write_csv(rows, path):
    """Write stability rows as CSV (atomically)."""
    return write_rows([{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows],
                      path)


def format_table(rows):
    """The rows as an aligned text table (what ``landscape stability`` prints)."""
    keys = list(rows[0])
    cells = [[k.replace("_", " ") for k in keys]]
    for row in rows:
        cells.append([f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in keys])
    widths = [max(len(r[i]) for r in cells) for i in range(len(keys))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)
