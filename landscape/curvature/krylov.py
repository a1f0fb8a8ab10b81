"""Krylov bases for Lanczos: in memory while they fit a budget, beyond it in a temporary file.

The top eigenpairs keep m+1 vectors of every coordinate (m >= 20) and a reorthogonalized spectrum
run one per step: at a model's size that is tens of copies of its parameters in float32, the
largest allocation of the Hessian's estimators.  ``krylov_basis`` returns the rows in memory (a
rows x dim tensor on the operator's device) when they fit ``budget`` bytes, else in a temporary file
read and written with plain ``pread``/``pwrite`` (not memory-mapped: mapped pages would count in the
process's memory as they are touched), so only a block of at most ``BLOCK_BYTES`` is in memory at a
time; the kernel keeps the file in its page cache while RAM allows and writes it out otherwise.

The file lays out coordinates in column blocks: block c holds every row's coordinates
[c·width, (c+1)·width) contiguously, so Gram-Schmidt against the first j rows reads one contiguous
stretch per block.  The in-memory basis computes exactly what Lanczos computed before there was a
file (the same tensor operations), so results below the budget are unchanged; the file's blockwise
sums differ from them by rounding only.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import numpy as np
import torch

from ..errors import UsageError
from ..sharding import collective_device
from .quadratic import BLOCK, block_dot, block_rows_dot

# Bases up to this many bytes stay in memory (on the operator's device); larger ones go to a file.
DEFAULT_BASIS_BYTES = 2**30
# The most the file-backed basis reads into memory at once (one block of rows).
BLOCK_BYTES = 2**25


def _orthogonalize(basis: torch.Tensor, w: torch.Tensor, shards=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Classical Gram-Schmidt twice (CGS2) of w against the rows of ``basis``: (w', float64 coefficients).

    The coefficients are summed in float64 (``quadratic.block_rows_dot``: a float32 ``basis @ w`` is
    off by 1.5% at 134M coordinates). shards: a ``shards.VectorShards`` when the rows and w are this
    rank's pieces (the coefficients are then added over its group), else None.
    """
    coeffs = _summed(block_rows_dot(basis, w), shards)
    w = w - basis.T @ coeffs.to(basis.dtype)
    again = _summed(block_rows_dot(basis, w), shards)
    return w - basis.T @ again.to(basis.dtype), coeffs + again


def _summed(partial: torch.Tensor, shards) -> torch.Tensor:
    """Inner products of this rank's pieces, added over the shard group (as they are without one)."""
    return partial if shards is None else shards.reduce(partial)


def _fix_sign(v: torch.Tensor) -> torch.Tensor:
    """Eigenvectors are defined up to sign; make the largest-magnitude element positive (reproducible)."""
    return v if v[v.abs().argmax()] >= 0 else -v


def krylov_basis(rows: int, dim: int, dtype: torch.dtype, device, budget: int = DEFAULT_BASIS_BYTES,
                 shards=None):
    """Room for ``rows`` Krylov vectors of ``dim`` coordinates: in memory within ``budget`` bytes, else a file.

    shards: a ``shards.VectorShards`` when the vectors are this rank's pieces (``dim`` of them) of
    vectors split over a shard group: inner products and norms are then added over the group.

    Raises:
        UsageError: a negative budget.
    """
    if int(budget) < 0:
        raise UsageError(f"the Krylov basis budget must be 0 bytes or more, got {budget}")
    size = int(rows) * int(dim) * torch.empty((), dtype=dtype).element_size()
    if size <= int(budget):
        return MemoryBasis(rows, dim, dtype, device, shards)
    return FileBasis(rows, dim, dtype, device, shards=shards)


