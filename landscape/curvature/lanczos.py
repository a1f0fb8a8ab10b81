"""Lanczos: top eigenpairs, stochastic Lanczos quadrature runs, and their seeded start vectors.

The top eigenpairs use thick restart and full reorthogonalization; the quadrature runs are plain.
Both run on any operator (``linear``: ``A @ v``, ``shape``, ``dtype``, ``device``), driven through
``linear._Products``; their Krylov bases are the one large allocation here: in memory while they
fit ``basis_bytes``, in a temporary file beyond it (``krylov``).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import UsageError
from .krylov import DEFAULT_BASIS_BYTES, FileVectors, _fix_sign, krylov_basis
from .linear import _Products, vector_norm


# ----------------------------------------------------------------------------- Lanczos
def _rademacher(dim: int, generator: torch.Generator, device, op: Optional[_Products] = None) -> torch.Tensor:
    """(dim,) float32 of independent ±1 (drawn on the CPU, so the same on every device).

    With ``op``, this rank's pieces of it (``_Products.local``): the whole vector is drawn, so a
    sharded group's probes are the single process's.
    """
    signs = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int8)
    return (signs if op is None else op.local(signs)).float().mul_(2).sub_(1).to(device)


def _random_unit(dim: int, generator: torch.Generator, device, rademacher: bool = False,
                 dtype: torch.dtype = torch.float32, op: Optional[_Products] = None) -> torch.Tensor:
    """A unit vector: normalized Rademacher or Gaussian, drawn in float32 (the same draws for every dtype).

    With ``op``, this rank's pieces of it, normalized over the whole vector.
    """
    if rademacher:
        v = _rademacher(dim, generator, device, op)
    else:
        v = torch.randn(dim, generator=generator, dtype=torch.float32)
        v = (v if op is None else op.local(v)).to(device)
    norm = vector_norm if op is None else op.norm
    v = v.div_(norm(v))  # in place: a second vector here was the spectrum's peak (v is this function's own)
    # Normalized again in a wider dtype: float32's unit norm is 1 only to ~1e-7 there.
    return v if dtype == torch.float32 else (lambda w: w / norm(w))(v.to(dtype))


# A symmetric operator's Krylov coefficients are symmetric: v_iᵀ·A·v_j = v_jᵀ·A·v_i.  Beyond this
# share of the coefficients' size the products are not a symmetric matrix's, and a tridiagonal
# built from them has eigenvalues of no matrix at all.  Measured on the tiny GPT-2, Llama and BERT
# (8 products): exact float32 products 1e-7; the gradient-only product 2e-5 at its default step,
# 8e-4-3.6e-3 at 5 times it (products about 3e-2 off), 0.03-0.05 at 15 times (0.5 off).
ASYMMETRY_LIMIT = 1e-3


def _check_symmetric(found: np.ndarray, implied: np.ndarray, scale: float, step: int) -> None:
    """Refuse products whose coefficients ``found`` (v_iᵀ·A·v_j, i < j) are not the ``implied`` ones.

    ``implied``: what the earlier steps' products say of the same numbers (v_jᵀ·A·v_i): β_{j−1}
    for i = j − 1, 0 below.  ``scale``: the largest coefficient so far (about ‖A‖).

    Raises:
        UsageError: the largest difference exceeds ``ASYMMETRY_LIMIT``·scale.
    """
    if found.size == 0 or scale <= 0:
        return
    defect = float(np.abs(found - implied).max()) / scale
    if defect > ASYMMETRY_LIMIT:
        raise UsageError(f"the operator's products are not symmetric along the Lanczos vectors (step {step}: "
                         f"{defect:.2g} of the largest coefficient, more than {ASYMMETRY_LIMIT:g}), so its eigenvalues "
                         "would be wrong; the gradient-only Hessian product (hvp 'difference') takes too large a "
                         "step for vectors on few coordinates: use the exact product (docs/curvature.md, "
                         "'Concentrated vectors')")


def _check_finite(coefficients) -> None:
    """Refuse a non-finite product here: else eigh fails later with a LinAlgError, far from the cause."""
    if not np.isfinite(coefficients).all():
        raise UsageError("a Hessian-vector product is not finite: the loss or its gradient overflows at "
                         "these weights (try float32, or check the model and the sample)")


def _implied(j: int, beta: float) -> np.ndarray:
    """(j,) the coefficients v_iᵀ·A·v_j, i < j, that step j − 1 implies: β_{j−1} at i = j − 1, 0 below."""
    implied = np.zeros(j)
    implied[j - 1] = beta
    return implied


def _basis(rows: int, op: _Products, budget: int):
    """Room for ``rows`` Krylov vectors of ``op`` (its working dtype): in memory up to ``budget`` bytes, else a file.

    On a sharded operator the rows are this rank's pieces, and the basis adds its partial inner
    products over the group (``op.shards``).
    """
    return krylov_basis(rows, op.local_dim, op.dtype, op.device, budget, shards=op.shards)


def _generator(seed: int, salt: int, index: int = 0) -> torch.Generator:
    """A CPU generator for (seed, purpose, index): probe i is the same whatever ran before it."""
    digest = hashlib.sha256(f"{int(seed)}/{salt}/{int(index)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclass
class LanczosInfo:
    """How ``top_eigenpairs`` ended.

    Products used (the checks' included), relative residuals ‖Hv − λv‖/|λ| measured with one more
    product on each returned vector, convergence, and the residuals Lanczos itself estimated
    (β·|y_m|, exact only in exact arithmetic).
    """

    products: int
    residuals: list
    converged: bool
    tol: float
    estimated: list = None


def _extend(op: _Products, basis, proj: np.ndarray, start: int, stop: int,
            budget: int, generator: torch.Generator, norm_estimate: float):
    """Krylov steps start..stop-1 with full reorthogonalization.

    basis: m+1 rows (``krylov``); rows 0..start hold an orthonormal basis.  Fills proj[:j+1, j] = Vᵀ·H·v_j
    and row j+1 of basis.  Returns (last filled column j, norm of its residual, products used).
    """
    used, beta, j = 0, 0.0, start - 1
    for j in range(start, stop):
        w = op.matvec_row(basis, j)
        used += 1
        w, coeffs = basis.orthogonalize(j + 1, w)
        column = coeffs.double().cpu().numpy()
        _check_finite(column)
        norm_estimate = max(norm_estimate, float(np.abs(column).max()))
        if j > start:  # v_j is this call's own (after a restart, v_start's couplings are the Ritz pairs')
            _check_symmetric(column[:j], _implied(j, beta), max(norm_estimate, beta), j)
        proj[: j + 1, j] = column
        proj[j, : j + 1] = column
        beta = float(op.norm(w))
        if j + 1 >= op.dim:  # the whole space is spanned: Ritz pairs are exact
            break
        if beta <= 1e-6 * norm_estimate:  # invariant subspace: continue from a fresh direction
            w, _ = basis.orthogonalize(j + 1, _random_unit(op.dim, generator, op.device, dtype=op.dtype, op=op))
            basis.put(j + 1, w / op.norm(w))
            beta = 0.0
        else:
            basis.put(j + 1, w.div_(beta))  # in place: w is this step's own vector
        w = None  # in the basis now: not held through the next product as well
        if used >= budget:
            break
    return j, beta, used


def _lanczos_top(op: _Products, k: int, seed: int, tol: float, max_iter: int, ncv: Optional[int],
                 basis_bytes: int = DEFAULT_BASIS_BYTES):
    """Thick-restart Lanczos (Wu & Simon 2000) for the k largest algebraic eigenpairs.

    Returns (eigenvalues (k,) float64 descending, eigenvectors (k, dim) unit rows, LanczosInfo); the
    eigenvectors are a tensor, or ``krylov.FileVectors`` (signs fixed) when the basis is in a file.
    Convergence: every wanted Ritz pair has ‖H·u − θ·u‖ ≤ tol·|θ| (the residual is β·|y_m|, exact
    for the Krylov–Schur relation H·V = V·T + f·e_mᵀ that full reorthogonalization maintains).
    """
    dim = op.dim
    m = min(dim, max(ncv or 2 * k + 10, 20 if ncv is None else k + 2))  # room for k pairs and growth
    generator = _generator(seed, 1)
    basis = _basis(m + 1, op, basis_bytes)
    try:
        found = _thick_restart(op, basis, k, m, generator, tol, max_iter)
    except BaseException:
        basis.close()
        raise
    if not basis.in_file:  # a file basis lives on as the eigenvectors' storage until they are read
        basis.close()
    return found


def _thick_restart(op: _Products, basis, k: int, m: int, generator: torch.Generator, tol: float, max_iter: int):
    """``_lanczos_top``'s iterations on an m+1-row basis."""
    dim = op.dim
    basis.put(0, _random_unit(dim, generator, op.device, dtype=op.dtype, op=op))
    proj = np.zeros((m, m))
    start, products, norm_estimate = 0, 0, 0.0
    while True:
        last, beta, used = _extend(op, basis, proj, start, m, max_iter - products, generator, norm_estimate)
        products += used
        size = last + 1
        theta, y = np.linalg.eigh(proj[:size, :size])
        theta, y = theta[::-1], y[:, ::-1]  # descending
        norm_estimate = max(norm_estimate, float(np.abs(theta).max()))
        residuals = beta * np.abs(y[size - 1, :])
        wanted = min(k, size)
        relative = residuals[:wanted] / np.maximum(np.abs(theta[:wanted]), 1e-30)
        done = wanted == k and bool(np.all(relative <= tol))
        if done or products >= max_iter or size >= dim:
            break
        # Restart: keep the best Ritz vectors (more than k, which speeds convergence) and the residual.
        keep = min(size - 1, k + (m - k) // 2)
        basis.restart(y[:, :keep], size)
        proj = np.zeros((m, m))
        proj[np.arange(keep), np.arange(keep)] = theta[:keep]
        start = keep
    vectors = basis.ritz_vectors(y[:, :wanted], size)
    measured, quotients = _measured_residuals(op, theta[:wanted], vectors)
    checked = _check_step(op, vectors, quotients, tol)
    info = LanczosInfo(products + wanted + checked, measured, (done or size >= dim) and max(measured) <= tol, tol,
                       [float(r) for r in relative])
    return theta[:wanted].copy(), vectors, info


def _measured_residuals(op: _Products, values, vectors: torch.Tensor) -> tuple:
    """Measure ‖H·v − λ·v‖/|λ| and the Rayleigh quotient vᵀ·H·v of each returned (λ, v), by one product each.

    The Krylov estimate β·|y_m| assumes exact arithmetic and can be 100 times smaller than what the
    float32 vector achieves.  Returns (residuals, quotients).
    """
    out, quotients = [], []
    for value, v in zip(values, vectors):
        hv = op.matvec(v)
        quotients.append(op.dot(v, hv))
        if isinstance(vectors, FileVectors):  # float64 a block at a time: no float64 copy of the vectors
            norm = _residual_norm(hv, v, float(value), op)
        elif op.shards is not None:
            norm = op.summed(float((hv.double() - float(value) * v.double()).square().sum())) ** 0.5
        else:
            norm = float(torch.linalg.norm(hv.double() - float(value) * v.double()))
        out.append(norm / max(abs(float(value)), 1e-30))
    return out, quotients


# The gradient-only product's error is its stencil's truncation (∝ ε⁴) plus its gradients' rounding
# (∝ 1/ε).  Along each returned eigenvector its Rayleigh quotient is formed again at this share of
# the step: where the truncation dominates the two differ by 15/16 of the first one's error, where
# the rounding does by about twice it, so a difference within the run's tolerance bounds the error
# of both (the symmetry check above misses an error that is symmetric).
STEP_CHECK_FACTOR = 0.5


def _check_step(op: _Products, vectors, quotients: list, tol: float) -> int:
    """Refuse a gradient-only product whose Rayleigh quotients at ε and ε/2 differ by more than ``tol``.

    Only for an operator with ``hvp == "difference"`` (and a ``scaled_step``); one product per
    vector, its quotient summed over a shard group, so every rank of it decides alike.

    Returns:
        The products used (0 for any other operator).

    Raises:
        UsageError: the two quotients of a vector differ by more than ``tol`` of the first.
    """
    A = op.op
    if getattr(A, "hvp", None) != "difference":
        return 0
    with A.scaled_step(STEP_CHECK_FACTOR):
        for i, (v, quotient) in enumerate(zip(vectors, quotients)):
            half = op.summed(op.quadratic(v))
            defect = abs(half - quotient) / max(abs(quotient), 1e-30)
            if not defect <= tol:  # a NaN is refused too
                raise UsageError(f"the gradient-only Hessian product (hvp 'difference') is not accurate along "
                                 f"eigenvector {i + 1}: its Rayleigh quotient is {quotient:.6g} at the step and "
                                 f"{half:.6g} at half the step ({defect:.2g} apart, more than the tolerance {tol:g}), "
                                 "so the eigenvalue would be wrong: use the exact product (docs/curvature.md, "
                                 "'Concentrated vectors')")
    return len(quotients)


def _residual_norm(hv: torch.Tensor, v: torch.Tensor, value: float, op: _Products, block: int = 2**20) -> float:
    """‖hv − value·v‖ in float64, ``block`` elements at a time (the pieces' squares added over a shard group)."""
    total = 0.0
    for start in range(0, hv.numel(), block):
        part = hv[start: start + block].double() - value * v[start: start + block].double()
        total += float(part.square().sum())
    return op.summed(total) ** 0.5


def top_eigenpairs(A, k: int = 2, seed: int = 0, *, tol: float = 1e-4, max_iter: int = 500,
                   ncv: Optional[int] = None, progress: bool = False, return_info: bool = False,
                   basis_bytes: int = DEFAULT_BASIS_BYTES):
    """The k largest (most positive) eigenvalues of a symmetric operator and their eigenvectors.

    Thick-restart Lanczos with full reorthogonalization from a seeded Gaussian start vector.

    Args:
        A: a symmetric operator (``linear``'s convention: ``A @ v``, ``shape``, ``dtype``,
            ``device``), e.g. ``HessianOperator(model, batches, mask, kind)``, or a square tensor.
        k: how many eigenpairs.
        seed: seeds the start vector.
        tol: stop when every wanted pair has ‖A·v − λ·v‖ ≤ tol·|λ|.
        max_iter: at most this many products for Lanczos (a warning says if tol was not reached),
            plus one per returned pair to measure its residual (two for a gradient-only product:
            ``_check_step``).
        ncv: Krylov basis size before a restart (default max(2k+10, 20), at least k+2); memory
            (ncv+1)·dim of the working dtype (float32, float64 for a float64 operator), or a
            temporary file of that size beyond ``basis_bytes``.
        progress: a tqdm bar over products.
        return_info: also return a ``LanczosInfo`` (products, relative residuals measured with one
            extra product per returned vector, converged: Lanczos stopped on tol and every
            measured residual is within it).
        basis_bytes: the Krylov basis stays in memory (on A's device) up to this many bytes; a
            larger one goes to a temporary file, read a block at a time (``krylov``), and the
            eigenvectors then come back as a CPU tensor mapped from a temporary file.

    Returns:
        (eigenvalues, eigenvectors): numpy float64 (k,) descending, in A's units; and a (k, dim)
        tensor of unit rows on A's device, each with its largest-magnitude element positive.  For
        the Hessian, ``H.to_dict(row)`` gives the direction dict ``directions.save_directions``
        writes (zero outside the mask and on frozen parameters).
    """
    if int(k) < 1:
        raise UsageError(f"the number of eigenpairs must be at least 1, got {k}")
    if not 0 < float(tol) < 1:
        raise UsageError(f"the eigenpair tolerance must be in (0, 1), got {tol}")
    op = _Products(A, progress)
    if k > op.dim:
        raise UsageError(f"asked for {k} eigenpairs of an operator with only {op.dim} coordinates")
    if int(max_iter) < k:
        raise UsageError(f"max_iter ({max_iter}) must be at least the number of eigenpairs ({k})")
    # + one check per returned vector, and one more for a gradient-only product's step (``_check_step``)
    op.total = int(max_iter) + int(k) * (2 if getattr(op.op, "hvp", None) == "difference" else 1)
    with op:
        values, vectors, info = _lanczos_top(op, int(k), seed, float(tol), int(max_iter), ncv, int(basis_bytes))
    if not info.converged:
        warnings.warn(f"top_eigenpairs: not converged after {info.products} {op.label} (largest relative residual "
                      f"{max(info.residuals):.2g}, tolerance {tol:g}); raise max_iter or tol", stacklevel=2)
    if isinstance(vectors, FileVectors):  # signs fixed already; a stacked copy is what the file avoids
        vectors = vectors.tensor()
    else:
        vectors = torch.stack([_fix_sign(v) for v in vectors]) if op.shards is None else \
            vectors * op.shards.signs(vectors)[:, None]
    return (values, vectors, info) if return_info else (values, vectors)


def _lanczos_run(op: _Products, start: Callable[[], torch.Tensor], steps: int, reorthogonalize: bool,
                 basis_bytes: int = DEFAULT_BASIS_BYTES):
    """One Lanczos run of up to ``steps`` products from the unit vector ``start()``: (Ritz values, weights).

    ``start`` makes the vector, so that no caller's frame keeps it once the run has moved past it.

    The weights are the squared first components of the tridiagonal matrix's eigenvectors: the
    Gauss quadrature of the start vector's spectral measure.
    """
    steps = min(steps, op.dim)
    basis = _basis(steps, op, basis_bytes) if reorthogonalize else None
    try:
        return _run_steps(op, start, steps, basis)
    finally:
        if basis is not None:
            basis.close()


def _run_steps(op: _Products, start: Callable[[], torch.Tensor], steps: int, basis):
    """``_lanczos_run``'s steps, reorthogonalized against ``basis`` (None: the three-term recurrence)."""
    alphas, betas = [], []
    v, previous, beta = start(), None, 0.0
    for j in range(steps):
        if basis is not None:  # v in its row first: the product and α read it there (a file's a part at a time)
            basis.put(j, v)
            v = w = None  # w is v (the last step's, normalized in place): neither is held through the product
            w = op.matvec_row(basis, j)
            alpha = op.summed(basis.row(j).dot(w)) if basis.in_file else op.dot(w, basis.get(j))
        else:
            w = op.matvec(v)
            alpha = op.dot(w, v)
        _check_finite([alpha])
        size = max([abs(alpha), beta] + [abs(a) for a in alphas] + betas)  # about ‖A‖
        if basis is not None:
            w, coeffs = basis.orthogonalize(j + 1, w)
            if j > 0:
                _check_symmetric(coeffs[:j].double().cpu().numpy(), _implied(j, beta), size, j)
        else:
            if previous is not None:
                _check_symmetric(np.array([op.dot(w, previous)]), np.array([beta]), size, j)
            w = w - alpha * v - (beta * previous if previous is not None else 0.0)
        alphas.append(alpha)
        beta = float(op.norm(w))
        scale = max(abs(a) for a in alphas) + max(betas, default=0.0)
        if j + 1 == steps or beta <= 1e-6 * scale:  # done, or the Krylov space is invariant
            break
        betas.append(beta)
        previous, v = (v if basis is None else None), None  # the recurrence's only: no copy kept
        v = w.div_(beta)  # in place: w is this step's own vector
    tri = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    nodes, vectors = np.linalg.eigh(tri)
    return nodes, vectors[0, :] ** 2
