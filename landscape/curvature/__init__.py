"""Hessian curvature of the loss that surfaces report: top eigenpairs, trace and spectral density.

The loss is the one ``surface.evaluate`` reports at the origin: the token-weighted mean
cross-entropy over every target token of every batch,

    L(θ) = Σ_b loss_sum_b(θ) / Σ_b n_tokens_b          (nats per target token)

with the model in eval mode (no dropout).  Everything here is built on one exact
Hessian-vector product (``HessianOperator.matvec``), batched over the samples of each batch:

* ``top_eigenpairs``: thick-restart Lanczos with full reorthogonalization (the k largest,
  i.e. most positive, eigenvalues and their unit eigenvectors as direction dicts that
  ``directions.save_directions`` writes and ``surface`` reads);
* ``trace``: Hutchinson's estimator with Rademacher probes (mean and standard error);
* ``spectrum``: stochastic Lanczos quadrature (Ghorbani et al. 2019, as in PyHessian): Ritz
  values and weights of several Lanczos runs, Gaussian-broadened onto a histogram.

A mask ``{name: bool tensor}`` restricts the operator to P·H·P, P the projection onto the kept
elements: vectors live on the kept elements only, so ``dim`` is their count, the trace is
tr(P·H·P) and the spectrum is that of H restricted to the kept coordinates (without the
block of zeros the masked-out coordinates would add).

Long trace and spectrum runs take a ``checkpoint`` path: a JSON-lines journal of finished
probes/runs, appended and fsynced as each finishes, so a killed run resumes where it stopped.

The subpackage: ``operator`` (the product, the model state, the attention fallback), ``lanczos``
(top eigenpairs and SLQ runs), ``estimators`` (trace, spectrum), ``checkpoint`` (the journal),
``report`` (one run as files: a subset's mask, the JSON report, the eigenvectors as a direction file),
``stage`` (the stage as one call: ``run_hessian`` writes a report, ``eigen_directions`` a direction file).
"""

from .checkpoint import JOURNAL_FORMAT
from .estimators import Spectrum, spectrum, trace
from .lanczos import LanczosInfo, top_eigenpairs
from .operator import DEFAULT_CACHE_BYTES, HessianOperator
from .report import hessian_report, load_report, save_eigenvectors, save_report, subset_mask
from .stage import HessianResult, eigen_directions, run_hessian

__all__ = ["DEFAULT_CACHE_BYTES", "JOURNAL_FORMAT", "HessianOperator", "HessianResult", "LanczosInfo",
           "Spectrum", "eigen_directions", "hessian_report", "load_report", "run_hessian", "save_eigenvectors",
           "save_report", "spectrum", "subset_mask", "top_eigenpairs", "trace"]