class MemoryBasis:
    """The rows as one (rows, dim) tensor on the operator's device."""

    in_file = False

    def __init__(self, rows: int, dim: int, dtype: torch.dtype, device, shards=None):
        self.data = torch.zeros(rows, dim, dtype=dtype, device=device)
        self.dtype, self.device, self.shards = dtype, device, shards

    def get(self, j: int) -> torch.Tensor:
        """Row j (a view)."""
        return self.data[j]

    def put(self, j: int, v: torch.Tensor) -> None:
        """Row j = v."""
        self.data[j] = v

    def orthogonalize(self, count: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CGS2 of w against rows 0..count-1: (w', float64 coefficients)."""
        return _orthogonalize(self.data[:count], w, self.shards)

    def restart(self, y: np.ndarray, size: int) -> None:
        """Rows 0..keep-1 = the Ritz vectors yᵀ·rows[:size] (y: size x keep); row keep = row ``size``."""
        keep = y.shape[1]
        ritz = torch.from_numpy(np.ascontiguousarray(y.T)).to(self.device, self.dtype) @ self.data[:size]
        residual = self.data[size].clone()
        self.data[:keep] = ritz
        self.data[keep] = residual

    def ritz_vectors(self, y: np.ndarray, size: int) -> torch.Tensor:
        """The unit Ritz vectors yᵀ·rows[:size] (y: size x wanted), (wanted, dim), signs as they come."""
        coeffs = torch.from_numpy(np.ascontiguousarray(y.T)).to(self.device, self.dtype)
        vectors = coeffs @ self.data[:size]
        squares = torch.tensor([block_dot(v, v) for v in vectors], dtype=torch.float64, device=self.device)
        vectors /= _summed(squares, self.shards).sqrt().to(self.dtype)[:, None]
        return vectors

    def close(self) -> None:
        """Drop the rows."""
        self.data = None


class FileBasis:
    """The rows in an anonymous temporary file, blocks of coordinates at a time (see the module's doc)."""

    in_file = True

    def __init__(self, rows: int, dim: int, dtype: torch.dtype, device, block_bytes: Optional[int] = None,
                 shards=None):
        block_bytes = BLOCK_BYTES if block_bytes is None else block_bytes
        self.shards = shards
        self.rows, self.dim, self.dtype, self.device = int(rows), int(dim), dtype, torch.device(device)
        self.np_dtype = np.dtype(str(dtype).replace("torch.", ""))
        self.item = self.np_dtype.itemsize
        self.width = max(1, min(self.dim, int(block_bytes) // (self.rows * self.item)))
        self.file = tempfile.TemporaryFile(prefix="landscape-krylov-")
        self.file.truncate(self.rows * self.dim * self.item)  # sparse: unwritten rows read as zeros
        self.buffer = np.empty(self.rows * self.width, dtype=self.np_dtype)

    # -- file access
    def _spans(self):
        for start in range(0, self.dim, self.width):
            yield start, min(self.width, self.dim - start)

    def _offset(self, start: int, row: int, length: int) -> int:
        return (start * self.rows + row * length) * self.item

    def _read(self, array: np.ndarray, offset: int) -> None:
        view, done = memoryview(array).cast("B"), 0
        while done < len(view):
            got = os.preadv(self.file.fileno(), [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"the Krylov basis file ended early at byte {offset + done}")
            done += got

    def _write(self, array: np.ndarray, offset: int) -> None:
        view, done = memoryview(np.ascontiguousarray(array)).cast("B"), 0
        while done < len(view):
            done += os.pwrite(self.file.fileno(), view[done:], offset + done)

    def _block(self, start: int, length: int, count: int) -> torch.Tensor:
        """Rows 0..count-1 of the coordinates [start, start+length), (count, length) on the device."""
        part = self.buffer[: count * length]
        self._read(part, self._offset(start, 0, length))
        return torch.from_numpy(part.reshape(count, length)).to(self.device)

    def _put_block(self, start: int, length: int, first: int, block: torch.Tensor) -> None:
        """Rows first..first+len(block)-1 of the coordinates [start, start+length) = block."""
        self._write(block.detach().cpu().numpy(), self._offset(start, first, length))

    # -- the basis
    def get(self, j: int) -> torch.Tensor:
        """Row j, read into a new tensor on the device."""
        out = np.empty(self.dim, dtype=self.np_dtype)
        for start, length in self._spans():
            self._read(out[start: start + length], self._offset(start, j, length))
        return torch.from_numpy(out).to(self.device)

    def row(self, j: int) -> "FileRow":
        """Row j, to be read a stretch at a time (a Hessian product's cotangents, ``cotangents``)."""
        return FileRow(self, j)

    def put(self, j: int, v: torch.Tensor) -> None:
        """Row j = v."""
        host = v.detach().to(self.dtype).cpu().numpy()
        for start, length in self._spans():
            self._write(host[start: start + length], self._offset(start, j, length))

    def orthogonalize(self, count: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CGS2 of w against rows 0..count-1, w updated in place: (w', float64 coefficients).

        Three reads of the rows: the first coefficients; the first correction fused with the
        second coefficients (they need the corrected block only); the second correction.
        """
        coeffs = torch.zeros(count, dtype=torch.float64, device=self.device)
        for start, length in self._spans():
            coeffs += block_rows_dot(self._block(start, length, count), w[start: start + length])
        coeffs = _summed(coeffs, self.shards)
        again = torch.zeros_like(coeffs)
        for start, length in self._spans():
            block, part = self._block(start, length, count), w[start: start + length]
            part -= block.T @ coeffs.to(self.dtype)
            again += block_rows_dot(block, part)
        again = _summed(again, self.shards)
        for start, length in self._spans():
            w[start: start + length] -= self._block(start, length, count).T @ again.to(self.dtype)
        return w, coeffs + again

    def restart(self, y: np.ndarray, size: int) -> None:
        """Rows 0..keep-1 = yᵀ·rows[:size] (y: size x keep); row keep = row ``size``; block by block."""
        coeffs = torch.from_numpy(np.ascontiguousarray(y.T)).to(self.device, self.dtype)
        for start, length in self._spans():
            block = self._block(start, length, size + 1)
            # rows 0..keep: the Ritz vectors, then the residual row (rows beyond are rewritten later)
            self._put_block(start, length, 0, torch.cat([coeffs @ block[:size], block[size:]]))

    def ritz_vectors(self, y: np.ndarray, size: int) -> "FileVectors":
        """The unit Ritz vectors yᵀ·rows[:size] (y: size x wanted) with their largest element positive."""
        wanted = y.shape[1]
        coeffs = torch.from_numpy(np.ascontiguousarray(y.T)).to(self.device, self.dtype)
        squares = torch.zeros(wanted, dtype=torch.float64)
        for start, length in self._spans():  # rows 0..wanted-1 = the combinations; their norms
            combined = coeffs @ self._block(start, length, size)
            squares += combined.double().square().sum(dim=1).cpu()
            self._put_block(start, length, 0, combined)
        if self.shards is not None:
            squares = self.shards.reduce(squares.to(collective_device())).cpu()
        norms = squares.sqrt().to(self.dtype)
        largest = torch.full((wanted,), -1.0, dtype=self.dtype)
        signs = torch.ones(wanted, dtype=self.dtype)
        for start, length in self._spans():  # normalized; the sign of each row's largest element
            block = (self._block(start, length, wanted) / norms[:, None].to(self.device)).cpu()
            peak, where = block.abs().max(dim=1)
            better = peak > largest  # strictly: the first largest element decides, as argmax does
            largest = torch.where(better, peak, largest)
            signs = torch.where(better, torch.where(block[torch.arange(wanted), where] >= 0, 1.0, -1.0).to(self.dtype),
                                signs)
            self._put_block(start, length, 0, block)
        if self.shards is not None:  # the first largest element of the whole vector decides
            signs = self._whole_signs(wanted)
        return FileVectors(self, wanted, signs)

    def _whole_signs(self, wanted: int) -> torch.Tensor:
        """The signs of rows 0..wanted-1's largest elements over the shard group's whole vectors."""
        largest = torch.full((wanted,), -1.0, dtype=torch.float64)
        position = torch.zeros(wanted, dtype=torch.long)
        sign = torch.ones(wanted, dtype=torch.float64)
        for start, length in self._spans():
            block = self._block(start, length, wanted).cpu().double()
            peak, where = block.abs().max(dim=1)
            better = peak > largest
            largest = torch.where(better, peak, largest)
            position = torch.where(better, where + start, position)
            sign = torch.where(better, torch.where(block[torch.arange(wanted), where] >= 0, 1.0, -1.0).double(), sign)
        return self.shards.agree(largest, position, sign).to(self.dtype)

    def close(self) -> None:
        """Close (and so delete) the file."""
        if self.file is not None:
            self.file.close()
            self.file = None


class FileRow:
    """Row j of a ``FileBasis``, read where and when it is needed rather than whole.

    ``read(start, count)`` gives its coordinates [start, start+count) as a new tensor on the
    basis's device; ``tensor()`` the whole row (``FileBasis.get``).
    """

    def __init__(self, basis: FileBasis, j: int):
        self.basis, self.j = basis, int(j)

    def numel(self) -> int:
        """The row's length (the basis's ``dim``)."""
        return self.basis.dim

    def tensor(self) -> torch.Tensor:
        """The whole row, a new tensor on the basis's device."""
        return self.basis.get(self.j)

    def dot(self, w: torch.Tensor) -> float:
        """``quadratic.block_dot(w, row)``, the row read a block at a time: the same sums in the same order."""
        return float(sum(float(torch.dot(w[i: i + BLOCK].double(), self.read(i, min(BLOCK, w.numel() - i)).double()))
                         for i in range(0, w.numel(), BLOCK)))

    def read(self, start: int, count: int) -> torch.Tensor:
        """Coordinates [start, start+count) of the row, a new tensor on the basis's device."""
        basis = self.basis
        out = np.empty(int(count), dtype=basis.np_dtype)
        first = int(start) - int(start) % basis.width
        for block in range(first, int(start) + int(count), basis.width):  # the column blocks it spans
            length = min(basis.width, basis.dim - block)
            low, high = max(int(start), block), min(int(start) + int(count), block + length)
            offset = basis._offset(block, self.j, length) + (low - block) * basis.item
            basis._read(out[low - start: high - start], offset)
        return torch.from_numpy(out).to(basis.device)


class FileVectors:
    """The eigenvectors that a file-backed basis made: rows 0..count-1 of it times their signs.

    Iterating reads one vector at a time; ``tensor()`` writes them row after row into a second
    temporary file and maps it, a (count, dim) CPU tensor whose pages are read only when used, and
    closes the basis.
    """

    def __init__(self, basis: FileBasis, count: int, signs: torch.Tensor):
        self.basis, self.count, self.signs = basis, count, signs

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for i in range(self.count):
            yield self.basis.get(i).mul_(self.signs[i].item())

    def tensor(self) -> torch.Tensor:
        """The vectors as one (count, dim) CPU tensor mapped from a temporary file."""
        basis = self.basis
        out = tempfile.TemporaryFile(prefix="landscape-eigenvectors-")
        out.truncate(self.count * basis.dim * basis.item)
        for start, length in basis._spans():
            block = basis._block(start, length, self.count).cpu() * self.signs[:, None]
            for i in range(self.count):
                data = np.ascontiguousarray(block[i].numpy())
                view, done = memoryview(data).cast("B"), 0
                offset = (i * basis.dim + start) * basis.item
                while done < len(view):
                    done += os.pwrite(out.fileno(), view[done:], offset + done)
        mapped = np.memmap(out, dtype=basis.np_dtype, mode="c", shape=(self.count, basis.dim))
        out.close()  # the mapping keeps the (unlinked) file's pages
        basis.close()  # its rows are in the new file now
        return torch.from_numpy(mapped)
