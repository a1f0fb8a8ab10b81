"""Linear operators: the interface the curvature estimators take, and the small operators built on it.

The convention (as curvlinops' operators, on torch tensors): an operator ``A`` is a square n x n
matrix that acts on flat vectors.  It has

* ``A @ v``: for a 1-D tensor ``v`` of n elements, the 1-D tensor A·v of n elements;
* ``shape``: ``(n, n)``;
* ``dtype``: the dtype of its products (``torch.float32`` for the Hessian);
* ``device``: where its products live (vectors are made there).

Anything with these four is an operator: ``HessianOperator`` (the loss Hessian), ``DiagonalOperator``
(e.g. the diagonal Fisher, ``fisher_operator``), ``MatrixOperator`` (a dense matrix; a plain 2-D
torch tensor is wrapped in one by ``as_operator``), ``SubmatrixOperator`` (a principal submatrix of
another operator).  Three things are optional:

* a context manager: the estimators hold ``with A:`` around all their products (the Hessian puts
  the model in eval mode and float32 once, not once per product);
* ``identity()``: a JSON-ready dict of what fixes A's entries; an estimator's checkpoint stores it
  and refuses to resume on an operator with another one, so a checkpoint needs it;
* ``quadratic(v)``: the float vᵀ·A·v, which ``trace`` takes for each probe instead of ``A @ v``
  (the Hessian's forms it without a product vector).

The estimators (``top_eigenpairs``, ``trace``, ``spectrum``) work in float64 for a float64
operator and in float32 otherwise.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch

from ..errors import UsageError
from ..progress import bar as progress_bar
from .quadratic import block_dot


def _digest(tensor: torch.Tensor) -> str:
    """Short content hash of a tensor (its values and dtype), for an operator's identity."""
    flat = tensor.detach().reshape(-1).cpu().contiguous()
    digest = hashlib.sha1(str(flat.dtype).encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()[:16]


class LinearOperator:
    """Base of the operators here: ``A @ v`` calls ``_matvec``; ``shape``, ``dtype``, ``device`` set by subclasses.

    Entering it (``with A:``) does nothing unless a subclass says otherwise.
    """

    shape: tuple
    dtype: torch.dtype
    device: torch.device

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(v) or v.dim() != 1 or v.numel() != self.shape[1]:
            got = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
            raise UsageError(f"an operator of shape {tuple(self.shape)} multiplies a vector of {self.shape[1]} "
                             f"elements, got {got}")
        return self._matvec(v.to(device=self.device, dtype=self.dtype))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


class MatrixOperator(LinearOperator):
    """A dense square matrix as an operator.

    Args:
        matrix: a square 2-D floating-point tensor (symmetric for the estimators), any device.
    """

    def __init__(self, matrix: torch.Tensor):
        if not torch.is_tensor(matrix) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            shape = tuple(matrix.shape) if torch.is_tensor(matrix) else type(matrix).__name__
            raise UsageError(f"an operator needs a square matrix, got {shape}")
        if not matrix.is_floating_point():
            raise UsageError(f"an operator needs a floating-point matrix, got {matrix.dtype}")
        self.matrix = matrix.detach()
        self.shape, self.dtype, self.device = tuple(matrix.shape), matrix.dtype, matrix.device

    def _matvec(self, v):
        return self.matrix @ v

    def identity(self) -> dict:
        """The matrix's size and content hash."""
        return {"operator": "matrix", "dim": self.shape[0], "values": _digest(self.matrix)}


class DiagonalOperator(LinearOperator):
    """diag(d) as an operator: ``A @ v`` = d * v.

    Args:
        diagonal: 1-D floating-point tensor, any device.
    """

    def __init__(self, diagonal: torch.Tensor):
        if not torch.is_tensor(diagonal) or diagonal.dim() != 1 or not diagonal.is_floating_point():
            raise UsageError("a diagonal operator needs a 1-D floating-point tensor")
        self.diagonal = diagonal.detach()
        n = diagonal.numel()
        self.shape, self.dtype, self.device = (n, n), diagonal.dtype, diagonal.device

    def _matvec(self, v):
        return self.diagonal * v

    def identity(self) -> dict:
        """The diagonal's size and content hash."""
        return {"operator": "diagonal", "dim": self.shape[0], "values": _digest(self.diagonal)}


def fisher_operator(fisher, model: torch.nn.Module, mask: Optional[dict] = None) -> DiagonalOperator:
    """The diagonal empirical Fisher on the coordinates of ``HessianOperator(model, batches, mask, kind)``.

    Coordinate i of one is coordinate i of the other (the kept elements of the trainable
    parameters, in ``named_parameters()`` order), so the estimators compare them directly: e.g. the
    trace of this operator is the Fisher's sum over the kept elements.

    Args:
        fisher: {param name: scores shaped like the param}, or a Fisher file's path (read whole).
        model: the model the Fisher was computed on.
        mask: {param name: bool tensor shaped like the param}; None keeps every element.

    Returns:
        A float32 ``DiagonalOperator`` on the model's device.

    Raises:
        UsageError: the Fisher does not match the model's trainable parameters, or a bad mask.
    """
    from ..fisher.file import check_fisher_matches, load_fisher
    from .operator import _Space

    if not isinstance(fisher, dict):
        fisher = load_fisher(fisher)[0]
    check_fisher_matches(fisher, model)
    return DiagonalOperator(_Space(model, mask).from_dict(fisher))


class SubmatrixOperator(LinearOperator):
    """The principal submatrix A[index][:, index] of an operator (as curvlinops' ``SubmatrixLinearOperator``).

    Each product is one product of ``A`` (zeros off ``index``).  For the Hessian of a parameter
    subset, ``HessianOperator(model, batches, mask, kind)`` is the same submatrix made without the
    masked-out coordinates' work.

    Args:
        operator: any operator (see the module docstring).
        index: the kept coordinates, a 1-D integer tensor of distinct indices or a bool tensor of n.
    """

    def __init__(self, operator, index: torch.Tensor):
        self.operator = as_operator(operator)
        n = self.operator.shape[0]
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            if index.shape != (n,):
                raise UsageError(f"a bool index of a submatrix needs {n} elements, got {tuple(index.shape)}")
            index = index.nonzero()[:, 0]
        index = index.reshape(-1).long()
        if not index.numel() or int(index.min()) < 0 or int(index.max()) >= n or len(index.unique()) != len(index):
            raise UsageError(f"a submatrix needs at least one distinct index in [0, {n})")
        self.index = index.to(self.operator.device)
        self.shape, self.dtype, self.device = (index.numel(), index.numel()), self.operator.dtype, self.operator.device

    def _matvec(self, v):
        full = torch.zeros(self.operator.shape[0], dtype=v.dtype, device=v.device)
        full[self.index] = v
        return (self.operator @ full)[self.index]

    def __enter__(self):
        _enter(self.operator)
        return self

    def __exit__(self, *exc) -> bool:
        _exit(self.operator, exc)
        return False

    def identity(self) -> dict:
        """The whole operator's identity and the kept indices' hash (needs the operator's ``identity``)."""
        return {"operator": "submatrix", "of": _identity_of(self.operator), "index": _digest(self.index)}


def as_operator(A):
    """``A`` as an operator.

    A 2-D tensor becomes a ``MatrixOperator``; anything with ``@``, ``shape``, ``dtype`` and
    ``device`` (square) is taken as it is.

    Raises:
        UsageError: ``A`` is neither (e.g. a model: build ``HessianOperator(model, batches, kind=...)``).
    """
    if torch.is_tensor(A):
        return MatrixOperator(A)
    missing = [name for name in ("shape", "dtype", "device", "__matmul__") if not hasattr(A, name)]
    if missing:
        raise UsageError(f"a {type(A).__name__} is not a linear operator (it has no {', '.join(missing)}); pass "
                         "a square matrix or an operator, e.g. HessianOperator(model, batches, kind=...)")
    shape = tuple(A.shape)
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 1:
        raise UsageError(f"the estimators need a square operator, got shape {shape}")
    return A


def _identity_of(A) -> dict:
    if not hasattr(A, "identity"):
        raise UsageError(f"a checkpoint needs an operator that says what it is: a {type(A).__name__} has no "
                         "identity()")
    return A.identity()


def _enter(A):
    if hasattr(A, "__enter__"):
        A.__enter__()


def _exit(A, exc):
    if hasattr(A, "__exit__"):
        A.__exit__(*exc)


def _enter_estimating(A):
    """Enter A's block as an estimator that only takes products: the Hessian's lean block where it has one."""
    lean = getattr(A, "released_between_products", None)
    if lean is None:
        _enter(A)
        return None
    block = lean()
    block.__enter__()
    return block


def vector_norm(w: torch.Tensor, summed=float) -> torch.Tensor:
    """‖w‖, a 0-dim tensor of w's dtype and device, its squares added in float64 (``block_dot``).

    ``summed`` adds a sharded vector's pieces' squares over its group (``_Products.summed``).
    """
    return torch.tensor(summed(block_dot(w, w)) ** 0.5, dtype=w.dtype, device=w.device)


class _Products:
    """An operator as the estimators drive it.

    Its context held around every product (``with``), each product's size checked, counted and
    ticked on a progress bar (over ``total`` products, set before the block), results in the
    working dtype (float64 for a float64 operator, float32 otherwise).

    An operator on a sharded model (``shards.VectorShards`` as its ``shards``) takes and returns
    this rank's pieces of each vector (``local_dim`` elements; ``dim`` stays the whole vector's):
    the estimators' inner products and norms go through ``dot``, ``norm``, ``summed`` and
    ``reduce``, which add the group's pieces, and their random vectors through ``local``.  One
    under torchrun also has a ``split`` (``shards.PointSplit``) of the independent units.
    """

    def __init__(self, A, progress: bool = False):
        self.op = as_operator(A)
        self.dim = int(self.op.shape[0])
        self.device = torch.device(self.op.device)
        self.dtype = torch.float64 if self.op.dtype == torch.float64 else torch.float32
        self.products = 0
        self.total: Optional[int] = None
        self.progress = progress
        # An operator may name its products (the Hessian's are "Hessian-vector products").
        self.label = getattr(self.op, "progress_label", "matrix-vector products")
        self.bar = None
        self._block = None  # the operator's block while this one is entered (``_enter_estimating``)
        self.shards = getattr(self.op, "shards", None)  # None: every rank holds whole vectors
        self.split = getattr(self.op, "split", None)  # None: one process runs every unit
        self.local_dim = self.dim if self.shards is None else self.shards.local_dim

    # -- vectors split over a shard group (whole vectors: the plain operations, bit for bit)
    def summed(self, value: float) -> float:
        """A partial sum over this rank's pieces, summed over the shard group."""
        return value if self.shards is None else self.shards.total(value)

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Partial sums (e.g. a basis's coefficients) summed over the shard group, in place."""
        return tensor if self.shards is None else self.shards.reduce(tensor)

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """aᵀb over the whole vectors, summed in float64 (``quadratic.block_dot``)."""
        return self.summed(block_dot(a, b))

    def norm(self, w: torch.Tensor) -> torch.Tensor:
        """‖w‖ over the whole vector, a 0-dim tensor of w's dtype (its squares added in float64)."""
        return vector_norm(w, self.summed)

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's pieces of a whole vector (the vector itself when not sharded)."""
        return full if self.shards is None else self.shards.take(full)

    def check_journal(self, checkpoint) -> None:
        """Journals are one process's: refused for an operator split over ranks."""
        if checkpoint is not None and (self.shards is not None or self.split is not None):
            raise UsageError("a journal (checkpoint) is written by one process; under torchrun pass none")

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """A·v for a (local_dim,) vector of the working dtype on the operator's device."""
        out = self.op @ v
        if not torch.is_tensor(out) or out.shape != (self.local_dim,):
            raise UsageError(f"the operator's product has shape {tuple(getattr(out, 'shape', ()))}, "
                             f"not ({self.local_dim},)")
        self.products += 1
        if self.bar is not None:
            self.bar.update(1)
        return out.to(self.dtype)

    def matvec_row(self, basis, j: int) -> torch.Tensor:
        """A·(row j of a Krylov basis): a row in a file is handed over unread where the operator reads it by parts.

        The Hessian's exact product reads each parameter's part as its second backward needs it
        (``cotangents``): the row is never whole in memory beside the product.
        """
        lazy = basis.in_file and getattr(self.op, "reads_rows", False)
        return self.matvec(basis.row(j) if lazy else basis.get(j))

    def quadratic(self, v: torch.Tensor) -> float:
        """vᵀ·A·v in float64, counted as one product.

        The operator's own ``quadratic`` where it has one (the Hessian's holds no product vector),
        else from ``matvec``.
        """
        form = getattr(self.op, "quadratic", None)
        if form is None:
            return block_dot(v, self.matvec(v))
        value = float(form(v))
        self.products += 1
        if self.bar is not None:
            self.bar.update(1)
        return value

    def identity(self) -> dict:
        return _identity_of(self.op)

    def record(self) -> None:
        """Let the operator record what all its products share before the first vector exists (the Hessian's graph)."""
        record = getattr(self.op, "record", None)
        if record is not None:
            record()

    def __enter__(self) -> "_Products":
        self.bar = progress_bar(total=self.total, desc=self.label, unit="Hv", enabled=self.progress)
        try:
            self._block = _enter_estimating(self.op)
        except BaseException:
            self.bar.close()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self.bar.close()
        _exit(self.op if self._block is None else self._block, exc)
        return False

