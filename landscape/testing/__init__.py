"""References the test suite checks the library against, computed by independent methods.

``dense``: dense Hessians of tiny models, finite-difference Hessian-vector products, symmetric
matrices with known eigenvalues, principal submatrices of a mask.  Small sizes only (they are
dense, n x n in float64).
"""
