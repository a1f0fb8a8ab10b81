"""Hessian curvature of the loss that surfaces report: top eigenpairs, trace and spectral density.

The loss is the one ``surface.evaluate`` reports at the origin: the token-weighted mean
cross-entropy over every target token of every batch,

    L(θ) = Σ_b loss_sum_b(θ) / Σ_b n_tokens_b          (nats per target token)

with the model in eval mode (no dropout).  Its Hessian is a linear operator,
``HessianOperator(model, batches, mask, kind)``: ``H @ v`` is one exact Hessian-vector product, batched
over the samples of each batch, on flat vectors (``linear`` has the convention).  The estimators
take any such operator (the Hessian, the diagonal Fisher of ``fisher_operator``, a
``SubmatrixOperator`` of either, a plain symmetric tensor):

* ``top_eigenpairs``: thick-restart Lanczos with full reorthogonalization (the k largest,
  i.e. most positive, eigenvalues and their unit eigenvectors; ``H.to_dict(v)`` makes an
  eigenvector a direction dict that ``directions.save_directions`` writes and ``surface`` reads);
* ``trace``: Hutchinson's estimator with Rademacher probes (mean and standard error);
* ``spectrum``: stochastic Lanczos quadrature (Ghorbani et al. 2019, as in PyHessian): Ritz
  values and weights of several Lanczos runs, Gaussian-broadened onto a histogram.

A mask ``{name: bool tensor}`` restricts the Hessian to P·H·P, P the projection onto the kept
elements: vectors live on the kept elements only, so ``dim`` is their count, the trace is
tr(P·H·P) and the spectrum is that of H restricted to the kept coordinates (without the
block of zeros the masked-out coordinates would add).  ``subset_mask`` makes the mask of a
parameter subset (``fisher.subsets``).  One operator keeps its cached first-order graphs between
products, so running every estimator on the same ``H`` builds them once.

Long trace and spectrum runs take a ``checkpoint`` path: a JSON-lines journal of finished
probes/runs, appended and fsynced as each finishes, so a killed run resumes where it stopped.

The subpackage: ``linear`` (the operator convention, matrix, diagonal and submatrix operators),
``operator`` (the Hessian's product, the model state, the attention fallback), ``lanczos``
(top eigenpairs and SLQ runs), ``estimators`` (trace, spectrum), ``checkpoint`` (the journal),
``report`` (one run as files: a subset's mask, the JSON report, the eigenvectors as a direction file),
``stage`` (the stage as one call: ``run_hessian`` writes a report, ``eigen_directions`` a direction file),
``critical`` (the line search of critical sharpness, on any loss along a line; ``landscape.critical``,
above this package and ``surface``, walks a model's loss with it).
"""

from .checkpoint import JOURNAL_FORMAT
from .critical import LineSearch, critical_step
from .estimators import Spectrum, spectrum, trace
from .lanczos import LanczosInfo, top_eigenpairs
from .linear import DiagonalOperator, LinearOperator, MatrixOperator, SubmatrixOperator, as_operator, fisher_operator
from .operator import DEFAULT_CACHE_BYTES, HessianOperator
from .report import hessian_report, load_report, save_eigenvectors, save_report, subset_mask
from .stage import HessianResult, eigen_directions, run_hessian

__all__ = ["DEFAULT_CACHE_BYTES", "JOURNAL_FORMAT", "DiagonalOperator", "HessianOperator", "HessianResult",
           "LanczosInfo", "LineSearch", "LinearOperator", "MatrixOperator", "Spectrum", "SubmatrixOperator",
           "as_operator", "critical_step", "eigen_directions", "fisher_operator", "hessian_report", "load_report",
           "run_hessian", "save_eigenvectors", "save_report", "spectrum", "subset_mask", "top_eigenpairs", "trace"]
