"""Krylov bases beyond their memory budget: in a temporary file, read a block of coordinates at a time.

The file-backed basis must give what the in-memory one gives (to rounding), through thick restarts,
the final Ritz vectors and their sign convention, and the spectrum's reorthogonalized runs.
"""

import numpy as np
import pytest
import torch

from landscape import curvature as C
from landscape.curvature import krylov
from landscape.errors import UsageError
from landscape.testing.dense import symmetric_matrix

KNOWN = [9.0, 8.0, 7.5, 3.0, 2.0] + [1.0 - 0.05 * i for i in range(55)]  # 60 eigenvalues, three on top


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a handful of coordinates: every block boundary and partial last block is exercised."""
    monkeypatch.setattr(krylov, "BLOCK_BYTES", 1000)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eigenpairs_from_a_file_basis_are_those_of_the_memory_basis(small_blocks, dtype):
    A = symmetric_matrix(KNOWN, seed=2, dtype=dtype)
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    # ncv 6: a basis of 7 rows, so the 3 pairs need several thick restarts
    want, want_vectors, want_info = C.top_eigenpairs(A, k=3, tol=tol, ncv=6, return_info=True)
    got, vectors, info = C.top_eigenpairs(A, k=3, tol=tol, ncv=6, return_info=True, basis_bytes=0)
    assert info.products == want_info.products > 7 and info.converged
    close = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(got, want, rtol=close)
    np.testing.assert_allclose(got, KNOWN[:3], rtol=10 * tol)
    assert vectors.device.type == "cpu" and vectors.dtype == dtype and vectors.shape == (3, len(KNOWN))
    torch.testing.assert_close(vectors, want_vectors, rtol=0, atol=10 * close)  # signs included
    # the residuals are measured by products on the vectors returned, as in memory
    for value, v, residual in zip(got, vectors, info.residuals):
        measured = float(torch.linalg.norm(A.double() @ v.double() - value * v.double())) / abs(value)
        assert residual == pytest.approx(measured, rel=1e-3, abs=1e-6 if dtype == torch.float32 else 1e-12)


def test_spectrum_runs_from_a_file_basis_are_those_of_the_memory_basis(small_blocks):
    A = symmetric_matrix(KNOWN, seed=3, dtype=torch.float64)
    want = C.spectrum(A, runs=2, steps=25, bins=40, seed=1)
    got = C.spectrum(A, runs=2, steps=25, bins=40, seed=1, basis_bytes=0)
    for a, b in zip(got.nodes + got.weights, want.nodes + want.weights):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_the_budget_decides_where_the_basis_lives():
    rows, dim = 5, 100
    assert not krylov.krylov_basis(rows, dim, torch.float32, "cpu", rows * dim * 4).in_file
    basis = krylov.krylov_basis(rows, dim, torch.float32, "cpu", rows * dim * 4 - 1)
    assert basis.in_file
    row = torch.arange(dim, dtype=torch.float32)
    basis.put(3, row)
    assert torch.equal(basis.get(3), row) and not basis.get(2).any()
    basis.close()
    with pytest.raises(UsageError, match="budget"):
        krylov.krylov_basis(rows, dim, torch.float32, "cpu", -1)


@pytest.mark.filterwarnings("ignore:top_eigenpairs. not converged")
def test_lanczos_on_millions_of_coordinates_sums_in_float64():
    # SmolLM2's Hessian has 134M coordinates: there torch's float32 dot products, norms and
    # matrix-vector products on the CPU were off by up to 1.5% (2e-4 at 2^23), so the start vector
    # was not unit, the basis not orthonormal, and two runs of the same Krylov space disagreed.
    from landscape.curvature.lanczos import _generator, _random_unit

    n = 2**23
    start = _random_unit(n, _generator(0, 1), "cpu")
    assert abs(float(start.double().norm()) - 1.0) <= 1e-6
    d = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d[:3] = torch.tensor([5.0, 4.0, 3.0], dtype=torch.float64)
    # The same start vector and 4 products: the same Krylov space, so the same Ritz value as in float64.
    want = C.top_eigenpairs(C.DiagonalOperator(d), k=1, max_iter=4, ncv=4)[0]
    got = C.top_eigenpairs(C.DiagonalOperator(d.float()), k=1, max_iter=4, ncv=4)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("run", ["top", "spectrum", "recurrence"])
def test_products_that_are_not_a_symmetric_matrix_s_are_refused(run):
    """Lanczos assumes vᵢᵀ·A·vⱼ = vⱼᵀ·A·vᵢ; products that break it (a gradient-only Hessian product
    whose step is too large for the Lanczos vectors: docs/curvature.md) would give eigenvalues of no
    matrix.  Its symmetric part runs, and gives its own eigenvalues."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(60, 60, generator=generator, dtype=torch.float64)
    symmetric = a + a.T
    lopsided = symmetric + 0.2 * (a - a.T)
    estimate = {"top": lambda m: C.top_eigenpairs(m, k=2),
                "spectrum": lambda m: C.spectrum(m, runs=2, steps=10),
                "recurrence": lambda m: C.spectrum(m, runs=2, steps=10, reorthogonalize=False)}[run]
    with pytest.raises(UsageError, match="not symmetric along the Lanczos vectors"):
        estimate(lopsided)
    found = estimate(symmetric)
    if run == "top":
        np.testing.assert_allclose(found[0], np.linalg.eigvalsh(symmetric.numpy())[::-1][:2], rtol=1e-8)


@pytest.mark.parametrize("reorthogonalize", [True, False])
def test_a_spectrum_of_non_finite_products_is_refused_in_the_lanczos_words(reorthogonalize):
    """As the top eigenpairs refuse them: not a LinAlgError from eigh, far from the cause."""
    a = torch.randn(40, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    broken = a + a.T
    broken[3, 5] = float("nan")
    with pytest.raises(UsageError, match="product is not finite"):
        C.spectrum(broken, runs=1, steps=8, reorthogonalize=reorthogonalize)


def test_a_file_rows_reads_are_the_row_and_its_dot_is_block_dots():
    """A row handed out unread (``FileRow``) gives the row's numbers, and α = wᵀv as ``block_dot`` sums it."""
    from landscape.curvature.quadratic import BLOCK, block_dot

    dim = BLOCK + 12345  # a second, partial block of block_dot's, and column blocks that do not align with it
    basis = krylov.FileBasis(3, dim, torch.float32, "cpu", block_bytes=3 * 4 * 100003)
    gen = torch.Generator().manual_seed(0)
    v, w = torch.randn(dim, generator=gen), torch.randn(dim, generator=gen)
    basis.put(2, v)
    row = basis.row(2)
    assert row.numel() == dim and torch.equal(row.tensor(), v)
    for start, count in ((0, dim), (99990, 30), (100003, 100003), (dim - 7, 7)):
        assert torch.equal(row.read(start, count), v[start: start + count])
    assert row.dot(w) == block_dot(w, v)  # bit for bit: the spectrum's α is what it was with v in memory
    basis.close()
